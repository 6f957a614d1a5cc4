"""Programmatic dependent launch (PDL) for our Triton kernels.

A batch-1 decode step is ~330 kernel launches, most of them a few microseconds long; between two
kernels of a CUDA graph the GPU sits idle while the next grid is launched and ramps up. On Hopper
and newer a kernel launched with PDL may start while the kernel before it in the stream is still
running, and waits inside (`griddepcontrol.wait`) until that kernel has finished and its writes
are visible. Work that does not depend on the previous kernel (a GEMV's first weight tile, a
norm's gain vector) can be issued before the wait.

Contract for a kernel launched with `launch_pdl=True` (its `USE_PDL` constexpr set alike):
- before `pdl_enter` a program may only read memory that no kernel writes (weights) and must
  not write anything: the previous kernel may still be running, and a buffer it reads may be
  the memory this kernel's output was allocated in;
- every program calls `pdl_enter`, before any early return, so a kernel never completes before
  its predecessor has (later kernels rely on that: each waits only for the kernel right before it).
`pdl_enter` also lets the next kernel launch as soon as every program of this one has started.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def pdl_enter(USE_PDL: tl.constexpr):
    """Wait for the previous kernel's results, then allow the next kernel to launch early."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def pdl_supported(device: torch.device) -> bool:
    """Whether `device` can launch with PDL (CUDA compute capability 9.0 and newer)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


__all__ = ["pdl_enter", "pdl_supported"]
