"""AdamW with parameter groups, and the learning-rate schedules.

Weight decay applies to the weight matrices (attention, FFN, experts, router, output head) and
not to norms, embeddings or biases. A schedule is a pure function of the step, so a resumed run
only needs the step to be back on the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``decay`` (matrices) and ``no_decay`` (norms, embeddings, biases)."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or id(p) in embeddings or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg, metap=None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, or over MetaP's per-layer groups when ``metap`` (a
    :class:`llama4.metap.MetaP`) is given. The fused/foreach kernels are deterministic on CPU."""
    groups = (param_groups(model, cfg.weight_decay) if metap is None
              else metap.param_groups(model, cfg.weight_decay, cfg.eps))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


@dataclass(frozen=True)
class Schedule:
    """Learning rate at optimizer step ``s`` (0-based): linear warmup over ``warmup`` steps, then

    * ``cosine``: cosine from ``lr`` down to ``lr * min_ratio`` at step ``total``;
    * ``wsd`` (warmup-stable-decay): ``lr`` until the last ``decay_fraction`` of the steps, then
      linear down to ``lr * min_ratio``; the stable phase can be extended after the fact;
    * ``constant``: ``lr`` after warmup.
    """

    kind: str
    lr: float
    total: int
    warmup: int
    min_ratio: float = 0.1
    decay_fraction: float = 0.2

    @classmethod
    def from_config(cls, cfg) -> "Schedule":
        return cls(cfg.schedule, cfg.lr, cfg.max_steps, min(cfg.warmup_steps, cfg.max_steps), cfg.min_lr_ratio,
                   cfg.decay_fraction)

    def __call__(self, s: int) -> float:
        if s < self.warmup:
            return self.lr * (s + 1) / self.warmup
        lo = self.lr * self.min_ratio
        if self.kind == "constant":
            return self.lr
        if self.kind == "cosine":
            span = max(1, self.total - self.warmup)
            t = min(1.0, (s - self.warmup) / span)
            return lo + 0.5 * (self.lr - lo) * (1 + math.cos(math.pi * t))
        if self.kind == "wsd":
            n_decay = max(1, round(self.decay_fraction * self.total))
            start = max(self.warmup, self.total - n_decay)
            if s < start:
                return self.lr
            t = min(1.0, (s - start) / max(1, self.total - start))
            return self.lr - (self.lr - lo) * t
        raise ValueError(f"unknown schedule {self.kind!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the scheduled LR; a group with an ``lr_mult`` (MetaP) gets ``lr * lr_mult``."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
