"""OpenAI-compatible server: pydantic schemas (protocol.py) and FastAPI routes + SSE (app.py)."""

from llama4.server.app import APIError, create_app, serve

__all__ = ["APIError", "create_app", "serve"]
