"""OpenAI-compatible server: pydantic schemas (protocol.py), FastAPI routes + SSE (app.py), the
response shapes of chat and completions (shapes.py), log-probabilities in OpenAI's two formats
(logprobs.py), vLLM's tokenizer routes (tokenize.py) and OpenAI-style errors (errors.py)."""

from llama4.server.app import APIError, create_app, serve

__all__ = ["APIError", "create_app", "serve"]
