"""GPT-2's byte <-> printable-character map, in which byte-level BPE vocabularies
(``tokenizers`` models, Hugging Face ``tokenizer.json``) write their token strings."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Printable bytes map to themselves; the other 68 map to U+0100.. in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    out = {b: chr(b) for b in printable}
    k = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + k)
            k += 1
    return out


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_string_to_bytes(token: str) -> bytes:
    table = unicode_to_bytes()
    return bytes(table[c] for c in token)
