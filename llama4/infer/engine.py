"""Continuous-batching engine: requests join and leave the running batch between decode steps.

Five small roles, after nano-vllm:
  * :class:`Request`   one sequence: prompt, sampling params, generated ids, state, a sink
  * scheduler          :meth:`Engine._schedule` moves waiting requests into free cache rows
  * cache manager      :class:`~llama4.infer.kv_cache.KVCache` (rows, iRoPE-bounded layers)
  * runner             :meth:`Engine._prefill_piece` / :meth:`Engine._decode` call the model
  * engine step        :meth:`Engine.step`: admit, one prefill piece, one decode step for all rows

A long prompt is prefilled one piece per step, so requests already decoding keep getting tokens
while it is read. The engine runs in one background thread (:meth:`start`); other threads only
:meth:`submit` and :meth:`abort`. Each request's ``sink(request, new_ids, finished)`` is called
from the engine thread; the server forwards it to its event loop.

A request may ask for log-probabilities (``logprobs``: of each generated token, with the top k;
``prompt_logprobs``: of each prompt token, from one plain forward over the prompt). Both are
computed here, on the engine thread, so no other thread ever runs the engine's model.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from llama4.infer.kv_cache import KVCache
from llama4.infer.sampling import Sampler, SamplingParams
from llama4.infer.score import TokenScores, next_token_scores, sequence_logprobs
from llama4.infer.step import DecodeStep

log = logging.getLogger("llama4.engine")


@dataclass
class EngineConfig:
    max_batch: int = 8  # rows decoded together
    max_context: int | None = None  # prompt + generated tokens per request; None: model.args.max_seq_len
    prefill_chunk: int = 2048  # tokens per prefill piece
    initial_capacity: int = 1024  # KV slots per row allocated up front (grows by doubling)
    compile: bool = False  # decode steps through torch.compile (llama4.infer.step)

    def __post_init__(self):
        for name in ("max_batch", "prefill_chunk", "initial_capacity"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive int, got {v!r}")
        if self.max_context is not None and (not isinstance(self.max_context, int) or self.max_context < 2):
            raise ValueError(f"EngineConfig.max_context must be an int >= 2 or None, got {self.max_context!r}")


Sink = Callable[["Request", list, bool], None]
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset = frozenset()
    sink: Sink | None = None
    id: int = field(default_factory=lambda: next(_ids))
    output: list[int] = field(default_factory=list)
    state: str = "waiting"  # waiting -> prefill -> running -> finished
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    row: int | None = None
    prefilled: int = 0
    pixel_values: torch.Tensor | None = None  # image tiles of a multimodal prompt (llama4.vision.prompt)
    embeds: torch.Tensor | None = None  # (1, T, D) the prompt's embeddings with the images merged, while prefilling
    aborted: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    logprobs: int | None = None  # score each generated token, with its top-k (k = this)
    prompt_logprobs: int | None = None  # score the prompt's tokens 1.. (k = this); max_tokens may be 0
    output_scores: list[TokenScores] = field(default_factory=list)  # one entry per emitted piece
    prompt_scores: TokenScores | None = None  # set before the first token is emitted

    @property
    def finished(self) -> bool:
        return self.state == "finished"


class Engine:
    def __init__(self, model, config: EngineConfig | None = None):
        self.model = model.eval()
        self.config = config or EngineConfig()
        self.max_context = self.config.max_context or model.args.max_seq_len
        p = next(model.parameters())
        self.device = p.device
        cap = min(self.config.initial_capacity, self.max_context)
        self.cache = KVCache.for_model(model, self.config.max_batch, cap, static=self.config.compile)
        self._step_fn = DecodeStep(model, compile=self.config.compile)
        self.sampler = Sampler(self.config.max_batch, self.device)
        self.last_tok = torch.zeros(self.config.max_batch, dtype=torch.long, device=self.device)
        self.rows: list[Request | None] = [None] * self.config.max_batch
        self.waiting: deque[Request] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"steps": 0, "decode_steps": 0, "prefill_pieces": 0, "max_running": 0, "aborted": 0}

    # --- public, thread-safe -----------------------------------------------------------------
    def submit(self, prompt: list[int], max_tokens: int, params: SamplingParams | None = None,
               stop_ids=(), sink: Sink | None = None, pixel_values: torch.Tensor | None = None,
               logprobs: int | None = None, prompt_logprobs: int | None = None) -> Request:
        """Queue a request; raises ValueError for a prompt or length the engine cannot serve.
        ``pixel_values``: the image tiles of a multimodal prompt (a `MultimodalTransformer` only).
        ``logprobs`` / ``prompt_logprobs``: top-k counts (0: the chosen token only), see Request."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if pixel_values is not None and not hasattr(self.model, "embed"):
            raise ValueError("this model has no vision tower; it cannot take images")
        if pixel_values is not None and prompt_logprobs is not None:
            raise ValueError("prompt log-probabilities of an image prompt are not supported")
        V = self.model.args.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < V for t in prompt):
            raise ValueError(f"prompt token ids must be ints in [0, {V})")
        for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if k is not None and (not isinstance(k, int) or k < 0):
                raise ValueError(f"{name} must be None or an int >= 0, got {k!r}")
        least = 0 if prompt_logprobs is not None else 1  # scoring a prompt needs no new token
        if not isinstance(max_tokens, int) or max_tokens < least:
            raise ValueError(f"max_tokens must be an int >= {least}, got {max_tokens!r}")
        if len(prompt) + max_tokens > self.max_context:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the "
                             f"context limit of {self.max_context} tokens")
        req = Request(list(prompt), max_tokens, params or SamplingParams(), frozenset(stop_ids), sink,
                      pixel_values=pixel_values, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        with self._lock:
            self.waiting.append(req)
            self._lock.notify()
        return req

    def abort(self, req: Request) -> None:
        """Stop a request at the next step boundary (its sink gets finished=True, reason "abort")."""
        with self._lock:
            req.aborted = True
            self._lock.notify()

    def start(self) -> "Engine":
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="llama4-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for req in list(self.waiting) + [r for r in self.rows if r is not None]:
            self._finish(req, "abort")

    def generate(self, prompt: list[int], max_tokens: int, params: SamplingParams | None = None,
                 stop_ids=()) -> Request:
        """Blocking convenience: submit and wait (the engine thread must be running)."""
        req = self.submit(prompt, max_tokens, params, stop_ids)
        req.done.wait()
        return req

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    # --- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.waiting and self.running == 0:
                    self._lock.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # keep serving: fail the requests of this step, free their rows
                log.exception("engine step failed")
                for req in [r for r in self.rows if r is not None]:
                    req.error = f"{type(e).__name__}: {e}"
                    self._finish(req, "error")

    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests, run one prefill piece, then one decode step for all rows."""
        self.stats["steps"] += 1
        self._schedule()
        for r, req in enumerate(self.rows):
            if req is not None and req.aborted:
                self._finish(req, "abort")
        prefilling = [r for r in self.rows if r is not None and r.state == "prefill"]
        if prefilling:
            self._prefill_piece(min(prefilling, key=lambda q: q.id))
        if any(r is not None and r.state == "running" for r in self.rows):
            self._decode()
        self.stats["max_running"] = max(self.stats["max_running"], self.running)

    def _schedule(self) -> None:
        with self._lock:
            for req in [q for q in self.waiting if q.aborted]:  # cancelled before they got a row
                self.waiting.remove(req)
                self._finish(req, "abort")
            while self.waiting and None in self.rows:
                req = self.waiting.popleft()
                if req.aborted:
                    self._finish(req, "abort")
                    continue
                row = self.rows.index(None)
                self.rows[row] = req
                req.row, req.state = row, "prefill"
                self.cache.reset(row)
                self.cache.reserve(len(req.prompt) + req.max_tokens)
                self.sampler.set_row(row, req.params)

    def _prefill_piece(self, req: Request) -> None:
        P = self.config.prefill_chunk
        s = req.prefilled
        if s == 0 and req.prompt_logprobs is not None:
            req.prompt_scores = sequence_logprobs(self.model, [req.prompt], req.prompt_logprobs)[0]
            if req.max_tokens == 0:
                self._finish(req, "length")
                return
        e = min(len(req.prompt), (s // P + 1) * P)
        tokens = torch.tensor([req.prompt[s:e]], device=self.device)
        if req.pixel_values is not None and req.embeds is None:  # the vision tower runs once per request
            req.embeds = self.model.embed(torch.tensor([req.prompt], device=self.device),
                                          req.pixel_values.to(self.device))
            req.pixel_values = None
        embeds = None if req.embeds is None else req.embeds[:, s:e]
        logits = self.cache.prefill(self.model, tokens, req.row, piece=P, embeds=embeds)
        req.prefilled = e
        if e == len(req.prompt):
            req.embeds = None
        self.stats["prefill_pieces"] += 1
        if e == len(req.prompt):
            tok = self.sampler.sample_rows(logits, [req.row])  # (1,)
            self.last_tok[req.row] = tok[0]
            req.state = "running"
            self.cache.set_decoding(req.row, True)
            if req.logprobs is not None:
                req.output_scores.append(next_token_scores(logits, tok, req.logprobs))
            self._emit(req, tok.tolist())

    def _decode(self) -> None:
        n = self.cache.n_rows()
        logits = self.cache.decode(self._step_fn, self.last_tok[:n].view(n, 1))
        tok = self.sampler(logits)
        self.last_tok[:n] = tok
        ids = tok.tolist()  # one read per step: the tokens every running request streams
        self.stats["decode_steps"] += 1
        for r in range(n):
            req = self.rows[r]
            if req is not None and req.state == "running" and self.cache.decoding[r]:
                if req.logprobs is not None:
                    req.output_scores.append(next_token_scores(logits[r:r + 1], tok[r:r + 1], req.logprobs))
                self._emit(req, [ids[r]])

    def _emit(self, req: Request, ids: list[int]) -> None:
        req.output.extend(ids)
        reason = None
        if ids and ids[-1] in req.stop_ids:
            reason = "stop"
        elif len(req.output) >= req.max_tokens:
            reason = "length"
        if reason is None:
            self._call_sink(req, ids, False)
        else:
            self._finish(req, reason, ids)

    def _finish(self, req: Request, reason: str, ids: list | None = None) -> None:
        if req.finished:
            return
        req.state, req.finish_reason = "finished", reason
        if reason == "abort":
            self.stats["aborted"] += 1
        if req.row is not None and self.rows[req.row] is req:
            self.cache.reset(req.row)
            self.sampler.set_row(req.row, None)
            self.rows[req.row] = None
        self._call_sink(req, ids or [], True)
        req.done.set()

    @staticmethod
    def _call_sink(req: Request, ids: list, finished: bool) -> None:
        if req.sink is not None:
            try:
                req.sink(req, ids, finished)
            except Exception:
                log.exception("request sink failed")


def wait_all(reqs: list[Request], timeout: float | None = None) -> bool:
    deadline = None if timeout is None else time.monotonic() + timeout
    for r in reqs:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not r.done.wait(left):
            return False
    return True
