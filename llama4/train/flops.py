"""Model FLOPs of one training token, for tokens/s -> MFU.

Counted the usual way (PaLM appendix B): a matmul with P weights costs 2P FLOPs per token forward
and 4P backward, so 6P for training, over the *active* weights (top-k routed experts, the shared
expert, the router, attention projections and the output head; the embedding lookup is free).
Attention adds, per layer and token, 2 * 2 * n_heads * head_dim * (keys the query sees) forward
(QK^T and AV), x3 for training. A chunked (RoPE) layer's query sees at most ``chunk`` keys; a
NoPE layer's sees every earlier key: causal averages are counted exactly, not as T/2 rounded.
"""

from __future__ import annotations

from llama4.model import ModelArgs, count_params


def mean_keys_seen(seq_len: int, chunk: int | None) -> float:
    """Average number of keys a query attends to under a causal (chunked) mask of ``seq_len``."""
    if chunk is None or chunk >= seq_len:
        return (seq_len + 1) / 2
    full, rest = divmod(seq_len, chunk)
    total = full * chunk * (chunk + 1) / 2 + rest * (rest + 1) / 2
    return total / seq_len


def train_flops_per_token(args: ModelArgs, seq_len: int) -> dict[str, float]:
    """``{"matmul": 6 * active matmul weights, "attention": ..., "total": ...}`` FLOPs per token."""
    c = count_params(args)
    matmul_params = c["active"] - args.vocab_size * args.dim  # the embedding table is a lookup
    attn = 0.0
    for i in range(args.n_layers):
        chunk = None if args.is_nope_layer(i) else args.attention_chunk_size
        attn += 4 * args.n_heads * args.hd * mean_keys_seen(seq_len, chunk)
    out = {"matmul": 6.0 * matmul_params, "attention": 3.0 * attn}
    out["total"] = out["matmul"] + out["attention"]
    return out
