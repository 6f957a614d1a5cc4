"""Attention backends over the paged KV layout of `kernels.base`, and the factory that picks one.

Only the torch backend is imported eagerly by nothing: every backend module is imported when it is
chosen, so a CPU machine never needs triton or flashinfer installed.
"""

from __future__ import annotations

import importlib
import logging
from typing import Optional

import torch

from kernels.base import BaseAttentionBackend

logger = logging.getLogger(__name__)

BACKEND_NAMES = ("auto", "torch", "triton", "flashinfer")

# name -> (module, class); imported lazily
_BACKENDS = {
    "torch": ("kernels.torch_backend", "TorchAttentionBackend"),
    "triton": ("kernels.triton_backend", "TritonAttentionBackend"),
    "flashinfer": ("kernels.flashinfer_backend", "FlashInferAttentionBackend"),
}


class BackendUnavailableError(RuntimeError):
    """The requested attention backend cannot run here (missing package or wrong device)."""


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def resolve_backend_name(name: str, device: torch.device | str) -> str:
    """The concrete backend `name` means on `device` (`auto`: flashinfer on CUDA when importable,
    else triton on CUDA when importable, else torch)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name != "auto":
        return name
    if torch.device(device).type == "cuda":
        if _importable("flashinfer"):
            return "flashinfer"
        if _importable("triton"):
            return "triton"
    return "torch"


def create_attention_backend(name: str, num_q_heads: int, num_kv_heads: int, head_dim: int,
                             device: torch.device | str, scale: Optional[float] = None,
                             **kw) -> BaseAttentionBackend:
    """Build the attention backend `name` (auto | torch | triton | flashinfer) for one rank.

    num_q_heads / num_kv_heads are this rank's heads (after tensor-parallel sharding); `scale`
    defaults to head_dim ** -0.5; extra keyword arguments go to the backend's constructor.
    Raises ValueError for an unknown name and BackendUnavailableError when a GPU backend is asked
    for on a non-CUDA device or its package is missing.
    """
    device = torch.device(device)
    concrete = resolve_backend_name(name, device)
    if concrete != "torch" and device.type != "cuda":
        raise BackendUnavailableError(f"the {concrete} attention backend needs a CUDA device, not {device}")
    module_name, cls_name = _BACKENDS[concrete]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise BackendUnavailableError(f"the {concrete} attention backend is unavailable: {e}") from e
    cls = getattr(module, cls_name)
    logger.info("attention backend: %s", concrete)
    return cls(num_q_heads, num_kv_heads, head_dim, scale=scale, device=device, **kw)


__all__ = ["create_attention_backend", "resolve_backend_name", "BackendUnavailableError", "BACKEND_NAMES"]
