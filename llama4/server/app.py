"""OpenAI-compatible HTTP server: FastAPI routes and SSE streaming over the batching engine.

    /health  /v1/models  /v1/chat/completions  /v1/completions
    /tokenizer_info  /tokenize  /detokenize          (vLLM's tokenizer routes, at the root)

Every request goes to the shared :class:`~llama4.infer.engine.Engine`, which batches whatever is
running (continuous batching); handlers only encode, wait on their own queue and decode. Chat and
completions share one path (:meth:`Server._respond`): submit every choice, then either collect
the choices into one response or stream their deltas as server-sent events; only the shape of
the response (``shapes.py``) differs; tools (``tools.py``) change the chat prompt and how a
reply is read. Log-probabilities are computed on
the engine thread (``Engine.submit(logprobs=, prompt_logprobs=)``). Every client error is a 4xx
with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}`` (``errors.py``).
"""

from __future__ import annotations

import asyncio
import hmac
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
from llama4.server import openapi
from llama4.server import protocol as P
from llama4.server import tokenize as T
from llama4.server import tools as TL
from llama4.server.errors import APIError, check_range, error_response, validation_error
from llama4.server.logprobs import GeneratedTokens
from llama4.server.shapes import ChatShape, Choice, CompletionShape
from llama4.tokenizer.chat_format import encode_dialog_prompt

log = logging.getLogger("llama4.server")
_FINISH = {"stop": "stop", "length": "length", "abort": "stop"}
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits
MAX_CHAT_TOP_LOGPROBS = 20


class Server:
    """Holds the engine, the tokenizer and the limits; builds the responses."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
                 default_max_tokens: int = 512, generation: dict | None = None):
        self.engine, self.tok, self.model_name = engine, tokenizer, model_name
        self.api_key = api_key
        self.default_max_tokens = default_max_tokens
        # what a request that sets no temperature / top_p / top_k gets, and where chat stops
        # (``llama4.infer.model_dir.generation_defaults``: the model's generation_config.json)
        generation = generation or {}
        self.default_temperature = float(generation.get("temperature", 1.0))
        self.default_top_p = float(generation.get("top_p", 1.0))
        self.default_top_k = generation.get("top_k")
        self.chat_stops = list(generation.get("stop", tokenizer.stop_tokens))
        self.max_images = 8  # per request: Llama 4 was post-trained with up to 8 (LLAMA4.md Part A)
        # ids the tokenizer can decode and the model can read
        self.vocab = min(engine.model.args.vocab_size, tokenizer.n_words)

    # --- validation ----------------------------------------------------------------------------
    def _check_common(self, req: P._Sampling) -> None:
        if req.model != self.model_name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves "
                           f"'{self.model_name}'.", "model", "model_not_found")
        if req.presence_penalty or req.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported.",
                           "presence_penalty" if req.presence_penalty else "frequency_penalty", "unsupported_parameter")

    def _max_tokens(self, value: int | None, prompt_len: int, param: str, prompt_param: str, least: int = 1) -> int:
        limit = self.engine.max_context
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your "
                           f"prompt has {prompt_len} tokens.", prompt_param, "context_length_exceeded")
        if value is None:
            return min(self.default_max_tokens, limit - prompt_len)
        if value < least:
            raise APIError(400, f"Invalid '{param}': must be at least {least}, got {value}.", param, "invalid_value")
        if prompt_len + value > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                           f"requested {prompt_len + value} tokens ({prompt_len} in the prompt, {value} "
                           f"in the completion).", param, "context_length_exceeded")
        return value

    def _params(self, req: P._Sampling) -> SamplingParams:
        return SamplingParams(temperature=self.default_temperature if req.temperature is None else req.temperature,
                              top_p=self.default_top_p if req.top_p is None else req.top_p,
                              top_k=(self.default_top_k if req.top_k is None else req.top_k) or None, seed=req.seed)

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
            msg = {"role": role, "content": content if content is not None else ""}
            if m.tool_calls:  # checked by tools.check_messages: arguments are JSON objects
                msg["tool_calls"] = [{"id": tc.id, "type": "function", "function": {
                    "name": tc.function.name, "arguments": tc.function.arguments}} for tc in m.tool_calls]
            out.append(msg)
        return out

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

    def _completion_prompts(self, raw) -> tuple[list[list[int]], list[int]]:
        """(token ids of each prompt, how many leading ids the server added: the BOS of a text
        prompt). Prompts come as a string, strings, a list of ids or lists of ids."""
        if isinstance(raw, str) or (raw and all(isinstance(t, int) for t in raw)):
            raw = [raw]
        if not raw:
            raise APIError(400, "prompt must not be empty.", "prompt", "invalid_value")
        prompts, added = [], []
        for i, p in enumerate(raw):
            param = "prompt" if len(raw) == 1 else f"prompt.{i}"
            if isinstance(p, str):
                prompts.append(self.tok.encode(p, bos=True))
                added.append(1)
                continue
            if not p:
                raise APIError(400, f"Invalid '{param}': a token-id prompt must not be empty.", param, "invalid_value")
            bad = next((t for t in p if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise APIError(400, f"Invalid '{param}': token id {bad} is outside the vocabulary [0, {self.vocab}).",
                               param, "invalid_value")
            prompts.append(list(p))
            added.append(0)
        return prompts, added

    # --- running requests ------------------------------------------------------------------------
    async def _run(self, prompts: list[list[int]], n: int, max_tokens: list[int], params: SamplingParams,
                   stop_ids, stop_strings, *, pixel_values=None, hidden_ids=(), logprobs: int | None = None,
                   prompt_logprobs: int | None = None, text_starts=None,
                   ) -> AsyncIterator[tuple[Choice, str, bool]]:
        """Submits len(prompts) * n requests; yields (choice, new text, finished) as tokens come.
        ``hidden_ids``: generated ids that add no text (stop tokens); ``text_starts[p]``: where
        prompt p's generated text starts in the response's text offsets."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        choices = []
        for p_i, prompt in enumerate(prompts):
            start = text_starts[p_i] if text_starts else 0
            for j in range(n):
                choices.append(Choice(p_i * n + j, prompt, TextStream(self.tok, stop_strings, stop_ids),
                                       GeneratedTokens(self.tok, hidden_ids, start)))

        def sink_for(choice):
            return lambda req, ids, finished: loop.call_soon_threadsafe(queue.put_nowait, (choice, ids, finished))

        try:
            for c in choices:
                seed = None if params.seed is None else params.seed + c.index
                p = SamplingParams(params.temperature, params.top_p, params.top_k, seed)
                try:
                    c.req = self.engine.submit(c.prompt, max_tokens[c.index // n], p, stop_ids, sink_for(c),
                                               pixel_values=pixel_values, logprobs=logprobs,
                                               prompt_logprobs=prompt_logprobs)
                except ValueError as e:
                    raise APIError(400, str(e), None, "invalid_value") from None
            left = len(choices)
            while left:
                c, ids, finished = await queue.get()
                if c.finish is not None:
                    continue
                c.tokens.push(ids)
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
    def _usage(choices: list[Choice]) -> P.Usage:
        prompt_tokens = sum(len(c.prompt) for c in choices)
        completion = sum(len(c.req.output) for c in choices if c.req is not None)
        return P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                       total_tokens=prompt_tokens + completion)

    async def _respond(self, shape, gen: AsyncIterator[tuple[Choice, str, bool]], stream: bool,
                       include_usage: bool):
        """The one collect-or-stream path of chat and completions."""
        if not stream:
            done: dict[int, Choice] = {}
            async for c, _, finished in gen:
                if finished:
                    done[c.index] = c
            choices = [done[i] for i in sorted(done)]
            return shape.response(choices, self._usage(choices))

        async def events():
            seen: dict[int, Choice] = {}
            for e in shape.opening():
                yield e
            async for c, delta, finished in gen:
                seen[c.index] = c
                for e in shape.chunks(c, delta, finished):
                    yield e
            if include_usage:
                yield shape.usage_chunk(self._usage(list(seen.values())))

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

    # --- the two routes ------------------------------------------------------------------------
    async def chat(self, req: P.ChatCompletionRequest):
        self._check_common(req)
        tools = TL.plan_tools(req)
        TL.check_messages(req.messages)
        check_range(req.top_logprobs, 0, MAX_CHAT_TOP_LOGPROBS, "top_logprobs")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "Invalid 'top_logprobs': 'logprobs' must be set to true when 'top_logprobs' is "
                           "used.", "top_logprobs", "invalid_value")
        dialog, pixels = tools.render(self._dialog(req.messages)), None
        try:
            if any(isinstance(m["content"], list) and any(p["type"] == "image_url" for p in m["content"])
                   for m in dialog):
                prompt, pixels = await asyncio.to_thread(self._image_prompt, dialog)
            else:
                prompt = encode_dialog_prompt(self.tok, dialog)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), "messages", "invalid_value") from None
        prompt = list(prompt) + self.tok.encode(tools.prefill)  # tool_choice "required" / named
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self._max_tokens(mt, len(prompt), param, "messages")
        stops = self.chat_stops
        gen = self._run([prompt], req.n, [max_tokens], self._params(req), stops, req.stop_strings,
                        pixel_values=pixels, hidden_ids=stops, logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        shape = ChatShape(self.tok, self.model_name, req.n, bool(req.logprobs), tools)
        return await self._respond(shape, gen, req.stream, bool(req.stream_options and req.stream_options.include_usage))

    async def completions(self, req: P.CompletionRequest):
        self._check_common(req)
        if req.suffix is not None or (req.best_of or 1) != 1:
            raise APIError(400, "suffix and best_of are not supported.", "suffix" if req.suffix is not None
                           else "best_of", "unsupported_parameter")
        check_range(req.logprobs, 0, MAX_COMPLETION_LOGPROBS, "logprobs")
        if req.echo and req.stream:
            raise APIError(400, "echo is not supported together with stream.", "echo", "unsupported_parameter")
        prompts, added = self._completion_prompts(req.prompt)
        least = 0 if req.echo else 1  # OpenAI: echo with max_tokens 0 returns the scored prompt alone
        max_tokens = [self._max_tokens(req.max_tokens, len(p), "max_tokens", "prompt", least) for p in prompts]
        texts = [self.tok.decode(p[a:]) for p, a in zip(prompts, added)]  # a text prompt's own string
        # text offsets count from the start of the prompt's text, echoed or not (as OpenAI's do)
        starts = [len(t) for t in texts]
        score_prompt = req.logprobs if req.echo and req.logprobs is not None else (0 if min(max_tokens) == 0 else None)
        gen = self._run(prompts, req.n, max_tokens, self._params(req), [self.tok.eos_id], req.stop_strings,
                        hidden_ids=[self.tok.eos_id], logprobs=req.logprobs, prompt_logprobs=score_prompt,
                        text_starts=starts)
        shape = CompletionShape(self.tok, self.model_name, req, added, texts if req.echo else None)
        return await self._respond(shape, gen, req.stream, bool(req.stream_options and req.stream_options.include_usage))




def create_app(engine: Engine, tokenizer, model_name: str, api_key: str | None = None,
               default_max_tokens: int = 512, manage_engine: bool = True, generation: dict | None = None) -> FastAPI:
    """The FastAPI app. With ``manage_engine`` the engine thread starts and stops with the app.
    ``generation``: sampling defaults and chat stop ids (``generation_defaults`` of the model folder)."""
    srv = Server(engine, tokenizer, model_name, api_key, default_max_tokens, generation)

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
        # Like vLLM, only /v1 needs the key; /health and the tokenizer routes stay open.
        if srv.api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            if not header:
                return error_response(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                                      None, "missing_api_key")
            # constant-time: the comparison must not reveal how much of a guessed key is right
            if not hmac.compare_digest(header.encode(), f"Bearer {srv.api_key}".encode()):
                return error_response(401, "Incorrect API key provided.", None, "invalid_api_key")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body.model_dump(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        msg, param, code = validation_error(exc, _required_fields(request))
        return error_response(400, msg, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        resp = error_response(exc.status_code, str(exc.detail), None, code)
        resp.headers.update(exc.headers or {})  # 405 carries `Allow` (RFC 9110 15.5.6)
        return resp

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", None, "internal_error", "server_error")

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

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return T.tokenizer_info(srv.tok, engine.max_context)

    @app.post("/tokenize")
    async def tokenize(req: P.TokenizeRequest):
        return T.tokenize(srv.tok, req, engine.max_context)

    @app.post("/detokenize")
    async def detokenize(req: P.DetokenizeRequest):
        return T.detokenize(srv.tok, req)

    openapi.document(app, srv.vocab, engine.max_context, hasattr(engine.model, "vision_args"),
                     MAX_COMPLETION_LOGPROBS, MAX_CHAT_TOP_LOGPROBS)
    return app


def _required_fields(request: HTTPRequest) -> list[str]:
    """The required fields of the route's request body (to name them when the body is empty)."""
    route = request.scope.get("route")
    field = getattr(route, "body_field", None)
    model = getattr(getattr(field, "field_info", None), "annotation", None)
    fields = getattr(model, "model_fields", {})
    return [name for name, f in fields.items() if f.is_required()]


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, max_batch: int = 8, max_context: int | None = None,
          dtype: str | None = None, device: str | None = None, default_max_tokens: int = 512,
          log_level: str = "info", compile: bool = False, temperature: float | None = None,
          top_p: float | None = None) -> None:
    """Load ``model_dir`` and serve it until interrupted (binds loopback unless told otherwise).
    Requests that set no temperature / top_p get ``temperature`` / ``top_p``, else the model's
    generation_config.json, else 1.0."""
    import uvicorn

    from llama4.infer.engine import EngineConfig
    from llama4.infer.model_dir import generation_defaults, load_model_dir

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("serving on %s without --api-key: anyone who can reach this address can use it", host)
    model, tok, name = load_model_dir(model_dir, dtype=dtype, device=device)
    engine = Engine(model, EngineConfig(max_batch=max_batch, max_context=max_context, compile=compile))
    generation = generation_defaults(model_dir)
    generation.update({k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None})
    app = create_app(engine, tok, model_name or name, api_key, default_max_tokens, generation=generation)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["APIError", "Server", "create_app", "serve"]
