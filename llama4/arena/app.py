"""The arena's web app: FastAPI routes over :class:`~llama4.arena.battles.Arena`, and the page.

    GET  /  /leaderboard                 the page (static/index.html; app.js picks the view)
    GET  /static/{app.js,style.css}      its script and style (shipped in the package; no CDN)
    POST /api/battles            {"prompt"}   -> SSE: battle id, then both answers' deltas
    POST /api/battles/{id}/turns {"prompt"}   -> SSE: a follow-up to both
    POST /api/battles/{id}/vote  {"winner"}   -> {"model_a", "model_b", "winner"} once committed
    GET  /api/leaderboard                     -> ratings, intervals, ranks, win fractions
    GET  /health

Streams are server-sent events, one JSON object per event: ``{"type": "battle", "id"}``,
``{"type": "delta", "side": "a"|"b", "text"}``, ``{"type": "end", "side"}``, ``{"type":
"error", "message"}``, and ``{"type": "done"}`` last. Model text travels as JSON strings and
the page only ever puts it in ``textContent``; the Content-Security-Policy allows no inline
script either. With a password every route but /health asks for it (HTTP Basic, any user name).
POST requests are rate-limited per client address; errors are ``{"error": message}`` with a 4xx.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from collections import deque
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from llama4.arena.battles import Arena, ArenaError, Limits

log = logging.getLogger("llama4.arena")
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
          "index.html": "text/html; charset=utf-8"}
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def static_file(name: str) -> bytes:
    return resources.files("llama4.arena").joinpath("static", name).read_bytes()


class RateLimit:
    """At most ``per_minute`` requests per client address in any 60 s window."""

    def __init__(self, per_minute: int):
        if not isinstance(per_minute, int) or per_minute < 1:
            raise ValueError(f"--rate must be a positive integer (requests per minute), got {per_minute!r}")
        self.per_minute = per_minute
        self.seen: dict[str, deque] = {}

    def retry_after(self, client: str) -> float:
        """0 when the request may go ahead (and it is counted); else seconds to wait."""
        now = time.monotonic()
        q = self.seen.setdefault(client, deque())
        while q and now - q[0] >= 60.0:
            q.popleft()
        if len(q) >= self.per_minute:
            return 60.0 - (now - q[0])
        q.append(now)
        if len(self.seen) > 10_000:  # forget idle clients
            self.seen = {k: v for k, v in self.seen.items() if v and now - v[-1] < 60.0}
        return 0.0


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _body(request: Request, field: str):
    try:
        body = json.loads(await request.body() or b"null")
    except ValueError:
        raise ArenaError(400, "the request body must be JSON") from None
    if not isinstance(body, dict) or field not in body:
        raise ArenaError(400, f"the request body must be a JSON object with field {field!r}")
    return body[field]


def _sse(events) -> StreamingResponse:
    async def body():
        try:
            async for ev in events:
                yield f"data: {json.dumps(ev, ensure_ascii=False)}\n\n"
        except ArenaError as e:  # headers are gone: report in the stream
            yield f"data: {json.dumps({'type': 'error', 'message': str(e)})}\n\n"
        yield 'data: {"type": "done"}\n\n'

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def create_app(arena: Arena, password: str | None = None, rate_per_minute: int = 60, rounds: int = 1000,
               manage_contestants: bool = True) -> FastAPI:
    """The app. ``rounds``: bootstrap rounds of the leaderboard's intervals (recomputed only
    when a battle was added). With ``manage_contestants`` their engines start and stop with it."""
    if rounds < 100:
        raise ValueError(f"--rounds must be >= 100 for 95% intervals, got {rounds}")
    limiter = RateLimit(rate_per_minute)
    board_cache: dict = {}
    board_lock = asyncio.Lock()

    @asynccontextmanager
    async def lifespan(app):
        if manage_contestants:
            for c in arena.contestants.values():
                c.start()
        try:
            yield
        finally:
            if manage_contestants:
                for c in arena.contestants.values():
                    c.close()
            arena.close()

    app = FastAPI(title="llama4 arena", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.arena = arena

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if password is not None and request.url.path != "/health":
            given = ""
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("basic "):
                try:
                    given = base64.b64decode(auth[6:].strip()).decode("utf-8").partition(":")[2]
                except ValueError:
                    given = ""
            # constant time: a wrong guess must not tell how much of it was right
            if not hmac.compare_digest(given.encode(), password.encode()):
                return _error(401, "this arena needs its password", {"WWW-Authenticate": 'Basic realm="llama4 arena"'})
        if request.method == "POST":
            wait = limiter.retry_after(request.client.host if request.client else "?")
            if wait:
                return _error(429, f"too many requests: at most {limiter.per_minute} a minute; try again in "
                              f"{wait:.0f} s", {"Retry-After": str(max(1, round(wait)))})
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        return response

    @app.exception_handler(ArenaError)
    async def _arena_error(request, exc: ArenaError):
        return _error(exc.status, str(exc))

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return _error(404, f"no such page: {request.url.path}")

    @app.exception_handler(405)
    async def _not_allowed(request, exc):
        return _error(405, f"{request.method} is not allowed on {request.url.path}", getattr(exc, "headers", None))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": len(arena.contestants), "pending": len(arena.pending)}

    @app.get("/")
    @app.get("/leaderboard")
    async def page():
        return Response(static_file("index.html"), media_type=STATIC["index.html"])

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC or name == "index.html":
            raise ArenaError(404, f"no such file: {name}")
        return Response(static_file(name), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @app.post("/api/battles")
    async def new_battle(request: Request):
        prompt = arena.check_prompt(await _body(request, "prompt"))
        battle = arena.new_battle()

        async def events():
            yield {"type": "battle", "id": battle.id, "max_turns": arena.limits.max_turns}
            async for ev in arena.turn(battle, prompt):
                yield ev

        return _sse(events())

    @app.post("/api/battles/{battle_id}/turns")
    async def follow_up(battle_id: str, request: Request):
        prompt = arena.check_prompt(await _body(request, "prompt"))
        battle = arena.get(battle_id)
        arena.check_turn(battle)  # a 4xx now; inside the stream it could only be an event
        return _sse(arena.turn(battle, prompt))

    @app.post("/api/battles/{battle_id}/vote")
    async def vote(battle_id: str, request: Request):
        return await arena.vote(battle_id, await _body(request, "winner"))

    @app.get("/api/leaderboard")
    async def leaderboard():
        from llama4.arena.ratings import leaderboard as compute

        async with board_lock:  # one computation at a time; later callers get its result
            key, outcomes = await asyncio.to_thread(arena.outcomes)
            if board_cache.get("key") != key:
                board = await asyncio.to_thread(compute, outcomes, rounds)
                board_cache.update(key=key, board=board)
        board = dict(board_cache["board"])
        rated = set(board["models"])
        board["unrated"] = sorted(set(arena.contestants) - rated)  # models with no decided battle yet
        return board

    return app


def serve(models: dict[str, str], host: str = "127.0.0.1", port: int = 8080, db_path: str = "arena.sqlite",
          password: str | None = None, limits: Limits | None = None, rate_per_minute: int = 60, rounds: int = 1000,
          max_batch: int = 8, max_context: int | None = None, dtype=None, device=None,
          temperature: float | None = None, top_p: float | None = None, log_level: str = "info") -> None:
    """Load every model folder and serve the arena until interrupted (loopback unless told)."""
    import uvicorn

    from llama4.arena.contestants import EngineContestant

    if host not in LOOPBACK and password is None:
        log.warning("the arena listens on %s without --password: anyone who can reach it can vote", host)
    contestants = {name: EngineContestant(path, max_batch=max_batch, max_context=max_context, dtype=dtype,
                                          device=device, temperature=temperature, top_p=top_p)
                   for name, path in models.items()}
    arena = Arena(contestants, db_path, limits)
    app = create_app(arena, password, rate_per_minute, rounds)
    print(f"llama4 arena: {len(models)} models on http://{host}:{port}/ (votes in {db_path})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
