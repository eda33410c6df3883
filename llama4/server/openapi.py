"""The server's OpenAPI schema, made to say what the server does.

FastAPI derives the schema from the pydantic request models. Two things it cannot know are added
here: every status the server answers (400 for every refused request, OpenAI-style, instead of
FastAPI's 422; 401 on /v1 when a key is set; 404 for an unknown model or path; 500), all with
the OpenAI error body; and the limits a JSON schema can state but the pydantic types leave to
the handlers (token ids inside the vocabulary, at most 4 stop strings, penalties we do not
implement pinned to 0, ``best_of`` 1, no ``suffix``, the log-probability ranges, each message
role with its own fields: ``tool_calls`` on assistant messages, ``tool_call_id`` and content
required on tool messages), so a request valid by the schema is one the server accepts, except
for what depends on more than one field or on the prompt (context length, ``top_logprobs``
without ``logprobs``, ``echo`` with ``stream``, the content of an image, a tool message that
answers no preceding call, call arguments that are not a JSON object, a ``tool_choice`` naming no
declared function). A text-only model's schema has no image parts.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from llama4.server import protocol as P

ERROR_STATUSES = {400: "Invalid request (OpenAI error body; `param` names the field)",
                  401: "Missing or wrong API key (only on /v1, when the server has one)",
                  404: "Unknown model or path", 500: "Internal error"}
MAX_STOP = 4
# one server-sent event, as OpenAPI before 3.2 describes each event of a stream
SSE_EVENT = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "description": "a JSON chunk, or `[DONE]` last"},
                            "event": {"type": "string"}}}
STREAMING_PATHS = ("/v1/chat/completions", "/v1/completions")


def _token_ids(vocab: int) -> dict:
    return {"type": "integer", "minimum": 0, "maximum": vocab - 1}


def _tighten(schemas: dict, vocab: int, max_context: int, images: bool, max_completion_logprobs: int,
             max_chat_top_logprobs: int) -> None:
    ids = _token_ids(vocab)
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        props["stop"] = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"},
                                                         "maxItems": MAX_STOP}, {"type": "null"}], "title": "Stop"}
        for pen in ("presence_penalty", "frequency_penalty"):
            props[pen] = {"type": "number", "minimum": 0, "maximum": 0, "default": 0, "title": props[pen]["title"],
                          "description": "not implemented: only 0 is accepted"}
    chat = schemas["ChatCompletionRequest"]["properties"]
    chat["top_logprobs"] = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": max_chat_top_logprobs},
                                      {"type": "null"}], "title": "Top Logprobs"}
    for f in ("max_tokens", "max_completion_tokens"):
        chat[f] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": max_context - 1}, {"type": "null"}],
                   "title": chat[f]["title"]}
    if not images:  # a text-only model: message content is a string or text parts
        content = schemas["ChatMessage"]["properties"]["content"]
        content["anyOf"] = [{"type": "string"}, {"type": "array", "items": {"$ref": "#/components/schemas/TextPart"}},
                            {"type": "null"}]
    _per_role_messages(schemas)
    comp = schemas["CompletionRequest"]["properties"]
    comp["prompt"] = {"anyOf": [{"type": "string"},
                                {"type": "array", "items": {"type": "string"}, "minItems": 1},
                                {"type": "array", "items": ids, "minItems": 1},
                                {"type": "array", "items": {"type": "array", "items": ids, "minItems": 1},
                                 "minItems": 1}], "title": "Prompt"}
    comp["logprobs"] = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": max_completion_logprobs},
                                  {"type": "null"}], "title": "Logprobs"}
    comp["max_tokens"] = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": max_context - 1}, {"type": "null"}],
                          "default": 16,
                          "title": "Max Tokens"}
    comp["best_of"] = {"anyOf": [{"const": 1}, {"type": "null"}], "title": "Best Of"}
    comp["suffix"] = {"type": "null", "title": "Suffix", "description": "not supported"}
    schemas["DetokenizeRequest"]["properties"]["tokens"] = {"type": "array", "items": ids, "title": "Tokens"}


def _per_role_messages(schemas: dict) -> None:
    """ChatMessage as one schema per role, as OpenAI's: the tool fields only where they belong."""
    props = schemas["ChatMessage"]["properties"]
    content, name = props["content"], props["name"]
    text = {"anyOf": [{"type": "string"},
                      {"type": "array", "items": {"$ref": "#/components/schemas/TextPart"}}], "title": "Content"}
    none = {"type": "null"}

    def role(roles, required=("role",), **fields) -> dict:
        base = {"content": content, "name": name, "tool_calls": none, "tool_call_id": none}
        return {"type": "object", "required": list(required),
                "properties": {"role": {"type": "string", "enum": list(roles)}, **base, **fields}}

    turns = [role(("system", "developer", "user")), role(("assistant",), tool_calls=props["tool_calls"])]
    tool = role(("tool",), ("role", "content", "tool_call_id"), content=text,
                tool_call_id={"type": "string", "description": "the id of the call this result answers"})
    schemas["ChatMessage"] = {"title": "ChatMessage", "oneOf": [*turns, tool]}
    # what of "a tool message answers a call just before it" a schema can say: not the first message
    schemas["ChatCompletionRequest"]["properties"]["messages"]["prefixItems"] = [
        {"oneOf": turns, "description": "a conversation does not open with a tool result"}]


def document(app: FastAPI, vocab: int, max_context: int, images: bool, max_completion_logprobs: int,
             max_chat_top_logprobs: int) -> None:
    """Replace ``app.openapi`` by one that documents every status and the limits above."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            err = P.ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(err.pop("$defs", {}))
            schemas["ErrorResponse"] = err
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            _tighten(schemas, vocab, max_context, images, max_completion_logprobs, max_chat_top_logprobs)
            ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            for path, ops in schema.get("paths", {}).items():
                for op in ops.values():
                    responses = op.setdefault("responses", {})
                    responses.pop("422", None)
                    if path in STREAMING_PATHS:  # "stream": true answers 200 with server-sent events
                        ok = responses.setdefault("200", {"description": "Successful Response"})
                        ok.setdefault("content", {})["text/event-stream"] = {
                            "schema": SSE_EVENT}
                    for status, what in ERROR_STATUSES.items():
                        if status != 401 or path.startswith("/v1"):
                            responses[str(status)] = {"description": what, **ref}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
