"""Token sampling that never reads a device value back (gpt-fast style).

Each row of a batch has its own temperature / top-p / top-k and optionally its own seeded
generator. Temperature 0 is greedy (argmax). Sampling from the filtered distribution uses the
exponential-race trick: argmax(p / E) with E ~ Exp(1) is a draw from p, so no
``torch.multinomial`` (which synchronises on CUDA) is needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int | None = None  # None or 0: no top-k filter
    seed: int | None = None

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be None or an int >= 0, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Samples one token per row from logits (n, V) for rows with the given params.

    The per-row parameters live on the device and are rebuilt only when the set of rows or their
    params change (:meth:`set_row`), not on every step.
    """

    def __init__(self, max_batch: int, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.params: list[SamplingParams | None] = [None] * max_batch
        self.generators: list[torch.Generator | None] = [None] * max_batch
        self.shared = torch.Generator(device=self.device)
        self.shared.seed()  # non-deterministic, without touching the global RNG
        self._tensors: dict[int, tuple] = {}

    def set_row(self, row: int, params: SamplingParams | None) -> None:
        self.params[row] = params
        gen = None
        if params is not None and params.seed is not None and not params.greedy:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(params.seed)
        self.generators[row] = gen
        self._tensors.clear()

    def _row_tensors(self, rows: tuple[int, ...]):
        if rows not in self._tensors:
            ps = [self.params[r] or SamplingParams() for r in rows]
            temp = torch.tensor([max(p.temperature, 1e-5) for p in ps], device=self.device)
            top_p = torch.tensor([p.top_p for p in ps], device=self.device)
            top_k = torch.tensor([p.top_k or 0 for p in ps], device=self.device)
            greedy = torch.tensor([p.greedy for p in ps], device=self.device)
            sampling = [i for i, p in enumerate(ps) if not p.greedy]
            filtered = any(p.top_p < 1 or p.top_k for p in ps if not p.greedy)
            self._tensors[rows] = (temp, top_p, top_k, greedy, sampling, filtered)
        return self._tensors[rows]

    def __call__(self, logits: torch.Tensor, rows: list[int] | None = None) -> torch.Tensor:
        """logits (n, V) of ``rows`` (default 0..n-1) -> tokens (n,) long, on the device, without
        synchronising."""
        rows = tuple(range(logits.shape[0]) if rows is None else rows)
        greedy_tok = logits.argmax(-1)
        temp, top_p, top_k, greedy, sampling, filtered = self._row_tensors(rows)
        if not sampling:
            return greedy_tok
        gens = [self.generators[rows[i]] for i in sampling]
        scaled = logits.float() / temp.unsqueeze(1)
        if filtered:
            return torch.where(greedy, greedy_tok, self._sample_filtered(scaled, top_p, top_k, sampling, gens))
        probs = torch.softmax(scaled, dim=-1)
        return torch.where(greedy, greedy_tok, (probs / self._noise(probs, sampling, gens)).argmax(-1))

    sample_rows = __call__

    def _sample_filtered(self, scaled, top_p, top_k, rows, gens):
        V = scaled.shape[-1]
        srt, idx = scaled.sort(dim=-1, descending=True)  # (n, V)
        probs = torch.softmax(srt, dim=-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token
        rank = torch.arange(V, device=scaled.device)
        k = torch.where(top_k > 0, top_k, V).unsqueeze(1)
        drop = (before >= top_p.unsqueeze(1)) | (rank >= k)  # the top token is always kept
        probs = torch.softmax(srt.masked_fill(drop, float("-inf")), dim=-1)
        choice = (probs / self._noise(probs, rows, gens)).argmax(-1, keepdim=True)
        return idx.gather(-1, choice).squeeze(-1)

    def _noise(self, probs: torch.Tensor, rows: list[int], gens: list) -> torch.Tensor:
        # Exp(1) noise; seeded rows draw from their own generator so their tokens do not depend
        # on which other requests share the batch.
        noise = torch.empty_like(probs).exponential_(1, generator=self.shared)
        for i, gen in zip(rows, gens):
            if gen is not None:
                noise[i].exponential_(1, generator=gen)
        return noise
