"""Train our own byte-level BPE for small models, in Llama 4's tokenizer format.

The ``tokenizers`` library learns the merges (with Llama 4's split pattern, so pre-tokens are
the same as the official tokenizer's). We write the result as a tiktoken file: each learned
token with its rank, single bytes first and then merges in the order they were learned, which is
the order tiktoken's rank-greedy BPE needs. The 2,048 special tokens keep their names and order
after the learned vocabulary, so ``--vocab-size 8192`` gives 6,144 learned tokens and
``<|begin_of_text|>`` = 6144, and the chat format works unchanged.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

from llama4.tokenizer.byte_level import token_string_to_bytes
from llama4.tokenizer.files import write_tiktoken_bpe
from llama4.tokenizer.special_tokens import NUM_SPECIAL_TOKENS, SPLIT_PATTERN
from llama4.tokenizer.tokenizer import Tokenizer

N_BYTES = 256
MIN_VOCAB_SIZE = NUM_SPECIAL_TOKENS + N_BYTES + 1  # at least one merge


def _nonempty(texts: Iterable[str], seen: list[int]) -> Iterator[str]:
    for t in texts:
        if not isinstance(t, str):
            raise TypeError(f"BPE training needs str texts, got {type(t).__name__}")
        if t:
            seen[0] += len(t)
            yield t


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> dict[bytes, int]:
    """Learn ``vocab_size - 2048`` byte-level BPE tokens from ``texts``; returns tiktoken ranks.

    ``vocab_size`` is the model's full vocabulary, special tokens included.
    """
    from tokenizers import Regex, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab size {vocab_size} is too small: Llama 4's {NUM_SPECIAL_TOKENS} special tokens "
            f"and the {N_BYTES} byte tokens already take {NUM_SPECIAL_TOKENS + N_BYTES}; use at "
            f"least {MIN_VOCAB_SIZE} (8192 or more is sensible)"
        )
    n_learned = vocab_size - NUM_SPECIAL_TOKENS
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=n_learned,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    seen = [0]
    hf.train_from_iterator(_nonempty(texts, seen), trainer=trainer)
    if seen[0] == 0:
        raise ValueError("the training corpus is empty: no text to learn a tokenizer from")

    vocab = hf.get_vocab()  # {byte-level str: id}; the trainer numbers merges in learned order
    tokens = [token_string_to_bytes(s) for s, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    singles = [bytes([b]) for b in range(N_BYTES)]
    merged = [t for t in tokens if len(t) > 1]
    ranks = {t: r for r, t in enumerate(singles + merged)}
    if len(ranks) != n_learned:
        raise ValueError(
            f"the corpus is too small for vocab size {vocab_size}: only {len(ranks)} tokens could "
            f"be learned (needed {n_learned}; min_frequency={min_frequency}); use a smaller "
            "vocab size or more text"
        )
    return ranks


def train_tokenizer_file(
    texts: Iterable[str],
    vocab_size: int,
    out: str | os.PathLike,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train, write ``out`` (tiktoken format, atomically), and return the loaded tokenizer."""
    ranks = train_bpe(texts, vocab_size, min_frequency, show_progress)
    write_tiktoken_bpe(out, ranks)
    tok = Tokenizer(out)
    assert tok.n_words == vocab_size
    return tok
