"""Llama 4's mixture of experts: sigmoid top-k router, routed SwiGLU experts, shared expert.

Routing, exactly as Meta and HF define it: top-k of the raw router logits, the routing weight is
sigmoid(selected logit) with no renormalisation, and it scales the expert *input* (SwiGLU is not
homogeneous, so scaling the output would be a different model). The k routed outputs are summed
and the always-on shared expert sees the unscaled input.

Only the selected experts compute: (token, expert) pairs are sorted by expert and each expert's
contiguous slice goes through one grouped matmul. ``impl="loop"`` is the readable reference that
visits the experts one by one; tests check both agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama4.model.args import ModelArgs
from llama4.model.layers import FeedForward


# Public since torch 2.10; the private op before that (CUDA only).
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if _grouped_mm is None:
        return False
    if x.device.type == "cuda":
        # The CUDA kernels are Hopper-class and bf16-only.
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    elif x.device.type != "cpu" or not hasattr(F, "grouped_mm"):
        return False
    # Every row stride must be a multiple of 16 bytes.
    return all(d * x.element_size() % 16 == 0 for d in w.shape[1:])


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked weights in ``x @ W`` layout (Meta's moe_w_*_eD_F)."""

    def __init__(self, dim: int, hidden_dim: int, n_experts: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))  # gate
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))  # down

    def forward(self, x: torch.Tensor, counts: torch.Tensor, impl: str = "grouped") -> torch.Tensor:
        # x: (M, D) rows sorted by expert; counts: (E,) rows per expert -> (M, D)
        w1, w2, w3 = self.w1, self.w2, self.w3
        if torch.is_autocast_enabled(x.device.type):
            # grouped_mm is on none of autocast's op lists: cast its operands as autocast casts a
            # matmul's (else the routed experts would run in fp32 under bf16 autocast)
            dt = torch.get_autocast_dtype(x.device.type)
            x, w1, w2, w3 = x.to(dt), w1.to(dt), w2.to(dt), w3.to(dt)
        if impl == "grouped" and _grouped_mm_ok(x, w1) and _grouped_mm_ok(x, w2):
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            h = F.silu(_grouped_mm(x, w1, offs=offs)) * _grouped_mm(x, w3, offs=offs)
            return _grouped_mm(h, w2, offs=offs)
        outs = []
        for e, xe in enumerate(x.split(counts.tolist())):
            outs.append((F.silu(xe @ w1[e]) * (xe @ w3[e])) @ w2[e])
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_experts = args.n_experts
        self.top_k = args.top_k
        self.impl = "grouped"  # or "loop": the per-expert reference path
        self.router = nn.Linear(args.dim, args.n_experts, bias=False)  # weight (E, D)
        self.experts = GroupedExperts(args.dim, args.expert_dim, args.n_experts)
        self.shared_expert = FeedForward(args.dim, args.expert_dim)
        # Training seams (both inert by default, so inference matches Meta and HF exactly):
        # a selection-only bias for auxiliary-loss-free balancing (DeepSeek-V3), updated by the
        # trainer from outside, and the last router logits / expert loads for balance losses.
        self.register_buffer("expert_bias", torch.zeros(args.n_experts), persistent=False)
        self.record_router_stats = False
        self.router_logits: torch.Tensor | None = None  # (N, E), set when recording
        self.tokens_per_expert: torch.Tensor | None = None  # (E,), set when recording

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (N, D) -> scores (N, k) in x.dtype, expert ids (N, k)
        logits = self.router(x)  # (N, E)
        # The bias only steers which experts are chosen; the weight is the unbiased logit's.
        top_ids = torch.topk(logits + self.expert_bias.to(logits.dtype), self.top_k, dim=-1).indices
        scores = torch.sigmoid(logits.gather(-1, top_ids).float()).to(x.dtype)
        if self.record_router_stats:
            self.router_logits = logits
            self.tokens_per_expert = torch.bincount(top_ids.reshape(-1), minlength=self.n_experts).detach()
        return scores, top_ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        scores, ids = self.route(x)
        if self.impl == "loop":
            routed = self._loop(x, scores, ids)
        elif self.impl == "gather":
            routed = self._gather(x, scores, ids)
        else:
            flat_ids = ids.reshape(-1)  # (N*k,)
            order = torch.argsort(flat_ids, stable=True)
            token = order // self.top_k  # source token of each sorted (token, expert) pair
            counts = torch.bincount(flat_ids, minlength=self.n_experts)
            routed_in = x[token] * scores.reshape(-1)[order].unsqueeze(-1)  # (N*k, D)
            routed_out = self.experts(routed_in, counts)
            routed = torch.zeros_like(x).index_add(0, token, routed_out.to(x.dtype))  # autocast: bf16 out
        return (self.shared_expert(x) + routed).view(shape)

    def _gather(self, x, scores, ids):
        # Decode-sized inputs: each (token, expert) pair multiplies its expert's weights, indexed
        # directly (gpt-fast's MoE). No sort and no data-dependent shapes, so it compiles.
        w = self.experts
        xin = x.unsqueeze(1) * scores.unsqueeze(-1)  # (N, k, D)
        h = F.silu(torch.einsum("nkd,nkdf->nkf", xin, w.w1[ids])) * torch.einsum("nkd,nkdf->nkf", xin, w.w3[ids])
        return torch.einsum("nkf,nkfd->nd", h, w.w2[ids])  # (N, D), the k outputs summed

    def _loop(self, x, scores, ids):
        out = torch.zeros_like(x)
        w = self.experts
        for e in range(self.n_experts):
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            if token.numel() == 0:
                continue
            xe = x[token] * scores[token, slot].unsqueeze(-1)
            out = out.index_add(0, token, ((F.silu(xe @ w.w1[e]) * (xe @ w.w3[e])) @ w.w2[e]).to(out.dtype))
        return out
