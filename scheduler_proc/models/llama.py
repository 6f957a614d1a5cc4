"""One Llama-family decoder: Llama 2/3.x, SmolLM2, Mistral, Qwen2/2.5 and Qwen3.

The variants differ only in switches read from the Hugging Face config:
- q/k/v bias: Qwen2 always, Llama/Qwen3 when `attention_bias` (which also biases o_proj);
- per-head RMSNorm of q and k before RoPE: Qwen3;
- MLP bias: Llama's `mlp_bias`;
- RoPE scaling (`rope_parameters` / `rope_scaling`): default, linear, llama3, yarn;
- tied or separate LM head (`tie_word_embeddings`).

The model is tensor-parallel ready (see `layers.py`): attention heads and MLP features are split
across ranks, with one all-reduce after o_proj and one after down_proj.

Forward contract: `model(input_ids[T], positions[T], ctx)` runs the flat token batch described by
`ctx.batch` through every layer (each layer's attention goes through `ctx.backend.forward`, which
also writes the new K/V into `ctx.kv_cache`) and returns final-normed hidden states [T, hidden].
`compute_logits(hidden_rows)` projects selected rows to float32 logits [N, vocab].
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import nn

from kernels.base import AttentionContext
from scheduler_proc.models.layers import (
    ColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RMSNorm, RowParallelLinear, SiluAndMul,
    VocabParallelEmbedding, cuda_fused_ops,
)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(ValueError):
    """The config describes an architecture or option this implementation does not cover."""


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters_of(config) -> dict:
    """RoPE settings as one dict with at least rope_type and rope_theta, from either config style
    (transformers >= 5 `rope_parameters`, or older `rope_theta` + `rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if not params and scaling:
        params = dict(scaling)
    if "rope_theta" not in params:
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def rope_inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim/2] float32, attention scaling) exactly as transformers computes them."""
    params = rope_parameters_of(config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    if rope_type not in ("linear", "llama3", "yarn"):
        # dynamic NTK / longrope change the frequencies with the sequence length: not static.
        raise UnsupportedModelError(f"RoPE type {rope_type!r} is not supported (default, linear, llama3, yarn are)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


class RopeStep(NamedTuple):
    """One step's RoPE inputs, looked up once and shared by every layer.
    positions: [T] int64; cos/sin: [T, 1, D/2] in the activation dtype (None on the fused CUDA path)."""

    positions: torch.Tensor
    cos: Optional[torch.Tensor]
    sin: Optional[torch.Tensor]


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate the two halves of each head) from a float32 cos|sin cache.

    `step(positions, dtype)` looks the cache up once per forward; `apply(q, k, step)` rotates
    q ([T, Hq, D]) and k ([T, Hkv, D]) in every layer. On CUDA with Triton one fused kernel
    rotates q and k in place instead.
    """

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0):
        super().__init__()
        # Built on the CPU in float32 (as transformers does), then moved to the device the model
        # is being built on.
        t = torch.arange(max_positions, dtype=torch.float32, device="cpu")
        freqs = torch.outer(t, inv_freq.to("cpu", torch.float32))
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_scaling
        self.half = freqs.shape[-1]
        self.register_buffer("cos_sin_cache", cache.to(torch.get_default_device()), persistent=False)

    pdl = False  # CUDA kernels launched with programmatic dependent launch (`layers.enable_pdl`)

    def step(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeStep:
        if positions.is_cuda and cuda_fused_ops() is not None:
            return RopeStep(positions, None, None)
        cs = self.cos_sin_cache.index_select(0, positions).to(dtype).unsqueeze(1)  # [T, 1, D]
        return RopeStep(positions, cs[..., :self.half], cs[..., self.half:])

    def fuses_kv_store(self, step: RopeStep, head_dim: int) -> bool:
        """Whether `apply_and_store_kv` can be used: the fused CUDA path, RoPE over the whole head."""
        return step.cos is None and 2 * self.half == head_dim

    def apply_and_store_kv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: RopeStep,
                           k_cache: torch.Tensor, v_cache: torch.Tensor, loc: torch.Tensor) -> None:
        """Rotate q in place and write rotated k and v into the flat KV-pool views at slots `loc`."""
        cuda_fused_ops().rotary_embedding_and_store_kv(step.positions, q, k, v, self.cos_sin_cache,
                                                       k_cache, v_cache, loc, self.pdl)

    def apply(self, q: torch.Tensor, k: torch.Tensor, step: RopeStep) -> tuple[torch.Tensor, torch.Tensor]:
        if step.cos is None:
            cuda_fused_ops().rotary_embedding(step.positions, q, k, self.cos_sin_cache, self.pdl)
            return q, k
        return _rotate(q, step.cos, step.sin), _rotate(k, step.cos, step.sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, config, layer_id: int, tp_rank: int, tp_size: int, tp_group):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = head_dim_of(config)
        model_type = getattr(config, "model_type", "llama")
        attention_bias = bool(getattr(config, "attention_bias", False))
        qkv_bias = attention_bias or model_type == "qwen2"
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=qkv_bias, tp_rank=tp_rank,
                                          tp_size=tp_size)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=attention_bias, tp_rank=tp_rank, tp_size=tp_size, tp_group=tp_group)
        self.qk_norm = model_type == "qwen3"
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, rope: RotaryEmbedding, rope_step: RopeStep,
                ctx: AttentionContext) -> torch.Tensor:
        T = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.view(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope.fuses_kv_store(rope_step, self.head_dim):
            # one kernel rotates q and writes rotated k and v into the pool; the backend skips its store
            rope.apply_and_store_kv(q, k, v, rope_step, *ctx.kv_cache.flat(self.layer_id), ctx.batch.out_cache_loc)
            k = v = None
        else:
            q, k = rope.apply(q, k, rope_step)
        out = ctx.backend.forward(q, k, v, self.layer_id, ctx.kv_cache, ctx.meta)
        return self.o_proj(out.reshape(T, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config, tp_rank: int, tp_size: int, tp_group):
        super().__init__()
        bias = bool(getattr(config, "mlp_bias", False))
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (silu is)")
        inter = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias,
                                                 tp_rank=tp_rank, tp_size=tp_size)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias, tp_rank=tp_rank,
                                           tp_size=tp_size, tp_group=tp_group)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, layer_id: int, tp_rank: int, tp_size: int, tp_group):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, tp_rank, tp_size, tp_group)
        self.mlp = LlamaMLP(config, tp_rank, tp_size, tp_group)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor], rope: RotaryEmbedding,
                rope_step: RopeStep, ctx: AttentionContext) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rope, rope_step, ctx)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config, tp_rank: int, tp_size: int, tp_group):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp_rank, tp_size,
                                                   tp_group)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, tp_rank, tp_size, tp_group)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        inv_freq, scaling = rope_inv_freq(config, head_dim_of(config))
        self.rotary_emb = RotaryEmbedding(inv_freq, config.max_position_embeddings, scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope_step = self.rotary_emb.step(positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, self.rotary_emb, rope_step, ctx)
        hidden, _ = self.norm(hidden, residual)
        return hidden


# HF checkpoint name fragment -> (our fused parameter fragment, shard id)
_FUSED = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
)


class LlamaForCausalLM(nn.Module):
    """The Llama-family causal LM of one tensor-parallel rank.

    Parameters are allocated uninitialised (in the current default dtype and device); fill them
    with `load_weights`. `tp_group` is the torch.distributed group the collectives use when
    tp_size > 1 (None: the default group).
    """

    def __init__(self, hf_config, tp_rank: int = 0, tp_size: int = 1,
                 tp_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        model_type = getattr(hf_config, "model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(f"model_type {model_type!r} is not supported "
                                        f"({', '.join(SUPPORTED_MODEL_TYPES)} are)")
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} is outside [0, {tp_size})")
        self.config = hf_config
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.model = LlamaModel(hf_config, tp_rank, tp_size, tp_group)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size, tp_rank, tp_size, tp_group,
                                      tied_to=self.model.embed_tokens if self.tie_word_embeddings else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden_rows: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] of hidden rows [N, hidden] (complete on every rank)."""
        return self.lm_head(hidden_rows)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy full HF-named tensors into this rank's (sharded, fused) parameters.

        Returns the names of our parameters that received data. Unknown names raise KeyError;
        rotary caches and, for tied models, `lm_head.weight` are skipped.
        """
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue
            if hf_name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            name, shard_id = hf_name, None
            for frag, fused, sid in _FUSED:
                if frag in hf_name:
                    name, shard_id = hf_name.replace(frag, fused), sid
                    break
            param = params.get(name)
            if param is None:
                raise KeyError(f"checkpoint tensor {hf_name!r} has no matching parameter")
            param.weight_loader(param, tensor, shard_id)
            loaded.add(name)
        return loaded

    def missing_parameters(self, loaded: set[str]) -> list[str]:
        """Parameters `load_weights` has not filled (tied heads share the embedding's weight).
        Fused parameters count as loaded when any part arrived; checkpoints ship all parts."""
        return sorted(n for n, _ in self.named_parameters() if n not in loaded)


def hf_weight_shapes(config) -> dict[str, tuple[int, ...]]:
    """Names and FULL (unsharded) shapes of the tensors a Hugging Face checkpoint of `config` holds."""
    h, d = config.hidden_size, head_dim_of(config)
    nq, nkv, inter = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    model_type = getattr(config, "model_type", "llama")
    attention_bias = bool(getattr(config, "attention_bias", False))
    qkv_bias = attention_bias or model_type == "qwen2"
    mlp_bias = bool(getattr(config, "mlp_bias", False))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (nq * d, h)
        shapes[p + "self_attn.k_proj.weight"] = (nkv * d, h)
        shapes[p + "self_attn.v_proj.weight"] = (nkv * d, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, nq * d)
        if qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (nq * d,)
            shapes[p + "self_attn.k_proj.bias"] = (nkv * d,)
            shapes[p + "self_attn.v_proj.bias"] = (nkv * d,)
        if attention_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if model_type == "qwen3":
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            shapes[p + f"mlp.{proj}.weight"] = shape
            if mlp_bias:
                shapes[p + f"mlp.{proj}.bias"] = (shape[0],)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not getattr(config, "tie_word_embeddings", False):
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def num_parameters(config) -> int:
    return sum(math.prod(s) for s in hf_weight_shapes(config).values())


__all__ = ["LlamaForCausalLM", "RotaryEmbedding", "UnsupportedModelError", "hf_weight_shapes",
           "head_dim_of", "rope_parameters_of", "num_parameters", "SUPPORTED_MODEL_TYPES"]
