"""What the arena tests share: tiny model folders, a scripted contestant, an app on a loopback port.

(A plain module, not a conftest.py: tests/ has several conftest.py files that pytest imports under
one module name; tests/arena/ is on sys.path for the files in it.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

import llama4
from llama4.model import Transformer
from llama4.tokenizer.files import write_tiktoken_bpe
from serving import serving_app, tiny_args  # noqa: F401  (serving_app: re-exported for the arena tests)


def write_model(d: Path, seed: int = 0) -> Path:
    """A tiny random checkpoint (tests/serving.py's shape) with a byte-level tokenizer.model."""
    torch.manual_seed(seed)
    m = Transformer(tiny_args())
    m.init_weights(std=0.3)
    llama4.save(m, d)
    write_tiktoken_bpe(d / "tokenizer.model", {bytes([b]): b for b in range(256)})
    return d


class ScriptedContestant:
    """Answers every turn with ``reply`` in a few chunks (tests of what the page does with text)."""

    def __init__(self, reply: str, delay: float = 0.01):
        self.reply, self.delay, self.calls = reply, delay, []

    def start(self):
        pass

    def close(self):
        pass

    async def stream(self, messages, max_tokens):
        self.calls.append([dict(m) for m in messages])
        step = max(1, len(self.reply) // 4)
        for i in range(0, len(self.reply), step):
            await asyncio.sleep(self.delay)
            yield self.reply[i:i + step]


def sse_events(response) -> list[dict]:
    """The JSON events of a server-sent-event response (httpx, streamed or not)."""
    import json

    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            out.append(json.loads(line[6:]))
    return out
