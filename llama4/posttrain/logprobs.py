"""Summed completion log-probabilities, the quantity DPO and RL compare between policy and reference.

A batch holds prompt+completion sequences, right-padded, with a ``completion_mask`` that is 1 on
completion tokens and 0 on the prompt and the padding (TRL's ``DataCollatorForPreference`` layout;
DPO stacks ``[chosen; rejected]`` so one forward serves both). Right padding keeps every real
token's logits exact under causal attention, and the padded positions are masked out.

As TRL 1.13 computes it: ``selective_log_softmax(logits[:, :-1], ids[:, 1:])``, zeroed where
``completion_mask[:, 1:]`` is 0, summed over the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass
class CompletionBatch:
    """Right-padded prompt+completion ids and the mask of the completion tokens."""

    input_ids: torch.Tensor  # (B, T) long
    completion_mask: torch.Tensor  # (B, T) 0/1, 1 on completion tokens

    def to(self, device) -> "CompletionBatch":
        return CompletionBatch(self.input_ids.to(device), self.completion_mask.to(device))


def pad_completions(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                    pad_id: int, width: int | None = None) -> CompletionBatch:
    """Rows ``prompt + completion``, right-padded with ``pad_id`` to ``width`` (default: the longest)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    width = width or max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(list(p) + list(c), dtype=torch.long)
        mask[i, len(p):n] = 1
    return CompletionBatch(ids, mask)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)`` gathered at ``index`` without materialising the (B, T, V) result
    for full-precision logits: ``logit[index] - logsumexp(logits)``, one row at a time."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - lse
    # low precision: logsumexp loses too much; take the log-softmax row by row instead
    return torch.stack([torch.gather(row.float().log_softmax(-1), -1, idx.unsqueeze(-1)).squeeze(-1)
                        for row, idx in zip(logits, index)])


def completion_logps(logits: torch.Tensor, batch: CompletionBatch) -> torch.Tensor:
    """(B,) summed log-probs of the completion tokens given ``logits`` (B, T, V) of ``batch``."""
    per_token = selective_log_softmax(logits[:, :-1], batch.input_ids[:, 1:])
    mask = batch.completion_mask[:, 1:].bool()
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum(dim=1)


def sequence_logps(model: nn.Module, batch: CompletionBatch) -> torch.Tensor:
    """(B,) summed completion log-probs under ``model`` (one forward; gradients flow if enabled)."""
    logits = model(batch.input_ids)
    return completion_logps(logits.float() if logits.dtype != torch.float32 else logits, batch)


__all__ = ["CompletionBatch", "pad_completions", "selective_log_softmax", "completion_logps", "sequence_logps"]
