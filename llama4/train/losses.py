"""Training losses: next-token cross-entropy, and the MoE router's balance and z-losses.

Load balance, two ways (``TrainConfig.balance``):

* ``aux_loss``: the Switch/GShard loss ``E * sum_e f_e * P_e``. ``f_e`` is the fraction of the
  (token, slot) routing decisions that went to expert e (counts, no gradient) and ``P_e`` the
  mean router probability of e. Llama 4's router is a sigmoid per expert, not a softmax, so
  there is no probability over experts to average; we use DeepSeek-V3's normalised affinities
  ``p = s / sum(s)`` with ``s = sigmoid(logits)``, which sum to one like a softmax and whose
  gradient pushes down exactly the scores the router uses. The loss is 1 when routing is uniform.
* ``bias``: DeepSeek-V3's auxiliary-loss-free balancing. After each optimizer step every MoE
  layer's selection bias moves by ``gamma * sign(mean_load - load_e)``: overloaded experts get
  chosen less. The bias changes which experts are *selected*, never the routing weight.

The router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE) keeps the router logits small.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama4.model.moe import MoE


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss in float32. logits (B, T, V), targets (B, T) -> scalar."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def load_balance_loss(router_logits: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """Switch-style balance loss with sigmoid affinities normalised over experts.

    router_logits (N, E) with grad; tokens_per_expert (E,) counts of the top-k selections."""
    E = router_logits.shape[-1]
    s = torch.sigmoid(router_logits.float())  # (N, E)
    p = s / s.sum(-1, keepdim=True)
    P = p.mean(0)  # (E,)
    f = tokens_per_expert.float() / tokens_per_expert.sum().clamp(min=1)
    return E * (f * P).sum()


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]


def record_router_stats(model: nn.Module, on: bool = True) -> None:
    for _, m in moe_layers(model):
        m.record_router_stats = on
        if not on:
            m.router_logits = m.tokens_per_expert = None


def router_losses(layers: list[tuple[str, MoE]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (mean balance loss, mean z-loss over MoE layers, loads (n_moe, E) of this forward)."""
    bal, z, loads = [], [], []
    for _, m in layers:
        if m.router_logits is None:
            raise RuntimeError("router stats were not recorded; call record_router_stats(model) first")
        bal.append(load_balance_loss(m.router_logits, m.tokens_per_expert))
        z.append(router_z_loss(m.router_logits))
        loads.append(m.tokens_per_expert)
        m.router_logits = None  # drop the graph reference as soon as it is used
    return torch.stack(bal).mean(), torch.stack(z).mean(), torch.stack(loads)


@torch.no_grad()
def update_expert_bias(layers: list[tuple[str, MoE]], loads: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3: bias_e += rate * sign(mean load - load_e), per MoE layer. loads (n_moe, E)."""
    for (_, m), load in zip(layers, loads):
        load = load.float().to(m.expert_bias.device)
        m.expert_bias += rate * torch.sign(load.mean() - load)


def load_imbalance(loads: torch.Tensor) -> torch.Tensor:
    """max/mean of each row of expert loads (n_moe, E) -> (n_moe,); 1.0 is perfectly balanced."""
    loads = loads.float()
    return loads.max(-1).values / loads.mean(-1).clamp(min=1e-9)
