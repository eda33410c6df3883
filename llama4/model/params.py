"""Parameter and KV-cache accounting, computed on the meta device (no weights allocated)."""

from __future__ import annotations

import torch

from llama4.model.args import ModelArgs
from llama4.model.moe import MoE
from llama4.model.transformer import Transformer


def count_params(args: ModelArgs) -> dict[str, int]:
    """Total parameters and the ones active for one token (top-k of the routed experts)."""
    with torch.device("meta"):
        model = Transformer(args)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            routed = sum(p.numel() for p in m.experts.parameters())
            inactive += routed * (m.n_experts - m.top_k) // m.n_experts
    return {"total": total, "active": total - inactive}


def kv_bytes_per_token(args: ModelArgs, dtype_bytes: int = 2) -> dict[str, int]:
    """KV bytes per context token: every layer (naive cache) vs the global (NoPE) layers only,
    which is what a long context costs once chunked layers keep just their chunk."""
    per_layer = 2 * args.n_kv_heads * args.hd * dtype_bytes
    n_global = sum(1 for i in range(args.n_layers)
                   if args.is_nope_layer(i) or args.attention_chunk_size is None)
    return {"all_layers": per_layer * args.n_layers, "global_layers": per_layer * n_global,
            "local_layer_bound": per_layer * (args.n_layers - n_global) * (args.attention_chunk_size or 0)}
