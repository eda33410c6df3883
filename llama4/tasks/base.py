"""What every verifiable task shares: the example record, the task interface, held-out splits.

Splits never share a prompt. Each task keeps its splits apart twice over:

* **values**: what a prompt is about (a passage, a UDHR article, an operand pair, a harm topic)
  goes to one split by a stable hash of the value (:func:`split_of`), never by sampling one pool;
* **templates**: the instruction phrasings are dealt to the splits too (:func:`templates_for`),
  so a test prompt is worded in a way training never saw.

Examples are deterministic for ``(task, split, n, seed, difficulty)``: each draw uses its own
``random.Random`` seeded with a string (Python hashes string seeds with SHA-512, so the stream
does not depend on ``PYTHONHASHSEED``).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Sequence

SPLITS = ("train", "validation", "test")
# Share of values per split. Tasks with few values (30 UDHR articles) deal them explicitly.
SPLIT_WEIGHTS = (0.7, 0.15, 0.15)
_MAX_TRIES = 10_000


@dataclass(frozen=True)
class Example:
    task: str  # task name, e.g. "langid"
    split: str  # "train" | "validation" | "test"
    lang: str  # ISO 639-3 code of the language the example is about / in ("" if none)
    messages: tuple[dict, ...]  # ({"role": "system", ...}, {"role": "user", ...})
    answer: str  # the reference reply
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def prompt(self) -> str:
        """The rendered dialog as one string (what "splits never share a prompt" compares)."""
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in self.messages)


def stable_hash(*parts: object) -> int:
    """A 64-bit hash of ``parts`` that is the same on every machine and every run."""
    key = "\x1f".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha1(key).digest()[:8], "big")


def split_of(*key: object, weights: Sequence[float] = SPLIT_WEIGHTS) -> str:
    """The split a value belongs to, from a stable hash of ``key`` (include the task name in it
    so tasks draw independent partitions)."""
    u = stable_hash(*key) / 2**64
    acc = 0.0
    for name, w in zip(SPLITS, weights):
        acc += w
        if u < acc:
            return name
    return SPLITS[-1]


def deal(items: Sequence, *key: object) -> dict[str, list]:
    """Deal a small, fixed list of items (e.g. 30 articles) to the splits in proportion to
    :data:`SPLIT_WEIGHTS`, in the order of a stable hash, so every split gets some."""
    order = sorted(items, key=lambda it: stable_hash(*key, it))
    n = len(order)
    n_val = max(1, round(n * SPLIT_WEIGHTS[1]))
    n_test = max(1, round(n * SPLIT_WEIGHTS[2]))
    return {
        "test": sorted(order[:n_test]),
        "validation": sorted(order[n_test:n_test + n_val]),
        "train": sorted(order[n_test + n_val:]),
    }


def templates_for(templates: Sequence, split: str) -> list:
    """The instruction templates of one split: of every five, three train, one validation, one
    test (a task writes at least five)."""
    if len(templates) < 5:
        raise ValueError(f"a task needs >= 5 templates to hold some out, got {len(templates)}")
    pick = {"train": (0, 1, 2), "validation": (3,), "test": (4,)}[check_split(split)]
    return [t for i, t in enumerate(templates) if i % 5 in pick]


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def dialog(system: str, user: str) -> tuple[dict, ...]:
    """A Llama 4 chat dialog (encode it with ``llama4.tokenizer.chat_format``)."""
    return ({"role": "system", "content": system}, {"role": "user", "content": user})


class Task:
    """One verifiable task. Subclasses set the class attributes and implement :meth:`_draw`
    (one example for a split, from a seeded ``rng``) and :meth:`score` (the verifier)."""

    name: str = ""
    metric: str = "exact_match"
    description: str = ""
    difficulties: tuple[int, ...] = (1, 2, 3)
    # what the difficulty knob changes, one line per level (shown by `llama4 tasks list -v`)
    difficulty_help: str = ""

    def examples(self, split: str, n: int, seed: int = 0, difficulty: int = 1) -> list[Example]:
        check_split(split)
        self.check_difficulty(difficulty)
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        out = []
        for i in range(n):
            rng = random.Random(f"{self.name}|{split}|{seed}|{difficulty}|{i}")
            for _ in range(_MAX_TRIES):
                ex = self._draw(rng, split, difficulty)
                if ex is not None:
                    break
            else:  # a generator bug, not bad input: say which
                raise RuntimeError(f"task {self.name}: no {split} example after {_MAX_TRIES} draws")
            out.append(ex)
        return out

    def check_difficulty(self, difficulty: int) -> int:
        if difficulty not in self.difficulties:
            raise ValueError(
                f"task {self.name}: unknown difficulty {difficulty!r}; expected one of "
                f"{', '.join(map(str, self.difficulties))}"
            )
        return difficulty

    def _draw(self, rng: random.Random, split: str, difficulty: int) -> Example | None:
        """One example of ``split``, or None to draw again (a value of another split)."""
        raise NotImplementedError

    def score(self, example: Example, response: str) -> float:
        """The verifier: a score in [0, 1], higher is better."""
        raise NotImplementedError

    def extra_scores(self, example: Example, response: str) -> dict[str, float]:
        """Secondary metrics beside :attr:`metric` (e.g. exact match for translation)."""
        return {}

    def _example(self, split: str, lang: str, system: str, user: str, answer: str,
                 difficulty: int, **meta) -> Example:
        return Example(self.name, split, lang, dialog(system, user), answer,
                       {"difficulty": difficulty, **meta})

    def __repr__(self) -> str:
        return f"<Task {self.name} ({self.metric})>"
