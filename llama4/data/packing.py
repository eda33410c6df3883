"""Token shards as one memory-mapped stream, cut into fixed-length training sequences.

Documents are packed back to back (each already wrapped in BOS ... EOS by the shard writer), so
no token is padding. A sequence of length T is the window ``stream[s : s + T + 1]``: inputs are
its first T tokens, targets the last T. Document boundaries travel with every batch as
``doc_ids`` (which document of the row each position belongs to, counting from 0) and
``positions`` (index inside that document), so a model can keep attention within a document
(:meth:`Batch.document_mask`) and restart positions at each document if it wants to.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llama4.data.readers import CorpusError
from llama4.data.shards import read_manifest, shard_paths


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) int64 token ids
    targets: torch.Tensor  # (B, T) int64, inputs shifted left by one
    doc_ids: torch.Tensor  # (B, T) int32, document index within the row (0, 0, 1, 1, 1, 2...)
    positions: torch.Tensor  # (B, T) int32, position inside the document

    def document_mask(self) -> torch.Tensor:
        """(B, T, T) bool: query i may attend key j iff j <= i and both are in one document."""
        T = self.inputs.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]
        return same & causal


class TokenStream:
    """The shards of one split (optionally one language) of a prepared folder, concatenated."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", lang: str | None = None):
        manifest = read_manifest(data_dir)
        shards = [
            s for s in manifest["shards"]
            if s["split"] == split and (lang is None or s["lang"] == lang) and s["n_tokens"] > 0
        ]  # fmt: skip
        if not shards:
            what = f"split {split!r}" + (f", language {lang!r}" if lang else "")
            raise CorpusError(f"{data_dir}: no tokens for {what}")
        self.data_dir = Path(data_dir)
        self.names = [s["name"] for s in shards]
        self.tokenizer = manifest["tokenizer"]
        self._tokens, starts, bases = [], [], [0]
        for s in shards:
            tok_path, doc_path = shard_paths(data_dir, s["name"])
            for p, n in ((tok_path, s["n_tokens"] * 4), (doc_path, (s["n_docs"] + 1) * 8)):
                if not p.is_file() or p.stat().st_size != n:
                    raise CorpusError(f"{p}: missing or not {n} bytes long; prepare it again")
            self._tokens.append(np.memmap(tok_path, dtype=np.uint32, mode="r"))
            docs = np.fromfile(doc_path, dtype=np.uint64)[:-1].astype(np.int64)
            starts.append(docs + bases[-1])
            bases.append(bases[-1] + s["n_tokens"])
        self._bases = np.asarray(bases, dtype=np.int64)  # shard k spans [bases[k], bases[k+1])
        self.doc_starts = np.concatenate(starts)  # global start offset of every document
        self.n_tokens = int(self._bases[-1])

    def __len__(self) -> int:
        return self.n_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream, across shard ends."""
        out = np.empty(length, dtype=np.int64)
        k = int(np.searchsorted(self._bases, start, side="right")) - 1
        filled = 0
        while filled < length:
            lo = start + filled - int(self._bases[k])
            n = min(length - filled, len(self._tokens[k]) - lo)
            out[filled : filled + n] = self._tokens[k][lo : lo + n]
            filled += n
            k += 1
        return out

    def boundaries(self, starts: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """``(doc_ids, positions)`` of the windows ``[s, s + length)`` for each s in ``starts``."""
        pos = starts[:, None] + np.arange(length)[None, :]  # (B, L) global offsets
        doc = np.searchsorted(self.doc_starts, pos, side="right") - 1
        positions = pos - self.doc_starts[doc]
        return (doc - doc[:, :1]).astype(np.int32), positions.astype(np.int32)

    def batch(self, starts: np.ndarray, seq_len: int) -> Batch:
        """A :class:`Batch` of the windows of ``seq_len + 1`` tokens beginning at ``starts``."""
        rows = np.stack([self.read(int(s), seq_len + 1) for s in starts])
        doc_ids, positions = self.boundaries(np.asarray(starts, dtype=np.int64), seq_len)
        return Batch(
            inputs=torch.from_numpy(rows[:, :-1].copy()),
            targets=torch.from_numpy(rows[:, 1:].copy()),
            doc_ids=torch.from_numpy(doc_ids),
            positions=torch.from_numpy(positions),
        )
