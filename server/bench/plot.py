"""`--plot out.png`: latency CDFs (TTFT, ITL, E2E) and output throughput over time."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from server.bench.client import RequestRecord


def throughput_timeline(records: Sequence[RequestRecord], bin_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(bin start times, output tokens/s in each bin) from chunk arrival times.

    A chunk's arrival is rebuilt as start + ttft + cumulative ITL; when a server packs several
    tokens into one chunk (usage > chunks), each chunk carries an equal share of the tokens.
    """
    times, weights = [], []
    for r in records:
        if not r.success or r.chunks == 0:
            continue
        arrivals = r.start + r.ttft + np.concatenate([[0.0], np.cumsum(r.itl)])
        times.append(arrivals)
        weights.append(np.full(arrivals.size, r.output_len / r.chunks))
    if not times:
        return np.zeros(0), np.zeros(0)
    t, w = np.concatenate(times), np.concatenate(weights)
    edges = np.arange(0.0, t.max() + bin_s, bin_s)
    if edges.size < 2:
        edges = np.array([0.0, bin_s])
    tokens, _ = np.histogram(t, bins=edges, weights=w)
    return edges[:-1], tokens / bin_s


def _cdf(ax, seconds: Sequence[float], title: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("ms")
    ax.set_ylabel("fraction of samples")
    ax.grid(True, alpha=0.3)
    if len(seconds) == 0:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        return
    ms = np.sort(np.asarray(seconds)) * 1000.0
    ax.plot(ms, np.arange(1, ms.size + 1) / ms.size)


def plot_results(records: Sequence[RequestRecord], path: str | os.PathLike, title: str = "") -> None:
    """Write a 2x2 figure to `path` (format from its extension)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.success]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    _cdf(axes[0][0], [r.ttft for r in ok], "TTFT CDF")
    _cdf(axes[0][1], [g for r in ok for g in r.itl], "ITL CDF")
    _cdf(axes[1][0], [r.e2e for r in ok], "E2E latency CDF")
    ax = axes[1][1]
    span = max((r.start + r.e2e for r in ok), default=1.0)
    starts, rate = throughput_timeline(ok, bin_s=max(span / 100.0, 0.05))
    ax.step(starts, rate, where="post")
    ax.set_title("Output throughput over time")
    ax.set_xlabel("s since start")
    ax.set_ylabel("tokens/s")
    ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
