"""A small Llama-shaped model with dummy weights for GPU kernel tests (CUDA graphs vs eager).

Same call convention as the real model (`model(input_ids, positions, ctx)`,
`model.compute_logits(hidden)`), built only from our Triton ops and the attention backend, so the
graph tests do not depend on the model loader.
"""

from __future__ import annotations

import torch

from kernels.base import AttentionContext
from kernels.triton_ops import fused_add_rmsnorm, rmsnorm, rope_cos_sin_cache, rotary_embedding


class TinyLlama(torch.nn.Module):
    def __init__(self, *, vocab: int = 512, hidden: int = 256, layers: int = 2, num_q_heads: int = 4,
                 num_kv_heads: int = 2, head_dim: int = 64, inter: int = 512, dtype=torch.bfloat16,
                 device="cuda", seed: int = 0, eps: float = 1e-5):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def w(*shape, std=0.05):
            return torch.nn.Parameter((torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype),
                                      requires_grad=False)

        self.hq, self.hk, self.d, self.eps = num_q_heads, num_kv_heads, head_dim, eps
        self.embed = w(vocab, hidden, std=1.0)
        self.qkv = torch.nn.ParameterList([w(hidden, (num_q_heads + 2 * num_kv_heads) * head_dim) for _ in range(layers)])
        self.o = torch.nn.ParameterList([w(num_q_heads * head_dim, hidden) for _ in range(layers)])
        self.gate_up = torch.nn.ParameterList([w(hidden, 2 * inter) for _ in range(layers)])
        self.down = torch.nn.ParameterList([w(inter, hidden) for _ in range(layers)])
        self.norm1 = torch.nn.ParameterList([w(hidden, std=0.1) for _ in range(layers)])
        self.norm2 = torch.nn.ParameterList([w(hidden, std=0.1) for _ in range(layers)])
        self.final_norm = w(hidden, std=0.1)
        with torch.no_grad():
            for p in [*self.norm1, *self.norm2, self.final_norm]:
                p.add_(1.0)
        self.register_buffer("cos_sin", rope_cos_sin_cache(4096, head_dim, 10000.0, device=device))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        T = input_ids.shape[0]
        h = self.embed[input_ids]
        residual = None
        qd, kd = self.hq * self.d, self.hk * self.d
        for i in range(len(self.qkv)):
            if residual is None:
                residual, x = h, rmsnorm(h, self.norm1[i], self.eps)
            else:
                x = fused_add_rmsnorm(h, residual, self.norm1[i], self.eps)
            qkv = x @ self.qkv[i]
            q = qkv[:, :qd].view(T, self.hq, self.d)
            k = qkv[:, qd:qd + kd].view(T, self.hk, self.d)
            v = qkv[:, qd + kd:].view(T, self.hk, self.d)
            rotary_embedding(positions, q, k, self.cos_sin)
            attn = ctx.backend.forward(q, k, v, i, ctx.kv_cache, ctx.meta)
            h = attn.reshape(T, qd) @ self.o[i]
            x = fused_add_rmsnorm(h, residual, self.norm2[i], self.eps)
            gate, up = (x @ self.gate_up[i]).chunk(2, dim=-1)
            h = (torch.nn.functional.silu(gate) * up) @ self.down[i]
        return fused_add_rmsnorm(h, residual, self.final_norm, self.eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return (hidden @ self.embed.t()).float()
