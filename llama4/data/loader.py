"""Deterministic, resumable training batches, and per-language validation batches.

The training stream is cut into ``n_windows = (n_tokens - 1) // seq_len`` non-overlapping
sequences. Each epoch visits all of them once in an order drawn from ``(seed, epoch)``; a step
takes the next ``batch_size * world_size`` of them and rank r keeps its own ``batch_size``. The
loader's whole state is ``{"epoch", "step"}`` plus the settings it was built with, as a plain
dict a training checkpoint can hold: resuming from it yields exactly the batches an
uninterrupted run would have produced.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from llama4.data.packing import Batch, TokenStream
from llama4.data.readers import CorpusError
from llama4.data.shards import read_manifest


class PackedLoader:
    def __init__(
        self,
        data_dir: str | os.PathLike,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        split: str = "train",
        lang: str | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.stream = TokenStream(data_dir, split, lang)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.n_windows = (self.stream.n_tokens - 1) // seq_len
        self.steps_per_epoch = self.n_windows // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise CorpusError(
                f"{data_dir}: {self.stream.n_tokens} tokens make {self.n_windows} sequences of "
                f"{seq_len}, fewer than one global batch ({batch_size} x {world_size})"
            )
        self.epoch, self.step = 0, 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(self.n_windows)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> Batch:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        order = self._epoch_order()
        g = self.batch_size * self.world_size
        lo = self.step * g + self.rank * self.batch_size
        windows = order[lo : lo + self.batch_size]
        self.step += 1
        return self.stream.batch(windows.astype(np.int64) * self.seq_len, self.seq_len)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "n_tokens": self.stream.n_tokens,
            "shards": list(self.stream.names),
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume. The data and settings must match the ones the state was saved with: the
        same position in a different stream would silently be a different run."""
        for key in ("seed", "batch_size", "seq_len", "world_size", "n_tokens", "shards"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise ValueError(
                    f"loader state does not match this loader: {key} is {state.get(key)!r} in the "
                    f"checkpoint but {mine!r} here"
                )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def val_languages(data_dir: str | os.PathLike) -> list[str]:
    """Languages that have a validation shard in a prepared folder."""
    langs = []
    for s in read_manifest(data_dir)["shards"]:
        if s["split"] == "val" and s["n_tokens"] > 0 and s["lang"] not in langs:
            langs.append(s["lang"])
    return langs


def val_batches(
    data_dir: str | os.PathLike,
    batch_size: int,
    seq_len: int,
    lang: str | None = None,
    max_batches: int | None = None,
) -> Iterator[Batch]:
    """The validation split (of one language, or all) in order, as consecutive sequences; the
    same batches every time, so losses are comparable across a run."""
    stream = TokenStream(data_dir, "val", lang)
    n = (stream.n_tokens - 1) // seq_len
    starts = np.arange(n, dtype=np.int64) * seq_len
    for k, lo in enumerate(range(0, n, batch_size)):
        if max_batches is not None and k >= max_batches:
            return
        yield stream.batch(starts[lo : lo + batch_size], seq_len)
