"""What differs between chat and completions: the shape of the response.

``Server._respond`` (app.py) drives both the same way: ``response(choices, usage)`` when the
choices are collected, or ``opening()``, then ``chunks(choice, delta, finished)`` per engine
event, then ``usage_chunk(usage)`` when streamed. Log-probabilities go with the text they
belong to: each generated token's entry is sent once, in the chunk that releases its text. A
chat reply that is a tool call (``tools.py``) becomes ``tool_calls`` (``delta.tool_calls``,
streamed) with ``finish_reason`` ``"tool_calls"``.
"""

from __future__ import annotations

from llama4.infer.detok import TextStream
from llama4.server import protocol as P
from llama4.server.logprobs import GeneratedTokens, chat_logprobs, completion_logprobs, prompt_entries
from llama4.server.tools import CallStream, ToolPlan


class Choice:
    """One sequence being generated: its text so far and its tokens (for log-probabilities)."""

    def __init__(self, index: int, prompt: list[int], stream: TextStream, tokens: GeneratedTokens):
        self.index, self.prompt, self.stream, self.tokens = index, prompt, stream, tokens
        self.req = None  # the engine's Request
        self.text = ""
        self.finish: str | None = None

    def new_logprob_indices(self, final: bool) -> range:
        """The generated tokens not sent yet whose text has been released."""
        s = self.stream
        return self.tokens.releasable(len(s.text) if final else s.sent, final, cut=s.stopped)


class ChatShape:
    """Chat responses: ``message`` when collected, ``delta`` chunks when streamed."""

    def __init__(self, tok, model_name: str, n: int, logprobs: bool, tools: ToolPlan | None = None):
        self.tok, self.model, self.n, self.logprobs = tok, model_name, n, logprobs
        self.tools = tools or ToolPlan()
        self.calls: dict[int, CallStream] = {}  # per streamed choice
        self.id, self.created = P.new_id("chatcmpl"), P.now()

    def _logprobs(self, c: Choice, final: bool) -> P.ChatLogprobs | None:
        if not self.logprobs:
            return None
        stops = set(self.tok.stop_tokens)  # the end-of-turn token is not part of the message
        idx = [i for i in c.new_logprob_indices(final) if c.tokens.ids[i] not in stops]
        return chat_logprobs(self.tok, [c.tokens.ids[i] for i in idx], [c.req.output_scores[i] for i in idx])

    def response(self, choices: list[Choice], usage: P.Usage) -> P.ChatCompletion:
        out = []
        for c in choices:
            content, calls = self.tools.reply(c.text)
            message = P.AssistantMessage(content=content, tool_calls=calls or None)
            out.append(P.ChatChoice(index=c.index, message=message, finish_reason="tool_calls" if calls else c.finish,
                                    logprobs=self._logprobs(c, True)))
        return P.ChatCompletion(id=self.id, created=self.created, model=self.model, choices=out, usage=usage)

    def _chunk(self, choices=(), usage=None) -> str:
        return P.ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=list(choices),
                                     usage=usage).model_dump_json(exclude_none=False)

    def opening(self) -> list[str]:
        return [self._chunk([P.ChatChunkChoice(index=i, delta=P.Delta(role="assistant", content=""))])
                for i in range(self.n)]

    def chunks(self, c: Choice, delta: str, finished: bool) -> list[str]:
        out = []
        lp = self._logprobs(c, finished)
        calls = self.calls.setdefault(c.index, CallStream(self.tools))
        delta, tool_calls = calls.push(delta), []
        if finished:
            rest, tool_calls = calls.finish()
            delta += rest
        if delta or (lp is not None and lp.content):
            out.append(self._chunk([P.ChatChunkChoice(index=c.index, delta=P.Delta(content=delta), logprobs=lp)]))
        for k, tc in enumerate(tool_calls):  # OpenAI's order: the call's name first, then its arguments
            head = P.DeltaToolCall(index=k, id=tc.id, type="function",
                                   function=P.DeltaFunction(name=tc.function.name, arguments=""))
            args = P.DeltaToolCall(index=k, function=P.DeltaFunction(arguments=tc.function.arguments))
            out += [self._chunk([P.ChatChunkChoice(index=c.index, delta=P.Delta(tool_calls=[d]))])
                    for d in (head, args)]
        if finished:
            finish = "tool_calls" if tool_calls else c.finish
            out.append(self._chunk([P.ChatChunkChoice(index=c.index, delta=P.Delta(), finish_reason=finish)]))
        return out

    def usage_chunk(self, usage: P.Usage) -> str:
        return self._chunk([], usage)


class CompletionShape:
    """Completions: ``text`` (after the echoed prompt, with ``echo``) and the legacy ``logprobs``."""

    def __init__(self, tok, model_name: str, req: P.CompletionRequest, added: list[int], echo: list[str] | None):
        """``added[p]``: ids the server put before prompt p (a BOS); ``echo[p]``: prompt p's text."""
        self.tok, self.model, self.req, self.added, self.echo = tok, model_name, req, added, echo
        self.id, self.created = P.new_id("cmpl"), P.now()

    def _logprobs(self, c: Choice, final: bool) -> P.CompletionLogprobs | None:
        if self.req.logprobs is None:
            return None
        idx = c.new_logprob_indices(final)
        ids = [c.tokens.ids[i] for i in idx]
        scores = [c.req.output_scores[i] for i in idx]
        offsets = [c.tokens.starts[i] for i in idx]
        if self.echo is not None:  # no streaming with echo: the prompt's entries come once, first
            p_ids, p_scores, p_offsets = prompt_entries(self.tok, c.prompt, self.added[c.index // self.req.n],
                                                        c.req.prompt_scores)
            ids, scores, offsets = p_ids + ids, p_scores + scores, p_offsets + offsets
        return completion_logprobs(self.tok, ids, scores, offsets)

    def response(self, choices: list[Choice], usage: P.Usage) -> P.Completion:
        out = [P.CompletionChoice(index=c.index, text=(self.echo[c.index // self.req.n] if self.echo else "") + c.text,
                                  finish_reason=c.finish, logprobs=self._logprobs(c, True)) for c in choices]
        return P.Completion(id=self.id, created=self.created, model=self.model, choices=out, usage=usage)

    def opening(self) -> list[str]:
        return []

    def chunks(self, c: Choice, delta: str, finished: bool) -> list[str]:
        lp = self._logprobs(c, finished)
        if not (delta or finished or (lp is not None and lp.tokens)):
            return []
        return [P.Completion(id=self.id, created=self.created, model=self.model, choices=[
            P.CompletionChoice(index=c.index, text=delta, finish_reason=c.finish if finished else None, logprobs=lp)
        ]).model_dump_json()]

    def usage_chunk(self, usage: P.Usage) -> str:
        return P.Completion(id=self.id, created=self.created, model=self.model, choices=[],
                            usage=usage).model_dump_json()
