"""The Llama-family model and its loader against Hugging Face transformers (fp32, CPU).

- SmolLM2 (the embedded model, fetched the real way) prefill logits equal HF's;
- prefix prefill + extend over the cached prefix + decode steps (mixed batches, page sizes 1 and 4)
  give the logits of one full prefill;
- Qwen3 (QK-norm), Qwen2 (qkv bias, tied head) and Llama with llama3 RoPE scaling and biases, on
  random weights built by HF and passed through `load_weights`;
- tensor parallelism (2 ranks, gloo) gives the tp=1 logits;
- the loader's model resolution, dummy weights and the embedded-model cache.
"""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from kernels import create_attention_backend
from kernels.base import AttentionBatch, AttentionContext, KVCache
from scheduler_proc.models import embedded
from scheduler_proc.models.embedded import ensure_embedded_model
from scheduler_proc.models.llama import LlamaForCausalLM, UnsupportedModelError, head_dim_of
from scheduler_proc.models.loader import (
    ModelLoadError, load_model, load_model_config, resolve_dtype,
)
from server.bench.tokenizer import chat_token_ids
from server.config import ServerConfig

REPO = Path(__file__).resolve().parents[1]


class PagedRunner:
    """Drives a model step by step over a paged KV pool, like the engine does.

    Each sequence owns pages taken from a shuffled free list (so pages are never contiguous);
    `step({seq: new_token_ids})` runs one batch and returns each sequence's logits for all its new
    tokens.
    """

    def __init__(self, model: LlamaForCausalLM, page_size: int, num_pages: int = 256, seed: int = 0,
                 backend: str = "torch"):
        cfg = model.config
        self.model, self.page_size = model, page_size
        self.device = model.lm_head.weight.device
        hq, hkv = model.model.layers[0].self_attn.num_heads, model.model.layers[0].self_attn.num_kv_heads
        self.backend = create_attention_backend(backend, hq, hkv, head_dim_of(cfg), device=self.device)
        dtype = model.lm_head.weight.dtype
        self.kv = KVCache(cfg.num_hidden_layers, num_pages, page_size, hkv, head_dim_of(cfg), dtype, self.device)
        self.free = list(range(1, num_pages))
        random.Random(seed).shuffle(self.free)
        self.pages: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def step(self, new: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        ps = self.page_size
        ids, positions, out_loc, qo, kvp, kvi, q_lens, seq_lens, prefix = [], [], [], [0], [0], [], [], [], []
        for sid, toks in new.items():
            start = self.lens.get(sid, 0)
            end = start + len(toks)
            pages = self.pages.setdefault(sid, [])
            while len(pages) * ps < end:
                pages.append(self.free.pop())
            ids += toks
            positions += range(start, end)
            out_loc += [pages[p // ps] * ps + p % ps for p in range(start, end)]
            qo.append(len(ids))
            kvi += pages[:-(-end // ps)]
            kvp.append(len(kvi))
            q_lens.append(len(toks))
            seq_lens.append(end)
            prefix.append(start)
            self.lens[sid] = end
        dev = self.device
        i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=dev)  # noqa: E731
        i64 = lambda xs: torch.tensor(xs, dtype=torch.int64, device=dev)  # noqa: E731
        batch = AttentionBatch(i32(qo), i32(kvp), i32(kvi), i32(seq_lens), i32(prefix), i64(out_loc),
                               i64(positions), q_lens, seq_lens, ps)
        with torch.inference_mode():
            ctx = AttentionContext(self.backend, self.backend.prepare(batch), self.kv, batch)
            hidden = self.model(i64(ids), batch.positions, ctx)
            logits = self.model.compute_logits(hidden)
        return {sid: logits[qo[i]:qo[i + 1]] for i, sid in enumerate(new)}


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4):
    """Relative to the logits' scale: |ours - ref| <= rtol * max|ref| elementwise."""
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours.float(), ref.float(), rtol=rtol, atol=rtol * scale)


# ------------------------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def smol_dir() -> Path:
    return ensure_embedded_model()


@pytest.fixture(scope="module")
def smol(smol_dir):
    spec = load_model_config(ServerConfig())
    assert spec.weights_dir == smol_dir
    return load_model(spec, ServerConfig(), "cpu", torch.float32)


@pytest.fixture(scope="module")
def smol_hf(smol_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smol_prompts(smol_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_dir)
    chats = ["What is the capital of France?", "Write a haiku about the sea.",
             "List three prime numbers and explain why they are prime."]
    out = []
    for text in chats:
        out.append(chat_token_ids(tok, [{"role": "user", "content": text}], add_generation_prompt=True))
    out.append(tok("The quick brown fox jumps over the lazy dog. " * 3)["input_ids"])
    out.append(tok("1 2 3")["input_ids"])
    return out


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([ids], device=hf.device)).logits[0].float()


def test_smollm2_prefill_matches_hf(smol, smol_hf, smol_prompts):
    runner = PagedRunner(smol, page_size=1, num_pages=1024)
    # all prompts in one batch: several sequences in the flat token dimension
    out = runner.step({str(i): ids for i, ids in enumerate(smol_prompts)})
    for i, ids in enumerate(smol_prompts):
        assert_logits_close(out[str(i)], hf_logits(smol_hf, ids))


def test_smollm2_greedy_answer(smol, smol_prompts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ensure_embedded_model())
    runner = PagedRunner(smol, page_size=4)
    logits = runner.step({"a": smol_prompts[0]})["a"][-1]
    gen = []
    for _ in range(8):
        gen.append(int(logits.argmax()))
        logits = runner.step({"a": [gen[-1]]})["a"][-1]
    assert tok.decode(gen).startswith("The capital of France is Paris")


@pytest.mark.parametrize("page_size", [1, 4])
def test_prefix_extend_decode_equals_full_prefill(smol, smol_hf, smol_prompts, page_size):
    a, b = smol_prompts[2], smol_prompts[3]
    ref_a, ref_b = hf_logits(smol_hf, a), hf_logits(smol_hf, b)
    runner = PagedRunner(smol, page_size=page_size, seed=page_size)
    got_a, got_b = [], []
    # step 1: prefill prefixes (lengths not multiples of the page size)
    out = runner.step({"a": a[:7], "b": b[:5]})
    got_a.append(out["a"]), got_b.append(out["b"])
    # step 2: chunked prefill of a over its cached prefix while b extends by a chunk too
    out = runner.step({"a": a[7:-3], "b": b[5:-9]})
    got_a.append(out["a"]), got_b.append(out["b"])
    # steps 3-5: a decodes its last tokens one by one while b extends 2 at a time (mixed batches)
    for i in range(3):
        lo = len(b) - 9 + 2 * i
        out = runner.step({"a": [a[len(a) - 3 + i]], "b": b[lo:lo + 2]})
        got_a.append(out["a"]), got_b.append(out["b"])
    # steps 6-8: b decodes alone to its end
    for t in b[-3:]:
        got_b.append(runner.step({"b": [t]})["b"])
    assert_logits_close(torch.cat(got_a), ref_a)
    assert_logits_close(torch.cat(got_b), ref_b)


def test_smollm2_bfloat16_runs_close(smol_hf, smol_prompts):
    spec = load_model_config(ServerConfig())
    model = load_model(spec, ServerConfig(), "cpu", torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    ids = smol_prompts[0]
    logits = PagedRunner(model, page_size=1).step({"x": ids})["x"]
    assert logits.dtype == torch.float32
    ref = hf_logits(smol_hf, ids)
    # bf16 drifts, but the distribution over the vocabulary must stay the same one
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.8, agree


# ------------------------------------------------------------------ other family members (HF random weights)


def _randomize(hf_model, seed: int) -> None:
    """HF initialises norms to 1 and biases to 0; perturb everything so every weight matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)


def _family_configs(hidden: int = 64, qwen3_head_dim: int = 32):
    """hidden / 4 heads is the head dim of qwen2 and llama3; qwen3 decouples it (GPU tests use 64,
    a head dim whose FlashInfer kernels are prebuilt)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    tiny = {**TINY, "hidden_size": hidden}
    return {
        # Qwen3: QK-norm, head_dim decoupled from hidden/heads, untied head
        "qwen3": Qwen3Config(**tiny, head_dim=qwen3_head_dim, tie_word_embeddings=False, rope_theta=1000000.0),
        # Qwen2: qkv bias (no o_proj bias), tied head
        "qwen2": Qwen2Config(**tiny, tie_word_embeddings=True, rope_theta=10000.0),
        # Llama 3.x: llama3 RoPE scaling (tiny original length so it matters), attention + MLP bias, MHA
        "llama3": LlamaConfig(**{**tiny, "num_key_value_heads": 4}, attention_bias=True, mlp_bias=True,
                              tie_word_embeddings=False,
                              rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 2.0, "original_max_position_embeddings": 16},
                              rope_theta=500000.0),
    }


def _hf_model(config, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    _randomize(hf, seed)
    return hf


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama3"])
def test_family_matches_hf_on_random_weights(family):
    config = _family_configs()[family]
    hf = _hf_model(config, seed=11)
    ours = LlamaForCausalLM(config)
    loaded = ours.load_weights(hf.state_dict().items())
    assert ours.missing_parameters(loaded) == []
    if family == "qwen3":
        assert ours.model.layers[0].self_attn.qk_norm
    if family == "qwen2":
        assert ours.model.layers[0].self_attn.qkv_proj.bias is not None and ours.lm_head.tied
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_logits(hf, ids)
    runner = PagedRunner(ours, page_size=4)
    got = [runner.step({"s": ids[:30]})["s"]] + [runner.step({"s": [t]})["s"] for t in ids[30:]]
    assert_logits_close(torch.cat(got), ref)


def _gpu_backends() -> list[str]:
    from kernels import BackendUnavailableError

    names = []
    for name in ("torch", "triton", "flashinfer"):
        try:
            create_attention_backend(name, 4, 2, 32, device="cuda")
            names.append(name)
        except (BackendUnavailableError, ImportError):
            pass
    return names


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama3"])
def test_family_on_cuda(family):
    """On CUDA (fused Triton RMSNorm/RoPE when available): fp32 equals HF with the torch and
    Triton backends; bf16 agrees across every available backend (FlashInfer included)."""
    config = _family_configs(hidden=256, qwen3_head_dim=64)[family]
    hf = _hf_model(config, seed=11).cuda()
    ids = torch.randint(0, config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_logits(hf, ids).cpu()
    bf16_runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.device("cuda"):
            prev = torch.get_default_dtype()
            torch.set_default_dtype(dtype)
            try:
                ours = LlamaForCausalLM(config)
            finally:
                torch.set_default_dtype(prev)
        ours.load_weights(hf.state_dict().items())
        assert ours.model.rotary_emb.cos_sin_cache.is_cuda
        for name in _gpu_backends():
            if dtype == torch.float32 and name == "flashinfer":
                continue  # FlashInfer kernels are fp16/bf16 only
            runner = PagedRunner(ours, page_size=4, backend=name)
            got = torch.cat([runner.step({"s": ids[:30]})["s"]] + [runner.step({"s": [t]})["s"] for t in ids[30:]])
            if dtype == torch.float32:
                assert_logits_close(got.cpu(), ref, rtol=1e-3)
            else:
                bf16_runs[name] = got.cpu()
    for name, got in bf16_runs.items():
        assert_logits_close(got, ref, rtol=3e-2)
        assert_logits_close(got, bf16_runs["torch"], rtol=2e-2)


def test_unsupported_configs_raise():
    from transformers import LlamaConfig

    with pytest.raises(UnsupportedModelError):
        LlamaForCausalLM(LlamaConfig(**TINY, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(UnsupportedModelError):
        LlamaForCausalLM(LlamaConfig(**TINY, hidden_act="gelu"))
    with pytest.raises(ValueError):
        LlamaForCausalLM(LlamaConfig(**TINY), tp_rank=0, tp_size=3)  # 4 heads over 3 ranks


def test_enable_pdl_switches_the_kernel_launching_modules():
    """`enable_pdl` flips the programmatic-dependent-launch switch of every module that launches a
    Triton kernel on CUDA (norms including Qwen3's QK-norm, projections, activation, RoPE) and of
    nothing else; the CPU path does not read it, so outputs are unchanged."""
    from scheduler_proc.models.layers import enable_pdl

    config = _family_configs()["qwen3"]
    ours = LlamaForCausalLM(config)
    ours.load_weights(_hf_model(config, seed=3).state_dict().items())
    ids = torch.randint(0, config.vocab_size, (14,), generator=torch.Generator().manual_seed(2)).tolist()
    before = _run_tiny(ours, ids)
    # per layer: 4 norms, qkv, o, gate_up, down, act; then the final norm, lm_head, rotary
    assert enable_pdl(ours) == config.num_hidden_layers * 9 + 3
    layer = ours.model.layers[0]
    assert layer.self_attn.q_norm.pdl and layer.mlp.down_proj.pdl and ours.model.rotary_emb.pdl
    assert not hasattr(ours.model.embed_tokens, "pdl")
    assert torch.equal(_run_tiny(ours, ids), before)


# ------------------------------------------------------------------------------ tensor parallel


def _run_tiny(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    runner = PagedRunner(model, page_size=2)
    return torch.cat([runner.step({"s": ids[:9]})["s"]] + [runner.step({"s": [t]})["s"] for t in ids[9:]])


def _tp_worker(rank: int, world: int, rendezvous: str, config_dicts: list[dict], ids: list[int], queue) -> None:
    import datetime

    import torch.distributed as dist
    from transformers import AutoConfig

    from scheduler_proc.models.loader import ModelSpec

    # A file rendezvous, as the server's ranks use: a free TCP port picked beforehand can be taken
    # by another process before rank 0 binds it.
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    try:
        torch.set_num_threads(1)
        for config_dict in config_dicts:
            config = AutoConfig.for_model(**config_dict)
            spec = ModelSpec(config, None, "", config.max_position_embeddings, (2,), config.vocab_size)
            model = load_model(spec, ServerConfig(load_format="dummy", seed=5), "cpu", torch.float32,
                               tp_rank=rank, tp_size=world, tp_group=dist.group.WORLD)
            logits = _run_tiny(model, ids)
            if rank == 0:
                queue.put(logits.tolist())
        # Without it a rank can tear gloo down while its peer is still in its last collective; the
        # peer then aborts at exit ("terminate called without an active exception", seen in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_matches_single_rank(tmp_path):
    """tp=2 over gloo: split KV heads (2 over 2 ranks) and a replicated KV head (1 over 2 ranks),
    an odd vocabulary (padded to 2 x 128 and trimmed), dummy weights identical for any tp."""
    from transformers import LlamaConfig

    from scheduler_proc.models.loader import ModelSpec

    configs = [LlamaConfig(**{**TINY, "num_key_value_heads": n, "vocab_size": 255}, tie_word_embeddings=tied)
               for n, tied in ((2, False), (1, True))]
    ids = torch.randint(0, 255, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    refs = []
    for config in configs:
        spec = ModelSpec(config, None, "", 256, (2,), 255)
        refs.append(_run_tiny(load_model(spec, ServerConfig(load_format="dummy", seed=5), "cpu", torch.float32),
                              ids))

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    rendezvous = str(tmp_path / "tp_rendezvous")
    procs = [ctx.Process(target=_tp_worker, args=(r, 2, rendezvous, [c.to_dict() for c in configs], ids, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = [torch.tensor(queue.get(timeout=180)) for _ in configs]
    finally:
        for p in procs:
            p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    for g, ref in zip(got, refs):
        assert g.shape == (12, 255)
        assert_logits_close(g, ref, rtol=1e-5)


# ------------------------------------------------------------------------------------ loader


def test_load_model_config_variants(smol_dir, tmp_path):
    spec = load_model_config(ServerConfig())
    assert spec.vocab_size == 49152 and spec.eos_token_ids == (2,) and spec.max_model_len == 8192
    assert spec.tokenizer_path == str(smol_dir) and spec.hf_config.num_hidden_layers == 30

    spec = load_model_config(ServerConfig(model=str(smol_dir), max_model_len=1024))
    assert spec.weights_dir == smol_dir and spec.max_model_len == 1024

    with pytest.raises(ModelLoadError):
        load_model_config(ServerConfig(model=str(smol_dir), max_model_len=100_000))
    tiny = str(REPO / "configs" / "tiny-llama.json")
    with pytest.raises(ModelLoadError):  # a config file only makes sense with dummy weights
        load_model_config(ServerConfig(model=tiny))
    with pytest.raises(ModelLoadError):
        load_model_config(ServerConfig(model=str(tmp_path / "missing"), load_format="dummy"))

    # dummy from a directory holding config.json + generation_config.json, no tokenizer
    cfg = json.loads((REPO / "configs" / "qwen3-8b.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643]}))
    spec = load_model_config(ServerConfig(model=str(tmp_path), load_format="dummy"))
    assert spec.weights_dir is None and spec.vocab_size == 151936 and spec.max_model_len == 40960
    assert spec.eos_token_ids == (151645, 151643)
    assert spec.tokenizer_path == str(smol_dir)  # the embedded tokenizer
    spec = load_model_config(ServerConfig(model=str(tmp_path), load_format="dummy", tokenizer="some/tok"))
    assert spec.tokenizer_path == "some/tok"


@pytest.mark.parametrize("name,vocab,layers", [("llama-3.1-8b", 128256, 32), ("qwen3-8b", 151936, 36),
                                               ("tiny-llama", 49152, 2)])
def test_shipped_configs(name, vocab, layers):
    spec = load_model_config(ServerConfig(model=str(REPO / "configs" / f"{name}.json"), load_format="dummy"))
    assert spec.vocab_size == vocab and spec.hf_config.num_hidden_layers == layers


def test_dummy_weights_deterministic_and_finite():
    tiny = str(REPO / "configs" / "tiny-llama.json")
    spec = load_model_config(ServerConfig(model=tiny, load_format="dummy"))
    m1 = load_model(spec, ServerConfig(load_format="dummy", seed=1), "cpu", torch.float32)
    m2 = load_model(spec, ServerConfig(load_format="dummy", seed=1), "cpu", torch.float32)
    m3 = load_model(spec, ServerConfig(load_format="dummy", seed=2), "cpu", torch.float32)
    w1, w2, w3 = (m.model.layers[1].mlp.down_proj.weight for m in (m1, m2, m3))
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)
    assert abs(w1.std().item() - 0.02) < 0.002
    assert torch.equal(m1.model.norm.weight, torch.ones(64))
    logits = PagedRunner(m1, page_size=1).step({"s": list(range(10, 30))})["s"]
    assert logits.shape == (20, 49152) and torch.isfinite(logits).all()


def test_resolve_dtype():
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError):
        resolve_dtype("int8", "cpu")


def test_embedded_cache_is_reused_and_conversion_is_exclusive(smol_dir, tmp_path, monkeypatch):
    import time as _time

    assert ensure_embedded_model() == smol_dir  # cached: no download, no conversion
    assert (smol_dir / "model.safetensors").stat().st_size > 500_000_000

    # Two converters at once: the lock lets one convert; the other reuses its result.
    calls = []

    def fake_fetch(workdir: Path) -> Path:
        calls.append(workdir)
        _time.sleep(0.3)
        gguf = workdir / "model.gguf"
        gguf.write_bytes(b"gguf")
        return gguf

    def fake_convert(gguf: Path, out: Path) -> None:
        out.mkdir()
        for name in embedded._REQUIRED_FILES:
            (out / name).write_text("{}")

    monkeypatch.setattr(embedded, "_fetch_gguf", fake_fetch)
    monkeypatch.setattr(embedded, "_convert_gguf", fake_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_embedded_model(tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [tmp_path / embedded.EMBEDDED_DIR_NAME] * 2
    # the temporary work directory is gone; only the finished model and the lock remain
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [embedded.EMBEDDED_DIR_NAME, f"{embedded.EMBEDDED_DIR_NAME}.lock"])


def test_sharded_checkpoint_directory_loads(tmp_path):
    """A real-weights directory with an index and several safetensors shards (as hub models ship)."""
    config = _family_configs()["qwen3"]
    hf = _hf_model(config, seed=4)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    with pytest.raises(ModelLoadError):  # real weights need a tokenizer
        load_model_config(ServerConfig(model=str(tmp_path)))
    spec = load_model_config(ServerConfig(model=str(tmp_path), tokenizer="any/tokenizer"))
    assert spec.weights_dir == tmp_path
    ours = load_model(spec, ServerConfig(), "cpu", torch.float32)
    ids = list(range(3, 23))
    assert_logits_close(PagedRunner(ours, page_size=1).step({"s": ids})["s"], hf_logits(hf, ids))
    (tmp_path / shards[0]).unlink()
    with pytest.raises(ModelLoadError):
        load_model(spec, ServerConfig(), "cpu", torch.float32)
