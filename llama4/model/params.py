"""Parameter and KV-cache accounting, computed on the meta device (no weights allocated)."""

from __future__ import annotations

import torch

from llama4.model.args import ModelArgs, VisionArgs
from llama4.model.moe import MoE
from llama4.model.transformer import Transformer
from llama4.model.vision import VisionModel


def count_params(args: ModelArgs, vision: VisionArgs | None = None) -> dict[str, int]:
    """Total parameters and the ones active for one token (top-k of the routed experts).

    With ``vision`` the total also holds the vision tower (ViT, adapter) and the projector into
    the text width, reported again as ``vision``; ``text`` is the decoder alone. ``active`` stays
    the decoder's per-token figure: the vision tower runs once per image tile, not per token."""
    with torch.device("meta"):
        model = Transformer(args)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            routed = sum(p.numel() for p in m.experts.parameters())
            inactive += routed * (m.n_experts - m.top_k) // m.n_experts
    counts = {"total": total, "active": total - inactive}
    if vision is not None:
        with torch.device("meta"):
            tower = VisionModel(vision)
        n_vision = sum(p.numel() for p in tower.parameters()) + vision.output_dim * args.dim  # + projector
        counts = {"total": total + n_vision, "active": total - inactive, "text": total, "vision": n_vision}
    return counts


def kv_bytes_per_token(args: ModelArgs, dtype_bytes: int = 2) -> dict[str, int]:
    """KV bytes per context token: every layer (naive cache) vs the global (NoPE) layers only,
    which is what a long context costs once chunked layers keep just their chunk."""
    per_layer = 2 * args.n_kv_heads * args.hd * dtype_bytes
    n_global = sum(1 for i in range(args.n_layers)
                   if args.is_nope_layer(i) or args.attention_chunk_size is None)
    return {"all_layers": per_layer * args.n_layers, "global_layers": per_layer * n_global,
            "local_layer_bound": per_layer * (args.n_layers - n_global) * (args.attention_chunk_size or 0)}
