"""A contestant: one model answering arena conversations, streamed as text.

The real one is a model folder on our continuous-batching engine (``llama4.infer.engine``): the
conversation is encoded in the Llama 4 chat format, submitted to the engine (which samples), and
the ids it emits are turned into text by the same incremental detokenizer the OpenAI server uses
(``llama4.infer.detok.TextStream``). Many battles at once share each model's engine batch.
Anything with ``start()``, ``close()`` and ``stream(messages, max_tokens)`` can stand in (the
tests script one that answers with markup).
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Protocol


class ContestantError(Exception):
    """A contestant could not answer (the message names no model: the battle is blind)."""


class Contestant(Protocol):
    def start(self) -> None: ...

    def close(self) -> None: ...

    def stream(self, messages: list[dict], max_tokens: int) -> AsyncIterator[str]: ...


class EngineContestant:
    """A model folder served by its own :class:`~llama4.infer.engine.Engine`."""

    def __init__(self, model_dir, max_batch: int = 8, max_context: int | None = None, dtype=None, device=None,
                 temperature: float | None = None, top_p: float | None = None):
        from llama4.infer.engine import Engine, EngineConfig
        from llama4.infer.model_dir import generation_defaults, load_model_dir
        from llama4.infer.sampling import SamplingParams

        model, self.tok, self.name = load_model_dir(model_dir, dtype=dtype, device=device)
        self.engine = Engine(model, EngineConfig(max_batch=max_batch, max_context=max_context))
        gen = generation_defaults(model_dir)  # the model's generation_config.json, as `llama4 serve` reads it
        self.params = SamplingParams(temperature=float(gen.get("temperature", 1.0) if temperature is None else temperature),
                                     top_p=float(gen.get("top_p", 1.0) if top_p is None else top_p),
                                     top_k=gen.get("top_k"))
        self.stops = list(gen.get("stop", self.tok.stop_tokens))

    def start(self) -> None:
        self.engine.start()

    def close(self) -> None:
        self.engine.shutdown()

    async def stream(self, messages: list[dict], max_tokens: int) -> AsyncIterator[str]:
        from llama4.infer.detok import TextStream
        from llama4.tokenizer.chat_format import encode_dialog_prompt

        prompt = encode_dialog_prompt(self.tok, messages)
        room = self.engine.max_context - len(prompt)
        if room < 1:
            raise ContestantError(f"the conversation ({len(prompt)} tokens) no longer fits a model's context "
                                  f"of {self.engine.max_context} tokens; start a new battle")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        req = self.engine.submit(prompt, min(max_tokens, room), self.params, self.stops,
                                 lambda r, ids, done: loop.call_soon_threadsafe(queue.put_nowait, (ids, done)))
        text = TextStream(self.tok, (), self.stops)
        try:
            while True:
                ids, done = await queue.get()
                delta = text.push(ids) + (text.flush() if done else "")
                if delta:
                    yield delta
                if done:
                    if req.finish_reason == "error":
                        raise ContestantError(f"generation failed: {req.error}")
                    return
        finally:
            if not req.finished:  # the page went away: free the engine row
                self.engine.abort(req)
