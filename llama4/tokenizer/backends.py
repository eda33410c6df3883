"""The two engines behind :class:`llama4.tokenizer.Tokenizer`.

* :class:`TiktokenBackend` runs a tiktoken-format vocabulary (Meta's ``tokenizer.model`` or one
  we trained) with tiktoken's Rust BPE.
* :class:`HFJsonBackend` runs a Hugging Face ``tokenizer.json`` with the ``tokenizers`` library,
  for model folders downloaded from the hub that carry no ``tokenizer.model``.

Both encode *ordinary* text only: text that spells a special token (``"<|eot|>"``) becomes the
bytes of that text, never the control id. Only the chat formatter inserts control ids.
"""

from __future__ import annotations

import os
from pathlib import Path

import tiktoken

from llama4.tokenizer.byte_level import token_string_to_bytes
from llama4.tokenizer.files import TokenizerFileError
from llama4.tokenizer.special_tokens import SPECIAL_TOKEN_NAMES, SPLIT_PATTERN


# The control tokens the rest of the package relies on; a tokenizer.json lacking any of them is
# not a Llama 4 tokenizer.
REQUIRED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|finetune_right_pad|>",
)


class TiktokenBackend:
    def __init__(self, ranks: dict[bytes, int], name: str):
        n_base = len(ranks)
        self.special_tokens = {tok: n_base + i for i, tok in enumerate(SPECIAL_TOKEN_NAMES)}
        self.n_words = n_base + len(SPECIAL_TOKEN_NAMES)
        self._enc = tiktoken.Encoding(
            name=name,
            pat_str=SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )

    def encode(self, text: str) -> list[int]:
        # encode_ordinary == Meta's encode(allowed_special=set(), disallowed_special=()) (specials
        # neither matched nor rejected) without the special-token scan.
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self._enc.decode_bytes(ids)


class HFJsonBackend:
    """A ``tokenizer.json`` run by the ``tokenizers`` library.

    Special tokens are the file's added tokens. ``encode_special_tokens = True`` makes the
    library treat their spellings in user text as ordinary text (its default would match them).
    """

    def __init__(self, path: str | os.PathLike):
        from tokenizers import Tokenizer as _HFTokenizer

        path = Path(path)
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for parse errors
            raise TokenizerFileError(f"{path}: not a readable tokenizer.json ({e})") from None
        tok.encode_special_tokens = True
        self._tok = tok
        added = tok.get_added_tokens_decoder()  # {id: AddedToken}
        self.special_tokens = {t.content: i for i, t in sorted(added.items()) if t.special}
        missing = [n for n in REQUIRED_SPECIAL_TOKENS if n not in self.special_tokens]
        if missing:
            raise TokenizerFileError(
                f"{path}: not a Llama 4 tokenizer.json: special tokens {missing[:4]} are missing"
            )
        self.n_words = tok.get_vocab_size(with_added_tokens=True)
        self._id_bytes: list[bytes] | None = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int) -> list[list[int]]:
        # The library parallelises with its own thread pool (RAYON_NUM_THREADS).
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode_bytes(self, ids: list[int]) -> bytes:
        # The library's decode() returns str with invalid UTF-8 already replaced; the raw bytes
        # (needed for streaming decode) come from the byte-level vocabulary.
        if self._id_bytes is None:
            self._id_bytes = _byte_level_table(self._tok, self.n_words)
        table = self._id_bytes
        return b"".join(table[i] for i in ids)


def _byte_level_table(tok, n_words: int) -> list[bytes]:
    """id -> bytes for a byte-level BPE vocabulary; added tokens are their UTF-8 spelling."""
    table = [b""] * n_words
    added = tok.get_added_tokens_decoder()
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        table[i] = added[i].content.encode("utf-8") if i in added else token_string_to_bytes(token)
    return table
