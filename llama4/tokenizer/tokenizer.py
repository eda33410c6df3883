"""The Llama 4 tokenizer: byte-level BPE with the o200k split pattern and 2,048 special tokens.

Token-for-token identical to Meta's ``llama_models.llama4.tokenizer.Tokenizer``, including its
handling of very long inputs (see :func:`split_long_input`), but without its per-character
Python loop, so it runs at tiktoken's speed.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

from llama4.tokenizer.backends import HFJsonBackend, TiktokenBackend
from llama4.tokenizer.files import TokenizerFileError, read_tiktoken_bpe, sniff_format

# Meta encodes at most 400k characters per tiktoken call, and cuts runs of more than 25k
# consecutive whitespace or non-whitespace characters (tiktoken's BPE is quadratic in the
# length of one pre-token, openai/tiktoken#195). The cuts change the tokens of such runs, so we
# cut at exactly the same places to stay identical.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
# A run start is a character whose predecessor is of the other class (or the string start).
# Anchoring with the lookbehind keeps the scan linear: the repeat only runs from run starts.
# Python's \s is exactly str.isspace(), which Meta's loop uses.
_LONG_RUN = re.compile(
    r"(?<!\s)\s{%d,}|(?<!\S)\S{%d,}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1)
)


def split_long_input(text: str) -> list[str]:
    """Cut ``text`` where Meta's tokenizer cuts it: every 400k characters, then inside each of
    those chunks after every 25k characters of one unbroken whitespace / non-whitespace run."""
    if len(text) <= MAX_RUN_CHARS:
        return [text]
    pieces = []
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        chunk = text[start : start + MAX_ENCODE_CHARS]
        prev = 0
        for m in _LONG_RUN.finditer(chunk):
            for cut in range(m.start() + MAX_RUN_CHARS, m.end(), MAX_RUN_CHARS):
                pieces.append(chunk[prev:cut])
                prev = cut
        pieces.append(chunk[prev:])
    return pieces


def official_tokenizer_path() -> Path:
    """The official Llama 4 ``tokenizer.model`` shipped inside the ``llama-models`` package."""
    try:
        ref = resources.files("llama_models.llama4") / "tokenizer.model"
    except ModuleNotFoundError:
        raise TokenizerFileError(
            "the official Llama 4 tokenizer ships in the 'llama-models' package, which is not "
            "installed (pip install llama-models==0.3.0), or pass a path to a tokenizer file"
        ) from None
    path = Path(str(ref))
    if not path.is_file():
        raise TokenizerFileError(f"llama-models is installed but has no {path}")
    return path


class Tokenizer:
    """Encode text to ids and back.

    ``Tokenizer(path)`` reads a tiktoken ``tokenizer.model`` (Meta's or one from
    ``llama4 tokenizer train``) or a Hugging Face ``tokenizer.json``; the format is recognised by
    content. A folder is searched for ``tokenizer.model`` first, then ``tokenizer.json``.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            for name in ("tokenizer.model", "tokenizer.json"):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                raise TokenizerFileError(f"{path}: no tokenizer.model or tokenizer.json in folder")
        if not path.is_file():
            raise TokenizerFileError(f"tokenizer file not found: {path}")
        self.path = path
        self.format = sniff_format(path)
        if self.format == "hf_json":
            backend = HFJsonBackend(path)
        else:
            backend = TiktokenBackend(read_tiktoken_bpe(path), name=path.name)
        self._init(backend)

    @classmethod
    def from_ranks(cls, ranks: dict[bytes, int], name: str = "bpe") -> "Tokenizer":
        """A tokenizer from an in-memory ``{token_bytes: rank}`` vocabulary."""
        self = cls.__new__(cls)
        self.path, self.format = None, "tiktoken"
        self._ranks = ranks  # kept for pickling
        self._init(TiktokenBackend(ranks, name=name))
        return self

    def _init(self, backend) -> None:
        self._backend = backend
        self.special_tokens: dict[str, int] = dict(backend.special_tokens)
        self.n_words: int = backend.n_words
        sp = self.special_tokens
        self.bos_id: int = sp["<|begin_of_text|>"]
        self.eos_id: int = sp["<|end_of_text|>"]
        self.eot_id: int = sp["<|eot|>"]
        self.eom_id: int = sp["<|eom|>"]
        self.pad_id: int = sp["<|finetune_right_pad|>"]
        self.thinking_start_id: int | None = sp.get("<|reasoning_thinking_start|>")
        self.thinking_end_id: int | None = sp.get("<|reasoning_thinking_end|>")
        # Generation ends at any of these (same list and order as Meta's).
        self.stop_tokens: list[int] = [self.eos_id, self.eom_id, self.eot_id]
        self._id_to_special = {i: s for s, i in sp.items()}

    @property
    def vocab_size(self) -> int:
        return self.n_words

    def __len__(self) -> int:
        return self.n_words

    def __repr__(self) -> str:
        src = self.path if self.path is not None else "<in memory>"
        return f"Tokenizer({src}, n_words={self.n_words}, format={self.format})"

    # Pickle by source, not by the Rust objects, so data-pipeline workers can receive one.
    def __reduce__(self):
        if self.path is not None:
            return (Tokenizer, (str(self.path),))
        return (Tokenizer.from_ranks, (self._ranks,))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of ``text`` as ordinary text (special-token spellings are not special here)."""
        if type(text) is not str:
            raise TypeError(f"encode() needs a str, got {type(text).__name__}")
        pieces = split_long_input(text)
        if len(pieces) == 1:
            ids = self._backend.encode(pieces[0]) if text else []
        else:
            ids = [i for p in self._backend.encode_batch(pieces, 1) for i in p]
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, num_threads: int = 2
    ) -> list[list[int]]:
        """``[encode(t, bos, eos) for t in texts]``, with the engine's threads."""
        for t in texts:
            if type(t) is not str:
                raise TypeError(f"encode_batch() needs str items, got {type(t).__name__}")
        if any(len(t) > MAX_RUN_CHARS for t in texts):
            # Rare long documents go through the exact per-text path.
            out = [self.encode(t) for t in texts]
        else:
            out = self._backend.encode_batch(list(texts), num_threads)
        if bos or eos:
            head, tail = [self.bos_id] if bos else [], [self.eos_id] if eos else []
            out = [head + ids + tail for ids in out]
        return out

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.n_words):
            bad = next(i for i in ids if i < 0 or i >= self.n_words)
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.n_words})")
        return ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of ``ids`` (special tokens as their spelling); may end mid-character,
        which is what a streaming decoder needs."""
        return self._backend.decode_bytes(self._check_ids(ids))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid UTF-8 (a split multi-byte character) becomes U+FFFD, as in
        Meta's tokenizer."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def is_special(self, token_id: int) -> bool:
        return token_id in self._id_to_special

    def id_to_special(self, token_id: int) -> str | None:
        return self._id_to_special.get(token_id)


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """The official Llama 4 tokenizer (from the installed ``llama-models`` package, no network)
    when ``path`` is None; else the tokenizer file or model folder at ``path``."""
    return Tokenizer(official_tokenizer_path() if path is None else path)
