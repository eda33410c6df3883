"""GRPO's two pieces of arithmetic, as pure functions on tensors (no model, no trainer).

* :func:`group_advantages`: each completion's reward minus its group's mean (the G samples of one
  prompt), divided by the group's std (``scale="group"``, GRPO), the whole batch's std
  (``"batch"``, as Liu et al. recommend) or nothing (``"none"``, Dr. GRPO), with TRL's 1e-4 in
  the denominator so an all-equal group gets advantage 0, not NaN.
* :func:`grpo_loss`: PPO's clipped surrogate on the per-token importance ratio
  ``exp(logp - old_logp)`` (``1 - eps_low`` .. ``1 + eps_high``; DAPO's "clip-higher" when
  ``eps_high > eps_low``), plus ``beta`` times the k3 estimate of KL(policy || reference)
  ``exp(ref - logp) - (ref - logp) - 1``, reduced over the completion tokens by the normalisation
  TRL calls ``loss_type``:

  ``grpo``     mean over each sequence's tokens, then over sequences (length-biased: long wrong
               answers are punished less per token)
  ``bnpo``     sum over all tokens / number of tokens in this micro-batch
  ``dr_grpo``  sum over all tokens / (sequences x ``max_completion_length``): a constant, no length bias
  ``dapo``     sum over all tokens / tokens in the whole generation batch (``num_items``; default
               this micro-batch's), so every token weighs the same across accumulation

Written after TRL 1.13's ``GRPOTrainer._compute_loss`` (same formulas, same order of operations);
tests/posttrain/test_rl.py checks both functions against TRL's own code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: keeps an all-equal group's advantages at 0


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """(N,) advantages for (N,) rewards laid out as N / group_size consecutive groups."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}, got {scale!r}")
    rewards = torch.as_tensor(rewards, dtype=torch.float32) if not torch.is_tensor(rewards) else rewards
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1).repeat_interleave(group_size)
    adv = rewards - mean
    if scale == "none":
        return adv
    if scale == "group":
        std = (grouped.std(dim=1) if group_size > 1 else torch.zeros(grouped.shape[0], dtype=rewards.dtype,
                                                                     device=rewards.device))
        std = std.repeat_interleave(group_size)
    else:
        std = rewards.std().expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    return adv / (std + STD_EPS)


@dataclass
class GRPOLossOutput:
    loss: torch.Tensor  # scalar, differentiable through ``logp``
    metrics: dict  # floats: kl, clip_ratio/low, clip_ratio/high, clip_ratio/region, ratio_mean


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, loss_type: str = "dapo", eps_low: float = 0.2,
              eps_high: float | None = None, beta: float = 0.0, max_completion_length: int | None = None,
              num_items: float | torch.Tensor | None = None,
              importance_sampling_level: str = "token") -> GRPOLossOutput:
    """The GRPO loss of one micro-batch.

    ``logp``, ``old_logp``, ``ref_logp``: (B, T) per-token log-probs of the completion tokens under
    the policy being trained, the policy that sampled them (``None``: ``logp.detach()``, the one
    update per generation case) and the reference (``None`` unless ``beta`` > 0); ``advantages``
    (B,) or (B, T); ``mask`` (B, T), 1 on completion tokens. ``eps_high`` defaults to ``eps_low``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and mask {tuple(mask.shape)} differ in shape")
    if beta != 0.0 and ref_logp is None:
        raise ValueError("beta > 0 needs the reference log-probs (ref_logp)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
    eps_high = eps_low if eps_high is None else eps_high
    mask = mask.to(logp.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old_logp = logp.detach() if old_logp is None else old_logp

    log_ratio = logp - old_logp
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    if beta != 0.0:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        per_token = per_token + beta * kl

    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    else:  # dapo
        n = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=logp.dtype, device=logp.device)
        loss = (per_token * mask).sum() / n.clamp(min=1.0)

    with torch.no_grad():
        def masked_mean(x):
            if x.shape[1] == 1:
                return x.mean().item()
            return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()

        low = (ratio < 1 - eps_low) & (advantages < 0)
        high = (ratio > 1 + eps_high) & (advantages > 0)
        metrics = {"clip_ratio/low": masked_mean(low.float()), "clip_ratio/high": masked_mean(high.float()),
                   "clip_ratio/region": masked_mean((low | high).float()), "ratio_mean": masked_mean(ratio)}
        if beta != 0.0:
            metrics["kl"] = masked_mean(kl)
        elif ref_logp is not None:  # logged even when it does not enter the loss
            metrics["kl"] = masked_mean(torch.exp(ref_logp - logp) - (ref_logp - logp) - 1)
    return GRPOLossOutput(loss, metrics)


__all__ = ["group_advantages", "grpo_loss", "GRPOLossOutput", "LOSS_TYPES", "SCALES"]
