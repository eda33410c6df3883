"""Llama 4's special tokens and pre-tokenizer split pattern.

A tokenizer file (tiktoken format) holds only the learned byte-pair vocabulary; the 2,048
special tokens are implied and always sit right after it, in the order below. With the
official 200,000-token vocabulary this puts ``<|begin_of_text|>`` at 200000, ``<|eot|>`` at
200008, ``<|patch|>`` at 200092 (see shared/LLAMA4.md). Our own small tokenizers keep the same
names in the same order after their smaller vocabularies, so the chat format works unchanged.
"""

from __future__ import annotations

NUM_SPECIAL_TOKENS = 2048

# The o200k-style split pattern Llama 4 uses (Meta's ``Tokenizer.O200K_PATTERN``). It is also
# valid Oniguruma syntax, so the Hugging Face ``tokenizers`` library can run it unchanged.
SPLIT_PATTERN = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""  # noqa: E501
    r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""  # noqa: E501
    r"""|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _reserved(name: str, count: int, start: int = 0) -> list[str]:
    return [f"<|{name}_reserved_special_token_{i}|>" for i in range(start, start + count)]


_BASIC = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
]

# Offsets 5..79 (ids 200005..200079 with the official vocabulary).
_TEXT_POST_TRAIN = [
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|step|>",
    *_reserved("text_post_train", 6),
    "<|python_start|>",
    "<|python_end|>",
    "<|finetune_right_pad|>",
    *_reserved("text_post_train", 61, 8),
]

# Offsets 80..1133.
_VISION = [
    "<|image_start|>",
    "<|image_end|>",
    *_reserved("vision", 2),
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
    *_reserved("vision", 4, 2),
    "<|image|>",
    *_reserved("vision", 1, 6),
    "<|patch|>",
    *_reserved("vision", 1041, 7),
]

# Offsets 1134..1143.
_REASONING = [
    *[f"<|reasoning_reserved_special_token_{i}|>" for i in range(8)],
    "<|reasoning_thinking_start|>",
    "<|reasoning_thinking_end|>",
]


def special_token_names() -> list[str]:
    """All 2,048 special-token names in id order (offset 0 = ``<|begin_of_text|>``)."""
    named = _BASIC + _TEXT_POST_TRAIN + _VISION + _REASONING
    fill = [f"<|reserved_special_token_{i}|>" for i in range(NUM_SPECIAL_TOKENS - len(named))]
    names = named + fill
    assert len(names) == NUM_SPECIAL_TOKENS and len(set(names)) == NUM_SPECIAL_TOKENS
    return names


SPECIAL_TOKEN_NAMES: tuple[str, ...] = tuple(special_token_names())
