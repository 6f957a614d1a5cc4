"""GPU busy/idle accounting for the step loop, from CUDA events (no host sync while running).

The engine records an event just before it enqueues a stretch of device work (`begin`, after the
host work the stretch needs) and one after its last kernel (`end`): a step's forward is one
stretch, its sampling another (sampling may wait for the host to fill a grammar mask). The stream
runs them in launch order, so the time between one stretch's `end` and the next one's `begin` is
time the device sat idle waiting for the host; with overlap scheduling it should be close to zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TimelineSummary:
    steps: int  # stretches of device work (a step's forward and its sampling are two)
    busy_s: float  # device time inside steps
    idle_s: float  # device time between consecutive steps

    @property
    def idle_fraction(self) -> float:
        total = self.busy_s + self.idle_s
        return self.idle_s / total if total else 0.0


class StepTimeline:
    """Collects (begin, end) event pairs per stretch of device work; `summary()` synchronizes
    and adds them up.

    Gaps longer than `max_gap_s` (the loop had no work, e.g. between benchmark phases) are not
    counted as idle.
    """

    def __init__(self, device: torch.device, max_gap_s: float = 0.5):
        self.device, self.max_gap_s = device, max_gap_s
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._open = None

    def begin(self) -> None:
        self._open = torch.cuda.Event(enable_timing=True)
        self._open.record()

    def end(self) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._events.append((self._open, end))

    def reset(self) -> None:
        self._events.clear()

    def summary(self) -> TimelineSummary:
        torch.cuda.synchronize(self.device)
        busy = idle = 0.0
        for i, (b, e) in enumerate(self._events):
            busy += b.elapsed_time(e) / 1000
            if i + 1 < len(self._events):
                gap = e.elapsed_time(self._events[i + 1][0]) / 1000
                if gap < self.max_gap_s:
                    idle += gap
        return TimelineSummary(len(self._events), busy, idle)
