"""Adaptive prompt filtering for online RL, as Meta describes Llama 4's: the pass rate of every
training prompt is re-estimated as training goes, and only medium-to-hard prompts are kept.

A prompt with a 0% pass rate gives a group of equal rewards (all wrong), a 100% one a group of
equal rewards (all right): both have zero advantage everywhere and teach nothing, so GRPO spends
its samples on the prompts in between. :class:`PromptPool` holds the training prompts:

* every prompt's pass rate is a running estimate over its most recent ``window`` samples (a
  sample "passes" when its verifier score is >= ``solved_at``), updated from each RL group
  (:meth:`update`) and wholesale by periodic re-estimation passes (:meth:`reestimate`: fresh
  samples from the current policy replace the history, so prompts dropped earlier can return);
* a prompt with at least ``min_samples`` samples is *kept* iff ``min_pass < rate < max_pass``
  (never 0% nor 100%; ``max_pass`` < 1 also drops the easy ones); unestimated prompts are
  candidates and may be drawn, their first group estimates them;
* the pool refills from the task generators (train split) whenever fewer than ``size`` prompts
  are kept or candidates (dropped prompts are remembered for re-estimation, the oldest forgotten
  beyond ``capacity``, so a pass costs at most ``capacity`` prompts); a task whose fresh prompts mostly turn out too easy (more than
  ``harder_at`` of them) moves on to its next difficulty level, a curriculum.

Everything :meth:`state_dict` returns is plain JSON; prompts are stored by their generator
coordinates (task, difficulty, seed, index) and rebuilt, so a resumed run draws the same prompts.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from llama4.tasks import Example, Task, get_task


@dataclass
class PromptStats:
    key: tuple  # (task, difficulty, seed, index): where the generator makes it again
    example: Example
    results: deque = field(default_factory=deque)  # 1 / 0 per recent sample
    draws: int = 0

    @property
    def n(self) -> int:
        return len(self.results)

    @property
    def rate(self) -> float | None:
        return sum(self.results) / len(self.results) if self.results else None


class PromptPool:
    """Training prompts from ``tasks`` with running pass-rate estimates; see the module docstring."""

    def __init__(self, tasks: list[str], size: int = 64, min_pass: float = 0.0, max_pass: float = 1.0,
                 min_samples: int = 4, window: int = 16, solved_at: float = 1.0, harder_at: float = 0.5,
                 difficulty: int | None = None, seed: int = 0, capacity: int | None = None):
        if not tasks:
            raise ValueError("no tasks given for the prompt pool")
        if not 0.0 <= min_pass < max_pass <= 1.0:
            raise ValueError(f"need 0 <= min_pass < max_pass <= 1, got min_pass={min_pass}, max_pass={max_pass}")
        if size < 1 or min_samples < 1 or window < min_samples:
            raise ValueError(f"need size >= 1 and 1 <= min_samples <= window, got size={size}, "
                             f"min_samples={min_samples}, window={window}")
        self.tasks: dict[str, Task] = {name: get_task(name) for name in tasks}
        self.size, self.min_pass, self.max_pass = size, min_pass, max_pass
        self.min_samples, self.window, self.solved_at, self.harder_at = min_samples, window, solved_at, harder_at
        self.level = {name: (difficulty if difficulty is not None else t.difficulties[0])
                      for name, t in self.tasks.items()}
        for name, t in self.tasks.items():
            t.check_difficulty(self.level[name])
        self.seed = seed
        self.capacity = capacity if capacity is not None else 4 * size  # prompts remembered, dropped ones included
        if self.capacity < size:
            raise ValueError(f"capacity {self.capacity} is smaller than the pool size {size}")
        self.batches = 0  # generator batches drawn so far (the next batch's seed)
        self.prompts: dict[tuple, PromptStats] = {}
        self.rng = random.Random(seed)
        self.dropped = {"too_easy": 0, "too_hard": 0}
        self._fresh: dict[str, list[bool]] = {name: [] for name in self.tasks}  # first verdicts, per task

    # -- status -------------------------------------------------------------------------------
    def verdict(self, p: PromptStats) -> str:
        """"candidate" (not estimated yet), "kept", "too_easy" or "too_hard"."""
        if p.n < self.min_samples:
            return "candidate"
        r = p.rate
        if r <= self.min_pass:
            return "too_hard"
        if r >= self.max_pass:
            return "too_easy"
        return "kept"

    def active(self) -> list[PromptStats]:
        return [p for p in self.prompts.values() if self.verdict(p) in ("candidate", "kept")]

    def kept_fraction(self) -> float:
        """Of the prompts estimated so far, the fraction kept (0 when none is estimated)."""
        est = [self.verdict(p) for p in self.prompts.values()]
        est = [v for v in est if v != "candidate"]
        return sum(v == "kept" for v in est) / len(est) if est else 0.0

    def stats(self) -> dict:
        verdicts = [self.verdict(p) for p in self.prompts.values()]
        rates = [p.rate for p in self.prompts.values() if p.rate is not None]
        return {"pool/kept_fraction": self.kept_fraction(), "pool/kept": verdicts.count("kept"),
                "pool/candidates": verdicts.count("candidate"), "pool/too_easy": verdicts.count("too_easy"),
                "pool/too_hard": verdicts.count("too_hard"),
                "pool/mean_pass_rate": sum(rates) / len(rates) if rates else 0.0,
                **{f"pool/difficulty/{t}": lvl for t, lvl in self.level.items()}}

    # -- drawing and refilling ----------------------------------------------------------------
    def refill(self) -> None:
        """Top the active prompts up to ``size`` with fresh train-split prompts, round-robin over tasks."""
        names = list(self.tasks)
        guard = 0
        while len(self.active()) < self.size:
            need = self.size - len(self.active())
            per_task = -(-need // len(names))
            for name in names:
                self._draw_batch(name, self.level[name], self.seed * 1_000_003 + self.batches, per_task)
                self.batches += 1
            guard += 1
            if guard > 1000:
                raise RuntimeError("prompt pool: the task generators keep returning prompts already in the pool")
        # dropped prompts stay for the re-estimation passes, the oldest forgotten beyond ``capacity``
        dropped = [k for k, p in self.prompts.items() if self.verdict(p) in ("too_easy", "too_hard")]
        for k in dropped[:max(0, len(self.prompts) - self.capacity)]:
            del self.prompts[k]

    def _draw_batch(self, name: str, difficulty: int, seed: int, n: int) -> None:
        for i, ex in enumerate(self.tasks[name].examples("train", n, seed=seed, difficulty=difficulty)):
            key = (name, difficulty, seed, i)
            if key not in self.prompts:
                self.prompts[key] = PromptStats(key, ex, deque(maxlen=self.window))

    def draw(self, n: int) -> list[PromptStats]:
        """``n`` distinct active prompts (refilling first), the least-drawn first, ties at random."""
        self.refill()
        pool = self.active()
        self.rng.shuffle(pool)
        pool.sort(key=lambda p: p.draws)
        chosen = pool[:n]
        for p in chosen:
            p.draws += 1
        return chosen

    # -- estimates ----------------------------------------------------------------------------
    def update(self, key: tuple, scores) -> str:
        """Add one group's verifier scores for prompt ``key``; returns its new verdict."""
        p = self.prompts[tuple(key)]
        was = self.verdict(p)
        p.results.extend(1 if s >= self.solved_at else 0 for s in scores)
        now = self.verdict(p)
        if was == "candidate" and now != "candidate":
            self._note_fresh(p, now)
        if now in self.dropped and was != now:
            self.dropped[now] += 1
        return now

    def _note_fresh(self, p: PromptStats, verdict: str) -> None:
        """Curriculum: if most fresh prompts of a task at its current level are too easy, go harder."""
        name, difficulty = p.key[0], p.key[1]
        if difficulty != self.level[name]:
            return
        seen = self._fresh[name]
        seen.append(verdict == "too_easy")
        levels = self.tasks[name].difficulties
        if len(seen) >= self.size // len(self.tasks) and sum(seen) / len(seen) > self.harder_at:
            i = levels.index(self.level[name])
            if i + 1 < len(levels):
                self.level[name] = levels[i + 1]
            seen.clear()

    def reestimate(self, sample_scores, per_prompt: int) -> None:
        """A re-estimation pass: ``sample_scores(examples, per_prompt) -> [[score] * per_prompt, ...]``
        (fresh samples from the current policy) replaces the history of every prompt in the pool,
        dropped ones included, so the kept set follows the policy as it learns."""
        prompts = list(self.prompts.values())
        if not prompts:
            return
        scores = sample_scores([p.example for p in prompts], per_prompt)
        if len(scores) != len(prompts):
            raise ValueError(f"re-estimation returned {len(scores)} score lists for {len(prompts)} prompts")
        for p, s in zip(prompts, scores):
            p.results.clear()
            p.results.extend(1 if x >= self.solved_at else 0 for x in s)

    # -- checkpointing ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"batches": self.batches, "level": dict(self.level), "dropped": dict(self.dropped),
                "rng": _rng_to_json(self.rng.getstate()), "fresh": {k: list(v) for k, v in self._fresh.items()},
                "prompts": [[list(p.key), list(p.results), p.draws] for p in self.prompts.values()]}

    def load_state_dict(self, sd: dict) -> None:
        self.batches, self.level, self.dropped = sd["batches"], dict(sd["level"]), dict(sd["dropped"])
        self.rng.setstate(_rng_from_json(sd["rng"]))
        self._fresh = {k: list(v) for k, v in sd["fresh"].items()}
        self.prompts = {}
        batches: dict[tuple, list[Example]] = {}
        for key, results, draws in sd["prompts"]:
            name, difficulty, seed, i = key
            group = (name, difficulty, seed)
            if group not in batches:
                n = 1 + max(k[3] for k, _, _ in sd["prompts"] if tuple(k[:3]) == group)
                batches[group] = self.tasks[name].examples("train", n, seed=seed, difficulty=difficulty)
            p = PromptStats(tuple(key), batches[group][i], deque(results, maxlen=self.window), draws)
            self.prompts[p.key] = p


def _rng_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_from_json(state):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


__all__ = ["PromptPool", "PromptStats"]
