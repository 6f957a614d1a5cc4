"""From `--model` to a loaded model: resolve where config, weights and tokenizer live, then load.

`load_model_config(server_config)` only reads configs (cheap; every rank and the engine call it);
`load_model(spec, ...)` builds this rank's model and fills its weights: safetensors shards read
lazily with `safe_open` straight onto the target device, or seeded random weights for
`--load-format dummy`.

What `--model` may be:
- None: the embedded SmolLM2-135M-Instruct (see `embedded.py`);
- a Hugging Face model directory (config.json + *.safetensors + tokenizer);
- a hub id (downloaded with huggingface_hub, safetensors only);
- with `--load-format dummy`: also a config.json path or a directory holding one. Dummy models
  without a tokenizer of their own use the embedded SmolLM2 tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from scheduler_proc.models.embedded import ensure_embedded_model
from scheduler_proc.models.llama import LlamaForCausalLM, hf_weight_shapes
from server.config import ServerConfig

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_HUB_PATTERNS_CONFIG = ["*.json", "*.model", "*.jinja", "*.tiktoken", "*.txt"]
_HUB_PATTERNS_WEIGHTS = _HUB_PATTERNS_CONFIG + ["*.safetensors"]

# auto on CPU = bfloat16, measured: one decode step of SmolLM2-135M (prepare + forward + logits,
# torch attention backend, 128 tokens of context each) on the 2-core dev machine (AMD EPYC with
# avx512_bf16, torch 2.13, 2 threads), `benchmarks/bench_decode_step.py --iters 15`, min ms:
#   batch    float32    bfloat16
#       1       40.0        18.2
#       8       62.0        23.8
#      32      122.1        44.1
# bf16 halves the bytes of weights read per step (decode is memory-bound) and oneDNN has native
# bf16 kernels there; without hardware bf16 support `resolve_dtype` falls back to float32.
CPU_AUTO_DTYPE = torch.bfloat16

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model, its config, weights or tokenizer cannot be found or do not fit together."""


@dataclass
class ModelSpec:
    """Everything known about the model before any weight is read.

    hf_config: the transformers config object.
    weights_dir: directory of the safetensors shards; None for dummy weights.
    tokenizer_path: directory or hub id the tokenizer loads from.
    max_model_len: context length (prompt + output) the server allows.
    eos_token_ids: ids that end generation (config and generation_config together, in order).
    vocab_size: rows of the embedding / columns of the logits.
    """

    hf_config: Any
    weights_dir: Optional[Path]
    tokenizer_path: str
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    vocab_size: int


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype for `--dtype name` on `device` (auto: bfloat16 on CUDA, CPU_AUTO_DTYPE on CPU)."""
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        if CPU_AUTO_DTYPE == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.float32  # bf16 matmuls are emulated (slow) without hardware support
        return CPU_AUTO_DTYPE
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


# ---------------------------------------------------------------------------------------- config


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in _TOKENIZER_FILES)


def _snapshot(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth, not-found: one error type for the caller
        raise ModelLoadError(f"--model {repo_id!r} is neither a local path nor a downloadable hub "
                             f"model: {e}") from e


def _eos_ids(hf_config: Any, model_dir: Optional[Path]) -> tuple[int, ...]:
    ids: list[int] = []

    def add(value):
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(v, int) and v not in ids:
                ids.append(v)

    add(getattr(hf_config, "eos_token_id", None))
    gen = model_dir / "generation_config.json" if model_dir is not None else None
    if gen is not None and gen.is_file():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    return tuple(ids)


def load_model_config(server_config: ServerConfig) -> ModelSpec:
    """Resolve `--model`, `--tokenizer`, `--load-format` and `--max-model-len` into a ModelSpec.

    Downloads what is missing (embedded model, hub snapshot) but reads no weights.
    Raises ModelLoadError when the model cannot be found or the options contradict each other.
    """
    from transformers import AutoConfig

    dummy = server_config.load_format == "dummy"
    if server_config.load_format not in ("auto", "dummy"):
        raise ModelLoadError(f"unknown load format {server_config.load_format!r} (auto or dummy)")
    model = server_config.model
    config_file: Optional[Path] = None
    if model is None:
        model_dir = ensure_embedded_model()
    else:
        path = Path(model).expanduser()
        if path.is_file():
            if not dummy:
                raise ModelLoadError(f"--model {model} is a file; a config.json path needs --load-format dummy")
            model_dir, config_file = path.parent, path
        elif path.is_dir():
            model_dir = path
        elif path.is_absolute() or model.startswith(".") or model.count("/") != 1:
            raise ModelLoadError(f"--model {model}: no such file or directory (and not a hub id 'org/name')")
        else:
            model_dir = _snapshot(model, _HUB_PATTERNS_CONFIG if dummy else _HUB_PATTERNS_WEIGHTS)
    config_file = config_file or model_dir / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"no config.json in {model_dir}")
    try:
        hf_config = AutoConfig.from_pretrained(str(config_file))
    except Exception as e:
        raise ModelLoadError(f"cannot read model config {config_file}: {e}") from e

    if server_config.tokenizer:
        tokenizer_path = server_config.tokenizer
    elif _has_tokenizer(model_dir):
        tokenizer_path = str(model_dir)
    elif dummy:
        tokenizer_path = str(ensure_embedded_model())
    else:
        raise ModelLoadError(f"{model_dir} has no tokenizer; pass --tokenizer")

    native_len = int(getattr(hf_config, "max_position_embeddings", 0) or 0)
    if native_len <= 0:
        raise ModelLoadError(f"{config_file} has no max_position_embeddings")
    max_len = server_config.max_model_len or native_len
    if max_len > native_len:
        raise ModelLoadError(f"--max-model-len {max_len} exceeds the model's max_position_embeddings "
                             f"({native_len})")
    if max_len < 2:
        raise ModelLoadError("--max-model-len must be at least 2")

    return ModelSpec(
        hf_config=hf_config,
        weights_dir=None if dummy else model_dir,
        tokenizer_path=tokenizer_path,
        max_model_len=max_len,
        eos_token_ids=_eos_ids(hf_config, model_dir),
        vocab_size=int(hf_config.vocab_size),
    )


# ---------------------------------------------------------------------------------------- weights


def safetensors_files(weights_dir: Path) -> list[Path]:
    """The checkpoint's shards: those the index names, else every *.safetensors (preferring
    `model*.safetensors` when a directory also carries another layout, e.g. Mistral's consolidated)."""
    index = weights_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [weights_dir / n for n in names]
    files = sorted(weights_dir.glob("*.safetensors"))
    preferred = [f for f in files if f.name.startswith("model")]
    return preferred or files


def iter_safetensors(files: list[Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor in `files`, read one at a time straight onto `device`."""
    from safetensors import safe_open

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    for f in files:
        with safe_open(str(f), framework="pt", device=str(device)) as reader:
            for name in reader.keys():
                yield name, reader.get_tensor(name)


def iter_dummy_weights(hf_config: Any, seed: int, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Seeded random full-size HF tensors: normal(0, 0.02) matrices, unit norms, zero biases.

    Each tensor's generator is seeded from (seed, tensor name), so the weights do not depend on
    load order or tensor-parallel degree: tp=1 and tp=2 run the same model.
    """
    for name, shape in hf_weight_shapes(hf_config).items():
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, device=device)
        elif name.endswith(".bias"):
            yield name, torch.zeros(shape, device=device)
        else:
            gen = torch.Generator(device=device)
            gen.manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (1 << 63))
            yield name, torch.empty(shape, device=device).normal_(0.0, 0.02, generator=gen)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Parameters are created in `dtype` directly (no float32 copy of a large model first)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def load_model(spec: ModelSpec, server_config: ServerConfig, device: torch.device | str, dtype: torch.dtype,
               tp_rank: int = 0, tp_size: int = 1, tp_group=None) -> LlamaForCausalLM:
    """Build this rank's model on `device` in `dtype` and fill every parameter.

    Raises ModelLoadError when the checkpoint lacks tensors the model needs (or has no shards).
    """
    device = torch.device(device)
    start = time.perf_counter()
    with _default_dtype(dtype), device:
        model = LlamaForCausalLM(spec.hf_config, tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group)
    if spec.weights_dir is None:
        weights = iter_dummy_weights(spec.hf_config, server_config.seed, device)
    else:
        files = safetensors_files(spec.weights_dir)
        if not files:
            raise ModelLoadError(f"no *.safetensors weights in {spec.weights_dir}")
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{spec.weights_dir} lacks the shards its index names: {absent}")
        weights = iter_safetensors(files, device)
    with torch.no_grad():
        loaded = model.load_weights(weights)
    missing = model.missing_parameters(loaded)
    if missing:
        raise ModelLoadError(f"the checkpoint lacks {len(missing)} parameters, e.g. {missing[:5]}")
    logger.info("loaded %s weights (%s, %s, tp %d/%d) in %.1f s",
                "dummy" if spec.weights_dir is None else spec.weights_dir, dtype, device, tp_rank, tp_size,
                time.perf_counter() - start)
    return model.eval()


__all__ = ["ModelSpec", "ModelLoadError", "load_model_config", "load_model", "resolve_dtype",
           "safetensors_files", "iter_safetensors", "iter_dummy_weights", "CPU_AUTO_DTYPE"]
