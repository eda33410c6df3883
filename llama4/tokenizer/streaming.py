"""Streaming detokenization: text deltas as ids arrive, never splitting a UTF-8 character.

One token can end in the middle of a multi-byte character (CJK, emoji); decoding token by token
would print U+FFFD. The decoder holds incomplete bytes back until the next token completes them.
"""

from __future__ import annotations

import codecs

from llama4.tokenizer.tokenizer import Tokenizer


class StreamingDecoder:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The new complete text after ``token_id`` (possibly ``""``)."""
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id]))

    def flush(self) -> str:
        """Whatever is still held back, with an incomplete tail as U+FFFD (end of stream)."""
        return self._utf8.decode(b"", final=True)
