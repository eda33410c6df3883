"""Grouped-query attention in Llama 4's two kinds of layer (iRoPE).

* RoPE layers: rotary embedding, weightless QK-norm after it, causal attention restricted to the
  query's chunk of ``attention_chunk_size`` tokens (key k visible to query q iff k <= q and
  k // C == q // C).
* NoPE layers (every N-th): no position encoding, global causal attention, and inference-time
  temperature tuning q *= 1 + attn_scale * log1p(floor((p + 1) / floor_scale)).

The chunk rule is applied by folding the chunks into the batch dimension and running causal SDPA
on each: it costs less than full attention, where a boolean mask would cost more (PLATFORM.md).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from llama4.model.args import ModelArgs
from llama4.model.layers import apply_rope, rms_norm


class LayerKVCache(Protocol):
    """The cache hook: one object per layer, owned by the inference room.

    ``update`` stores this forward's new keys/values (B, n_kv, T, hd) and returns the keys/values
    the queries may attend to plus a boolean mask (B|1, 1, T, S) of what each query sees (None:
    every returned key is visible to every query). Where the new keys go is the cache's own
    business, not the layer's: whoever owns the cache chose the positions the model is called
    with and sets the cache up for that call.
    """

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


def temperature_scale(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Per-position query scale of NoPE layers (float32, same shape as positions)."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


def chunked_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """Causal attention within consecutive chunks of ``chunk`` tokens, starting at slot 0.

    q: (B, H, T, hd), k/v: (B, n_kv, T, hd) -> (B, H, T, hd). The tail is zero-padded to a whole
    chunk; padding sits after every real query so causality keeps it invisible.
    """
    B, H, T, hd = q.shape
    if T <= chunk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != H)
    n = -(-T // chunk)
    pad = n * chunk - T

    def fold(x):  # (B, h, T, hd) -> (B*n, h, chunk, hd)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        h = x.shape[1]
        return x.view(B, h, n, chunk, hd).transpose(1, 2).reshape(B * n, h, chunk, hd)

    out = F.scaled_dot_product_attention(fold(q), fold(k), fold(v), is_causal=True,
                                         enable_gqa=k.shape[1] != H)
    out = out.view(B, n, H, chunk, hd).transpose(1, 2).reshape(B, H, n * chunk, hd)
    return out[:, :, :T]


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
                        ) -> torch.Tensor:
    """Attention of one query per row (a decode step) with grouped KV heads: q (B, H, 1, hd),
    k/v (B, H_kv, S, hd), mask None or (B or 1, 1, 1, S). The H / H_kv query heads that share a KV
    head attend as that head's rows, so K and V are read once per KV head, in one small matrix
    product, rather than once per query head in vector products (what ``enable_gqa`` does)."""
    B, H, _, hd = q.shape
    out = F.scaled_dot_product_attention(q.reshape(B, k.shape[1], H // k.shape[1], hd), k, v, attn_mask=mask)
    return out.reshape(B, H, 1, hd)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.hd
        self.use_rope = not args.is_nope_layer(layer_id)
        self.chunk_size = args.attention_chunk_size if self.use_rope else None
        self.use_qk_norm = args.use_qk_norm and self.use_rope
        self.temperature_tuning = args.attn_temperature_tuning and not self.use_rope
        self.floor_scale = args.floor_scale
        self.attn_scale = args.attn_scale
        self.norm_eps = args.norm_eps
        # A non-default softmax scale (MetaP) is applied to q, so every SDPA path, cache and
        # mask object keeps the default 1/sqrt(head_dim) call.
        self.q_mult = None if args.softmax_scale is None else args.softmax_scale * args.hd ** 0.5
        self.wq = nn.Linear(args.dim, args.n_heads * args.hd, bias=args.attention_bias)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.hd, bias=args.attention_bias)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.hd, bias=args.attention_bias)
        self.wo = nn.Linear(args.n_heads * args.hd, args.dim, bias=args.attention_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
                cache: LayerKVCache | None = None) -> torch.Tensor:
        # x: (B, T, D); positions: (T,) or (B, T) absolute token positions
        B, T, _ = x.shape
        # view(..., -1, hd) keeps local head counts working under tensor parallelism
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim)  # (B, T, n_kv, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        if self.use_rope:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.use_qk_norm:
            q, k = rms_norm(q, self.norm_eps), rms_norm(k, self.norm_eps)
        if self.temperature_tuning:
            scale = temperature_scale(positions, self.floor_scale, self.attn_scale)
            scale = scale.view(-1, T, 1, 1) if scale.dim() == 2 else scale.view(1, T, 1, 1)
            q = (q * scale).to(q.dtype)
        if self.q_mult is not None:
            q = q * self.q_mult
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, T, hd)
        gqa = k.shape[1] != q.shape[1]

        if cache is not None:
            k, v, mask = cache.update(k, v)
            # exact type: a prefill piece's lazy mask (llama4.infer.masks.PieceMask) is a Tensor
            # subclass that routes SDPA to its own kernels
            if T == 1 and gqa and (mask is None or type(mask) is torch.Tensor):
                out = one_query_attention(q, k, v, mask)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif self.chunk_size is not None:
            out = chunked_causal_attention(q, k, v, self.chunk_size)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))
