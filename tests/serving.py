"""What the server tests share: a tiny random checkpoint with its own byte-level tokenizer, a free
loopback port, and ``llama4.server``'s app run by uvicorn in a thread of the test process.

The checkpoint: 4 layers (MoE every 2nd, NoPE every 2nd, chunk 16), weights drawn at std 0.3 so
every component moves the logits; ``tokenizer.model`` holds the 256 byte tokens, and Llama 4's
2,048 special tokens follow them (2,304 ids; ``<|patch|>`` = 348).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import torch

import llama4
from llama4.model import ModelArgs, MultimodalTransformer, Transformer, vision_flavor
from llama4.tokenizer.files import write_tiktoken_bpe

IMAGE_TOKEN_ID = 256 + 92  # <|patch|> after the 256 byte tokens


def tiny_args(**overrides) -> ModelArgs:
    base = dict(vocab_size=2304, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4, top_k=1,
                expert_dim=64, dense_dim=128, interleave_moe_layer_step=2, nope_layer_interval=2,
                attention_chunk_size=16, floor_scale=8.0, max_seq_len=4096)
    return ModelArgs(**{**base, **overrides})


def write_tiny_model_dir(d: Path, multimodal: bool = False, **overrides) -> Path:
    """A seeded tiny checkpoint in ``d`` (HF layout + byte-level ``tokenizer.model``); with
    ``multimodal`` it has the debug vision tower; ``overrides`` change :func:`tiny_args`."""
    torch.manual_seed(0)
    if multimodal:
        m = MultimodalTransformer(tiny_args(**overrides), vision_flavor("debug"), image_token_id=IMAGE_TOKEN_ID)
    else:
        m = Transformer(tiny_args(**overrides))
    m.init_weights(std=0.3)
    llama4.save(m, d)
    write_tiktoken_bpe(d / "tokenizer.model", {bytes([b]): b for b in range(256)})
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(engine, tok, name: str, **app_kw):
    """``create_app(engine, tok, name, **app_kw)`` served on a free loopback port; yields its URL."""
    from llama4.server import create_app

    with serving_app(create_app(engine, tok, name, **app_kw)) as url:
        yield url


@contextlib.contextmanager
def serving_app(app):
    """Any ASGI ``app`` served by uvicorn in a thread on a free loopback port; yields its URL."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 60
        while not srv.started:
            assert time.monotonic() < deadline and th.is_alive(), "server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        th.join(timeout=30)
