"""Incremental detokenization with stop strings, for streaming text.

Tokens arrive one or a few at a time; a multi-byte UTF-8 character may be split across tokens and a
stop string across several. :class:`TextStream` releases text only once it is final: complete
characters, and never the last ``len(longest stop) - 1`` characters, which could still turn out to
be the start of a stop string. When a stop string appears, the text is cut before it.
"""

from __future__ import annotations

from typing import Iterable


def split_utf8(data: bytes) -> tuple[bytes, bytes]:
    """(complete, incomplete tail): the tail is an unfinished multi-byte character at the end."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return (data[:-back], data[-back:]) if need > back else (data, b"")
    return data, b""


class TextStream:
    def __init__(self, tokenizer, stop: Iterable[str] = (), skip_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.skip = frozenset(skip_ids)
        self.text = ""  # all final text so far (cut at a stop string once one is found)
        self.sent = 0  # characters of self.text already released
        self.stopped = False
        self._pending = b""

    def push(self, ids: Iterable[int]) -> str:
        """Feed new token ids; returns the text that became final (possibly "")."""
        if self.stopped:
            return ""
        ids = [i for i in ids if i not in self.skip]
        if ids:
            done, self._pending = split_utf8(self._pending + self.tokenizer.decode_bytes(ids))
            self.text += done.decode("utf-8", errors="replace")
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: release everything left (a dangling partial character as U+FFFD)."""
        if not self.stopped and self._pending:
            self.text += self._pending.decode("utf-8", errors="replace")
            self._pending = b""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and not self.stopped:
            start = max(0, self.sent - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        end = len(self.text) if (final or self.stopped) else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:end]
        self.sent = end
        return out
