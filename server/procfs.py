"""Linux /proc readings about other processes: children, names, liveness, resident memory.

Used by the tests and the soak script to find and watch a server's processes; stdlib only."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Optional


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may itself hold spaces or ")")."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, IndexError, ValueError):
            continue  # exited meanwhile
        if ppid == pid:
            out.append(int(entry))
    return out


def proc_name(pid: int) -> str:
    """The process's name (`comm`, as set by prctl), "" once it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def rss_mib(pid: int) -> Optional[float]:
    """Resident set size (VmRSS) in MiB, None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def terminate(proc: subprocess.Popen, timeout_s: float) -> Optional[int]:
    """SIGTERM `proc` and wait; kill it if it outlives `timeout_s`. Its exit code, or None when it
    had to be killed (a clean stop never needs that)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None
    return proc.returncode
