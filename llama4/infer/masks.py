"""Attention for one prefill piece against the KV cache, without an O(T x S) mask.

A piece of T new tokens at positions s..s+T-1 attends to ``n_old`` cached keys (all visible to
every new query: the whole history on NoPE layers, the current chunk's earlier keys on chunked
layers) plus the piece itself, causally. Materialising that as a boolean (T, n_old + T) mask
costs O(T x S) memory and runs SDPA's slow masked path; instead :class:`PieceMask` is a
``torch.Tensor`` subclass that *describes* the mask and, like PyTorch's own
``torch.nn.attention.bias.CausalBias``, intercepts ``F.scaled_dot_product_attention`` to run it
as two mask-free kernels merged by their log-sum-exp:

    out = softmax-merge( attn(q, k_old, v_old),  causal attn(q, k_new, v_new) )

On chunked layers a piece that crosses a chunk boundary is split: the queries up to the boundary
see the old keys, the rest sees only whole chunks of the piece (folded into the batch, as the
model's own no-cache path does). ``materialize()`` gives the plain boolean mask, which the tests
use as the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama4.model.attention import chunked_causal_attention


def _expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    # (B, n_kv, S, hd) -> (B, H, S, hd): kv head j serves q heads j*rep .. (j+1)*rep-1
    rep = n_heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                  block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output (B, H, T, hd) and its log-sum-exp (B, H, T) in float32.

    q: (B, H, T, hd), k/v: (B, n_kv, S, hd). ``causal`` needs T == S (top-left aligned).
    Uses the fused CPU flash kernel when on CPU; elsewhere an exact blockwise reference whose
    memory is O(block x S).
    """
    B, H, T, hd = q.shape
    n_kv = k.shape[1]
    if q.device.type == "cpu":
        if not causal and H != n_kv:
            # Every query sees every key: fold the query heads of one kv head into the query
            # axis, so the cache is read once per kv head and never copied.
            rep = H // n_kv
            qf = q.reshape(B, n_kv, rep * T, hd)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qf, k, v, 0.0, False)
            return out.reshape(B, H, T, hd), lse.reshape(B, H, T)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, _expand_kv(k, H), _expand_kv(v, H), 0.0, causal)
        return out, lse
    return attention_lse_reference(q, k, v, causal, block)


def attention_lse_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                            block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_lse` for any device: exact, blockwise over queries (memory O(block x S))."""
    B, H, T, hd = q.shape
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    scale = hd ** -0.5
    outs, lses = [], []
    for i in range(0, T, block):
        qi = q[:, :, i:i + block].float()
        s = (qi @ k.float().transpose(-1, -2)) * scale  # (B, H, b, S)
        if causal:
            rows = torch.arange(i, i + qi.shape[2], device=q.device)
            s = s.masked_fill(torch.arange(k.shape[2], device=q.device) > rows[:, None], float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        outs.append((torch.exp(s - lse.unsqueeze(-1)) @ v.float()).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def prefix_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_old: int) -> torch.Tensor:
    """q: (B, H, T, hd); k/v: (B, n_kv, n_old + T, hd). Query i sees keys [0, n_old + i]."""
    H, T = q.shape[1], q.shape[2]
    gqa = k.shape[1] != H
    if n_old == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if T == 1:  # a single new query sees every key: one kernel, no mask
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    o1, l1 = attention_lse(q, k[:, :, :n_old], v[:, :, :n_old], causal=False)
    o2, l2 = attention_lse(q, k[:, :, n_old:], v[:, :, n_old:], causal=True)
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m).unsqueeze(-1), torch.exp(l2 - m).unsqueeze(-1)  # (B, H, T, 1)
    return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(q.dtype)


class PieceMask(torch.Tensor):
    """The (1, 1, T, n_old + T) visibility of one prefill piece, computed without materialising.

    Keys are [n_old cached keys, then the T new ones]. The cached keys start at a chunk boundary
    on chunked layers (they are the current chunk's), at position 0 on global layers. Query i
    (position s + i) sees key j iff j <= n_old + i and, with ``chunk``, j // chunk == (n_old + i) // chunk.
    """

    @staticmethod
    def __new__(cls, n_old: int, T: int, chunk: int | None):
        return torch.Tensor._make_subclass(cls, torch.empty(0), False)

    def __init__(self, n_old: int, T: int, chunk: int | None):
        super().__init__()
        self.n_old, self.n_new, self.chunk = n_old, T, chunk

    def materialize(self, device: torch.device | str | None = None) -> torch.Tensor:
        i = torch.arange(self.n_new, device=device).unsqueeze(1) + self.n_old  # query, relative to key 0
        j = torch.arange(self.n_old + self.n_new, device=device).unsqueeze(0)
        ok = j <= i
        if self.chunk is not None:
            ok &= (j // self.chunk) == (i // self.chunk)
        return ok.view(1, 1, self.n_new, self.n_old + self.n_new)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n_old, T, C = self.n_old, self.n_new, self.chunk
        if C is None or n_old + T <= C:
            return prefix_causal_attention(q, k, v, n_old)
        t1 = C - n_old  # queries up to the first chunk boundary see the cached keys
        head = prefix_causal_attention(q[:, :, :t1], k[:, :, :C], v[:, :, :C], n_old)
        tail = chunked_causal_attention(q[:, :, t1:], k[:, :, C:], v[:, :, C:], C)
        return torch.cat([head, tail], dim=2)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            if kwargs.get("is_causal") or kwargs.get("dropout_p", 0.0) or kwargs.get("scale") is not None:
                raise ValueError("PieceMask supports plain SDPA only (no is_causal/dropout/scale)")
            return mask.attend(q, k, v)
        return super().__torch_function__(func, types, args, kwargs)

    def __repr__(self):
        return f"PieceMask(n_old={self.n_old}, n_new={self.n_new}, chunk={self.chunk})"
