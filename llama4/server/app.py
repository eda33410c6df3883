"""OpenAI-compatible HTTP server: FastAPI routes and SSE streaming over the batching engine.

    /health  /v1/models  /v1/chat/completions  /v1/completions

Every request goes to the shared :class:`~llama4.infer.engine.Engine`, which batches whatever is
running (continuous batching); handlers only encode, wait on their own queue and decode. Every
client error is a 4xx with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama4.infer.detok import TextStream
from llama4.infer.engine import Engine
from llama4.infer.sampling import SamplingParams
from llama4.server import protocol as P
from llama4.tokenizer.chat_format import encode_dialog_prompt

log = logging.getLogger("llama4.server")
_FINISH = {"stop": "stop", "length": "length", "abort": "stop"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, P.ErrorResponse(
            error=P.ErrorDetail(message=message, type=type, param=param, code=code))


def _error(status: int, message: str, param=None, code=None, type="invalid_request_error") -> JSONResponse:
    return JSONResponse(APIError(status, message, param, code, type).body.model_dump(), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return "We could not parse the JSON body of your request: malformed JSON.", None, "invalid_json"
    if not errs:
        return "Invalid request.", None, "invalid_request"
    e = errs[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    if e.get("type") == "missing":
        msg = f"Missing required parameter: '{param}'."
    elif param:
        msg = f"Invalid value for '{param}': {msg}."
    return msg, param, "invalid_value" if e.get("type") != "missing" else "missing_required_parameter"


class _Choice:
    def __init__(self, index: int, prompt: list[int], stream: TextStream):
        self.index, self.prompt, self.stream = index, prompt, stream
        self.req = None
        self.text = ""
        self.finish: str | None = None


class Server:
    """Holds the engine, the tokenizer and the limits; builds the FastAPI app."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
                 default_max_tokens: int = 512):
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.api_key = api_key
        self.default_max_tokens = default_max_tokens
        self.max_images = 8  # per request: Llama 4 was post-trained with up to 8 (LLAMA4.md Part A)

    # --- validation ----------------------------------------------------------------------------
    def _check_common(self, req: P._Sampling) -> None:
        if req.model != self.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves "
                           f"'{self.model_name}'.", "model", "model_not_found")
        if req.presence_penalty or req.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported.",
                           "presence_penalty" if req.presence_penalty else "frequency_penalty", "unsupported_parameter")

    def _max_tokens(self, value: int | None, prompt_len: int, param: str, prompt_param: str) -> int:
        limit = self.engine.max_context
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your "
                           f"prompt has {prompt_len} tokens.", prompt_param, "context_length_exceeded")
        if value is None:
            return min(self.default_max_tokens, limit - prompt_len)
        if value < 1:
            raise APIError(400, f"Invalid '{param}': must be at least 1, got {value}.", param, "invalid_value")
        if prompt_len + value > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                           f"requested {prompt_len + value} tokens ({prompt_len} in the prompt, {value} "
                           f"in the completion).", param, "context_length_exceeded")
        return value

    def _params(self, req: P._Sampling) -> SamplingParams:
        return SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k or None,
                              seed=req.seed)

    def _dialog(self, messages: list[P.ChatMessage]) -> list[dict]:
        out = []
        for i, m in enumerate(messages):
            content = m.content
            if isinstance(content, list):
                if any(isinstance(p, P.ImagePart) for p in content) and not hasattr(self.engine.model, "vision_args"):
                    raise APIError(400, "Image inputs are not supported by this model (it has no vision tower).",
                                   f"messages.{i}.content", "unsupported_content")
                content = [{"type": "text", "text": p.text} if isinstance(p, P.TextPart) else
                           {"type": "image_url", "image_url": p.image_url.url if isinstance(p.image_url, P.ImageURL)
                            else p.image_url or ""} for p in content]
            role = "system" if m.role == "developer" else m.role
            out.append({"role": role, "content": content if content is not None else ""})
        return out

    # --- running requests ------------------------------------------------------------------------
    def _image_prompt(self, dialog: list[dict]):
        """Ids and pixel tiles of a dialog with images; a bad image is a 400 naming why."""
        from llama4.vision import ImageError
        from llama4.vision.prompt import ImageSpec, encode_prompt

        try:
            p = encode_prompt(self.tok, dialog, ImageSpec.for_model(self.engine.model, max_images=self.max_images),
                              allow_paths=False)
        except ImageError as e:
            raise APIError(400, f"invalid image: {e}", "messages", "invalid_image") from None
        return p.ids, p.pixel_values

    async def _run(self, prompts: list[list[int]], n: int, max_tokens: list[int], params: SamplingParams,
                   stop_ids, stop_strings, pixel_values=None) -> AsyncIterator[tuple[_Choice, str, bool]]:
        """Submits len(prompts) * n requests; yields (choice, new text, finished) as tokens come."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        choices = []
        for p_i, prompt in enumerate(prompts):
            for j in range(n):
                choices.append(_Choice(p_i * n + j, prompt, TextStream(self.tok, stop_strings, stop_ids)))

        def sink_for(choice):
            return lambda req, ids, finished: loop.call_soon_threadsafe(queue.put_nowait, (choice, ids, finished))

        try:
            for c in choices:
                seed = None if params.seed is None else params.seed + c.index
                p = SamplingParams(params.temperature, params.top_p, params.top_k, seed)
                try:
                    c.req = self.engine.submit(c.prompt, max_tokens[c.index // n], p, stop_ids, sink_for(c),
                                               pixel_values=pixel_values)
                except ValueError as e:
                    raise APIError(400, str(e), None, "invalid_value") from None
            left = len(choices)
            while left:
                c, ids, finished = await queue.get()
                if c.finish is not None:
                    continue
                delta = c.stream.push(ids)
                if c.stream.stopped and not finished:
                    self.engine.abort(c.req)
                    finished = True
                if finished:
                    delta += c.stream.flush()
                    if c.req.finish_reason == "error":
                        raise APIError(500, f"generation failed: {c.req.error}", None, "internal_error",
                                       "server_error")
                    c.finish = "stop" if c.stream.stopped else _FINISH.get(c.req.finish_reason, "stop")
                    left -= 1
                c.text += delta
                yield c, delta, finished
        finally:
            for c in choices:
                if c.req is not None and not c.req.finished:
                    self.engine.abort(c.req)

    @staticmethod
    def _usage(choices: list[_Choice], prompts: list[list[int]]) -> P.Usage:
        prompt_tokens = sum(len(p) for p in prompts)
        completion = sum(len(c.req.output) for c in choices if c.req is not None)
        return P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                       total_tokens=prompt_tokens + completion)

    async def chat(self, req: P.ChatCompletionRequest):
        self._check_common(req)
        if req.logprobs:
            raise APIError(400, "logprobs are not supported.", "logprobs", "unsupported_parameter")
        if req.tools:
            raise APIError(400, "tools are not supported by this server.", "tools", "unsupported_parameter")
        dialog, pixels = self._dialog(req.messages), None
        try:
            if any(isinstance(m["content"], list) and any(p["type"] == "image_url" for p in m["content"])
                   for m in dialog):
                prompt, pixels = await asyncio.to_thread(self._image_prompt, dialog)
            else:
                prompt = encode_dialog_prompt(self.tok, dialog)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), "messages", "invalid_value") from None
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(mt, len(prompt), param, "messages")
        params = self._params(req)
        rid, created = P.new_id("chatcmpl"), P.now()
        gen = self._run([prompt], req.n, [max_tokens], params, self.tok.stop_tokens, req.stop_strings, pixels)
        if not req.stream:
            choices = {}
            async for c, _, finished in gen:
                if finished:
                    choices[c.index] = c
            out = [P.ChatChoice(index=i, message=P.AssistantMessage(content=c.text), finish_reason=c.finish)
                   for i, c in sorted(choices.items())]
            return P.ChatCompletion(id=rid, created=created, model=self.model_name, choices=out,
                                    usage=self._usage(list(choices.values()), [prompt] * req.n))

        def chunk(choices=(), usage=None):
            return P.ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=list(choices),
                                         usage=usage).model_dump_json(exclude_none=False)

        async def events():
            seen = []
            for i in range(req.n):
                yield chunk([P.ChatChunkChoice(index=i, delta=P.Delta(role="assistant", content=""))])
            async for c, delta, finished in gen:
                seen.append(c)
                if delta:
                    yield chunk([P.ChatChunkChoice(index=c.index, delta=P.Delta(content=delta))])
                if finished:
                    yield chunk([P.ChatChunkChoice(index=c.index, delta=P.Delta(), finish_reason=c.finish)])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], self._usage(list({c.index: c for c in seen}.values()), [prompt] * req.n))

        return self._sse(events())

    async def completions(self, req: P.CompletionRequest):
        self._check_common(req)
        if req.echo or req.logprobs is not None or req.suffix is not None or (req.best_of or 1) != 1:
            raise APIError(400, "echo, logprobs, suffix and best_of are not supported.", None, "unsupported_parameter")
        raw = req.prompt
        if isinstance(raw, str):
            raw = [raw]
        elif raw and all(isinstance(t, int) for t in raw):
            raw = [raw]
        if not raw:
            raise APIError(400, "prompt must not be empty.", "prompt", "invalid_value")
        prompts = []
        V = self.engine.model.args.vocab_size
        for p in raw:
            if isinstance(p, str):
                prompts.append(self.tok.encode(p, bos=True))
            else:
                if not p or any(not 0 <= t < V for t in p):
                    raise APIError(400, f"prompt token ids must be non-empty and in [0, {V}).", "prompt",
                                   "invalid_value")
                prompts.append(list(p))
        max_tokens = [self._max_tokens(req.max_tokens, len(p), "max_tokens", "prompt") for p in prompts]
        params = self._params(req)
        rid, created = P.new_id("cmpl"), P.now()
        gen = self._run(prompts, req.n, max_tokens, params, [self.tok.eos_id], req.stop_strings)
        all_prompts = [p for p in prompts for _ in range(req.n)]
        if not req.stream:
            choices = {}
            async for c, _, finished in gen:
                if finished:
                    choices[c.index] = c
            out = [P.CompletionChoice(index=i, text=c.text, finish_reason=c.finish) for i, c in sorted(choices.items())]
            return P.Completion(id=rid, created=created, model=self.model_name, choices=out,
                                usage=self._usage(list(choices.values()), all_prompts))

        async def events():
            seen = {}
            async for c, delta, finished in gen:
                seen[c.index] = c
                if delta or finished:
                    yield P.Completion(id=rid, created=created, model=self.model_name, choices=[
                        P.CompletionChoice(index=c.index, text=delta, finish_reason=c.finish if finished else None)
                    ]).model_dump_json()
            if req.stream_options and req.stream_options.include_usage:
                yield P.Completion(id=rid, created=created, model=self.model_name, choices=[],
                                   usage=self._usage(list(seen.values()), all_prompts)).model_dump_json()

        return self._sse(events())

    @staticmethod
    def _sse(events: AsyncIterator[str]) -> StreamingResponse:
        async def body():
            try:
                async for e in events:
                    yield f"data: {e}\n\n"
            except APIError as e:  # headers are sent already: report in-band, as OpenAI does
                yield f"data: {e.body.model_dump_json()}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               default_max_tokens: int = 512, manage_engine: bool = True) -> FastAPI:
    """The FastAPI app. With ``manage_engine`` the engine thread starts and stops with the app."""
    srv = Server(engine, tokenizer, model_name, api_key, default_max_tokens)

    @asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.shutdown()

    app = FastAPI(title="llama4", lifespan=lifespan)
    app.state.server = srv

    @app.middleware("http")
    async def auth(request: HTTPRequest, call_next):
        if srv.api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            if not header:
                return _error(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                              None, "missing_api_key")
            if header != f"Bearer {srv.api_key}":
                return _error(401, "Incorrect API key provided.", None, "invalid_api_key")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body.model_dump(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        msg, param, code = _validation_message(exc)
        return _error(400, msg, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(exc.status_code, str(exc.detail), None, code)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(exc).__name__}", None, "internal_error", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": srv.model_name, "running": engine.running,
                "waiting": len(engine.waiting)}

    @app.get("/v1/models")
    async def models():
        return P.ModelList(data=[P.ModelCard(id=srv.model_name, created=P.now())])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != srv.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist.", "model", "model_not_found")
        return P.ModelCard(id=srv.model_name, created=P.now())

    @app.post("/v1/chat/completions")
    async def chat(req: P.ChatCompletionRequest):
        return await srv.chat(req)

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest):
        return await srv.completions(req)

    return app


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_batch: int = 8, max_context: int | None = None,
          dtype: str | None = None, device: str | None = None, default_max_tokens: int = 512,
          log_level: str = "info", compile: bool = False) -> None:
    """Load ``model_dir`` and serve it until interrupted (binds loopback unless told otherwise)."""
    import uvicorn

    from llama4.infer.engine import EngineConfig
    from llama4.infer.model_dir import load_model_dir

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use it", host)
    model, tok, name = load_model_dir(model_dir, dtype=dtype, device=device)
    engine = Engine(model, EngineConfig(max_batch=max_batch, max_context=max_context, compile=compile))
    app = create_app(engine, tok, model_name or name, api_key, default_max_tokens)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["APIError", "Server", "create_app", "serve"]
