"""Host -> device copies that never make the host wait for the device.

`torch.tensor(values, device="cuda")` and `.to("cuda")` from pageable memory synchronize the
stream: under the overlap loop the host would then wait for the forward in flight, and the device
would idle while the host schedules the next step. Copies from pinned memory with
`non_blocking=True` are queued instead (stream order keeps each before its readers; PyTorch's
pinned allocator keeps the source alive until the copy has run).
"""

from __future__ import annotations

from typing import Sequence

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, copied without blocking (itself on CPU)."""
    return host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)


def device_tensor(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.tensor(values, dtype=dtype)` on `device`, copied without blocking."""
    return to_device(torch.tensor(values, dtype=dtype), device)
