"""Token log-probabilities in OpenAI's two shapes.

Completions (the legacy shape lm-eval's ``local-completions`` reads)::

    "logprobs": {"tokens": ["Hello", ","], "token_logprobs": [null, -2.1],
                 "top_logprobs": [null, {",": -2.1, "!": -1.3}], "text_offset": [0, 5]}

``top_logprobs`` holds the k most likely tokens plus the chosen one (so up to k + 1 entries, as
OpenAI documents); ``text_offset`` is where each token starts, in characters of the prompt
followed by the completion. Chat completions::

    "logprobs": {"content": [{"token": "Hi", "logprob": -0.3, "bytes": [72, 105],
                              "top_logprobs": [{"token": "Hi", "logprob": -0.3, "bytes": [72, 105]}]}]}

A token that is not valid UTF-8 on its own (part of a multi-byte character) is written
``"bytes:\\xe2\\x80"``, as OpenAI writes it; ``bytes`` always has the exact bytes.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable

from llama4.infer.detok import split_utf8
from llama4.infer.score import TokenScores
from llama4.server import protocol as P


def token_bytes(tok, token_id: int) -> bytes:
    return tok.decode_bytes([token_id])


def token_text(tok, token_id: int) -> str:
    b = token_bytes(tok, token_id)
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


class TextOffsets:
    """The character offset at which each pushed token starts in the decoded text. A token that
    ends mid-character starts the next token at that character; ``hidden`` tokens (a stop token,
    a BOS the server added) add no text."""

    def __init__(self, tok, hidden: Iterable[int] = (), start: int = 0):
        self.tok, self.hidden = tok, frozenset(hidden)
        self.chars, self._pending = start, b""

    def push(self, token_id: int, hidden: bool = False) -> int:
        start = self.chars
        if not hidden and token_id not in self.hidden:
            done, self._pending = split_utf8(self._pending + token_bytes(self.tok, token_id))
            self.chars += len(done.decode("utf-8", errors="replace"))
        return start


class GeneratedTokens:
    """A choice's generated tokens and where each starts in its text, and which of their
    log-probabilities have been sent (a stream sends each once, with the text it belongs to)."""

    def __init__(self, tok, hidden: Iterable[int], start: int = 0):
        self.ids: list[int] = []
        self.starts: list[int] = []
        self.base = start
        self._offsets = TextOffsets(tok, hidden, start)
        self._sent = 0

    def push(self, ids: list[int]) -> None:
        for i in ids:
            self.starts.append(self._offsets.push(i))
        self.ids += ids

    def releasable(self, text_chars: int, final: bool, cut: bool) -> range:
        """Indices of tokens not sent yet that now belong to the response: those starting
        inside the ``text_chars`` characters of text released so far, or, at the end, all of
        them but the ones after a stop string's cut (``cut``)."""
        if final and not cut:
            end = len(self.ids)
        else:
            end = bisect_left(self.starts, self.base + text_chars)
        r = range(self._sent, max(self._sent, end))
        self._sent = max(self._sent, end)
        return r


def completion_logprobs(tok, ids: list[int], scores: list[TokenScores | None], offsets: list[int]) -> P.CompletionLogprobs:
    """``scores[i]`` is token i's one-entry TokenScores, or None (a prompt's first token)."""
    tops: list[dict[str, float] | None] = []
    for token_id, s in zip(ids, scores):
        if s is None:
            tops.append(None)
            continue
        top = {token_text(tok, t): lp for t, lp in zip(s.top_ids[0].tolist(), s.top_logprobs[0].tolist())}
        top.setdefault(token_text(tok, token_id), s.logprobs[0].item())
        tops.append(top)
    return P.CompletionLogprobs(tokens=[token_text(tok, i) for i in ids],
                                token_logprobs=[None if s is None else s.logprobs[0].item() for s in scores],
                                top_logprobs=tops, text_offset=list(offsets))


def _top(tok, token_id: int, logprob: float) -> P.TopLogprob:
    return P.TopLogprob(token=token_text(tok, token_id), logprob=logprob, bytes=list(token_bytes(tok, token_id)))


def chat_logprobs(tok, ids: list[int], scores: list[TokenScores]) -> P.ChatLogprobs:
    content = []
    for token_id, s in zip(ids, scores):
        t = _top(tok, token_id, s.logprobs[0].item())
        content.append(P.ChatTokenLogprob(**t.model_dump(), top_logprobs=[
            _top(tok, i, lp) for i, lp in zip(s.top_ids[0].tolist(), s.top_logprobs[0].tolist())]))
    return P.ChatLogprobs(content=content)


def prompt_entries(tok, prompt: list[int], hidden: int, scores: TokenScores | None):
    """(ids, per-token scores, offsets) of an echoed prompt whose first ``hidden`` tokens (the
    BOS the server added to a text prompt) are not part of its text."""
    offsets = TextOffsets(tok)
    starts = [offsets.push(t, hidden=i < hidden) for i, t in enumerate(prompt)]
    per_token: list[TokenScores | None] = [None] * len(prompt)
    if scores is not None:
        for i in range(1, len(prompt)):
            per_token[i] = scores[i - 1:i]
    return list(prompt), per_token, starts
