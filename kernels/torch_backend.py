"""Paged attention in plain torch: the CPU backend and the reference the GPU backends test against.

How a step runs (all index work happens once in `prepare`, every layer reuses it):
- Decode sequences (one new token each) are batched: their KV slots are gathered from the flat pool
  into a padded `[B, max_len, Hkv, D]` tensor with ONE `index_select`, and one
  `scaled_dot_product_attention` call with a key-padding mask covers the whole group. Grouped-query
  attention costs no copy: a decode query has one position, so the G query heads sharing a KV head
  are laid out as G query rows of that KV head (`[B, Hkv, G, D]`).
- Extend sequences (a prompt chunk, possibly on top of a cached prefix) run one SDPA each: a fresh
  prompt attends to its own new K/V with `is_causal=True`; a chunk after a prefix gathers its full
  KV and uses a causal mask shifted by the prefix length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from kernels.base import AttentionBatch, BaseAttentionBackend, KVCache


@dataclass
class _Extend:
    """One extend sequence: its rows [start, end) of the token dimension and how to attend."""

    start: int
    end: int
    slots: Optional[torch.Tensor]  # [seq_len] flat KV slots; None when there is no prefix
    mask: Optional[torch.Tensor]  # [q_len, seq_len] bool, True = attend; None when there is no prefix


@dataclass
class TorchAttentionMeta:
    """Per-step metadata built by `TorchAttentionBackend.prepare`.

    decode_rows: [Bd] token rows of the decode sequences (None when the step has none).
    decode_slots: [Bd * max_len] flat KV slots, row-major per sequence, padded with slot 0.
    decode_mask: [Bd, 1, 1, max_len] bool key-padding mask (True = real token).
    all_decode: every token of the step is a decode token, in order (no scatter needed).
    """

    out_cache_loc: torch.Tensor
    num_tokens: int
    decode_rows: Optional[torch.Tensor]
    decode_slots: Optional[torch.Tensor]
    decode_mask: Optional[torch.Tensor]
    decode_max_len: int
    all_decode: bool
    extends: list[_Extend]


class TorchAttentionBackend(BaseAttentionBackend):
    """Paged attention with torch ops only; works on any device torch supports.

    Constructor: (num_q_heads, num_kv_heads, head_dim, scale=None, device=..., **kw); extra
    keyword arguments meant for other backends (workspace sizes and the like) are accepted and
    ignored so `create_attention_backend` can pass one set of options to any backend.
    """

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, scale: Optional[float] = None,
                 device: torch.device | str = "cpu", **kw):
        if num_q_heads <= 0 or num_kv_heads <= 0 or num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a positive multiple of "
                             f"num_kv_heads ({num_kv_heads})")
        super().__init__(num_q_heads, num_kv_heads, head_dim, scale)
        self.device = torch.device(device)
        self.group = num_q_heads // num_kv_heads

    # ------------------------------------------------------------------ metadata (once per step)

    def prepare(self, batch: AttentionBatch) -> TorchAttentionMeta:
        q_lens, seq_lens = batch.q_lens_cpu, batch.seq_lens_cpu
        if len(q_lens) != len(seq_lens):
            raise ValueError("q_lens_cpu and seq_lens_cpu must have one entry per sequence")
        ps = batch.page_size
        dev = batch.kv_indices.device
        kv_indptr = batch.kv_indptr.to(torch.int64)
        kv_indices = batch.kv_indices.to(torch.int64)

        starts, row = [], 0
        for q in q_lens:
            starts.append(row)
            row += q
        decode = [b for b, q in enumerate(q_lens) if q == 1]
        extend = [b for b, q in enumerate(q_lens) if q > 1]

        decode_rows = decode_slots = decode_mask = None
        max_len = 0
        if decode:
            max_len = max(seq_lens[b] for b in decode)
            sel = torch.tensor(decode, dtype=torch.int64).to(dev)
            lens = torch.tensor([seq_lens[b] for b in decode], dtype=torch.int64).to(dev)
            pos = torch.arange(max_len, dtype=torch.int64, device=dev)
            valid = pos[None, :] < lens[:, None]  # [Bd, L]
            decode_slots = self._slots(kv_indptr[sel], kv_indices, pos, ps, valid).reshape(-1)
            decode_mask = valid[:, None, None, :]
            decode_rows = torch.tensor([starts[b] for b in decode], dtype=torch.int64).to(dev)

        extends = []
        for b in extend:
            q, s = q_lens[b], seq_lens[b]
            prefix = s - q
            if prefix < 0:
                raise ValueError(f"sequence {b}: seq_len {s} is shorter than its {q} new tokens")
            slots = mask = None
            if prefix > 0:
                pos = torch.arange(s, dtype=torch.int64, device=dev)
                slots = self._slots(kv_indptr[b:b + 1], kv_indices, pos, ps, None).reshape(-1)
                # new token i (absolute position prefix + i) sees keys 0..prefix + i
                qpos = torch.arange(prefix, s, dtype=torch.int64, device=dev)
                mask = pos[None, :] <= qpos[:, None]
            extends.append(_Extend(starts[b], starts[b] + q, slots, mask))

        return TorchAttentionMeta(
            out_cache_loc=batch.out_cache_loc.to(torch.int64), num_tokens=row,
            decode_rows=decode_rows, decode_slots=decode_slots, decode_mask=decode_mask,
            decode_max_len=max_len, all_decode=not extend, extends=extends)

    @staticmethod
    def _slots(page_start: torch.Tensor, kv_indices: torch.Tensor, pos: torch.Tensor, ps: int,
               valid: Optional[torch.Tensor]) -> torch.Tensor:
        """Flat slots [n, len(pos)] of positions `pos` for sequences whose page lists start at
        `page_start` ([n]); positions outside `valid` map to slot 0 (the reserved page)."""
        page_idx = page_start[:, None] + torch.div(pos, ps, rounding_mode="floor")[None, :]
        if valid is not None:
            page_idx = torch.where(valid, page_idx, torch.zeros_like(page_idx))
        slots = kv_indices[page_idx] * ps + (pos % ps)[None, :]
        if valid is not None:
            slots = torch.where(valid, slots, torch.zeros_like(slots))
        return slots

    # ------------------------------------------------------------------ one layer

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int,
                kv_cache: KVCache, meta: TorchAttentionMeta) -> torch.Tensor:
        if q.shape[0] != meta.num_tokens:
            raise ValueError(f"q has {q.shape[0]} tokens but the batch has {meta.num_tokens}")
        k_flat, v_flat = kv_cache.flat(layer)
        if k is None:  # already in the pool; the extend path below reads the new tokens' K/V
            k, v = k_flat[meta.out_cache_loc], v_flat[meta.out_cache_loc]
        else:
            kv_cache.store(layer, meta.out_cache_loc, k, v)
        if meta.all_decode:
            return self._decode(q, k_flat, v_flat, meta)
        out = torch.empty_like(q)
        if meta.decode_rows is not None:
            out.index_copy_(0, meta.decode_rows, self._decode(q.index_select(0, meta.decode_rows),
                                                              k_flat, v_flat, meta))
        for ext in meta.extends:
            out[ext.start:ext.end] = self._extend(q[ext.start:ext.end], k[ext.start:ext.end],
                                                  v[ext.start:ext.end], k_flat, v_flat, ext)
        return out

    def _decode(self, q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
                meta: TorchAttentionMeta) -> torch.Tensor:
        bd, hkv, d, g = q.shape[0], self.num_kv_heads, self.head_dim, self.group
        L = meta.decode_max_len
        keys = k_flat.index_select(0, meta.decode_slots).view(bd, L, hkv, d).transpose(1, 2)
        vals = v_flat.index_select(0, meta.decode_slots).view(bd, L, hkv, d).transpose(1, 2)
        # q heads are ordered kv-head-major (head h uses kv head h // g), so this view is exact
        qg = q.view(bd, hkv, g, d)
        out = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=meta.decode_mask, scale=self.scale)
        return out.reshape(bd, hkv * g, d)

    def _extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_flat: torch.Tensor,
                v_flat: torch.Tensor, ext: _Extend) -> torch.Tensor:
        qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, q_len, D]
        if ext.slots is None:
            kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=self.scale,
                                                 enable_gqa=self.group > 1)
        else:
            kh = k_flat.index_select(0, ext.slots).transpose(0, 1).unsqueeze(0)
            vh = v_flat.index_select(0, ext.slots).transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=ext.mask, scale=self.scale,
                                                 enable_gqa=self.group > 1)
        return out.squeeze(0).transpose(0, 1)


__all__ = ["TorchAttentionBackend", "TorchAttentionMeta"]
