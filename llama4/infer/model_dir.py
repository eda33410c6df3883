"""A model directory: the Hugging Face layout (config.json + safetensors) plus, when present, its
own ``tokenizer.model`` (or ``tokenizer.json``); without one, the official Llama 4 tokenizer.

A training run's directory is accepted too: ``RUN/`` resolves to ``RUN/final/`` when ``RUN``
itself has no config.json.
"""

from __future__ import annotations

from pathlib import Path

import torch


def resolve_model_dir(path) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model directory not found: {p}")
    if not (p / "config.json").is_file() and (p / "final" / "config.json").is_file():
        return p / "final"
    return p


def load_tokenizer_for(path):
    """The directory's own tokenizer file if it has one, else the official Llama 4 tokenizer."""
    from llama4.tokenizer import load_tokenizer

    p = resolve_model_dir(path)
    own = any((p / name).is_file() for name in ("tokenizer.model", "tokenizer.json"))
    return load_tokenizer(p if own else None)


def load_model_dir(path, dtype=None, device=None):
    """-> (model in eval mode, tokenizer, model name). ``dtype`` may be a string ("bfloat16")."""
    import llama4

    p = resolve_model_dir(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = llama4.load(p, dtype=dtype, device=device).eval()
    tok = load_tokenizer_for(p)
    if tok.n_words > model.args.vocab_size:
        raise ValueError(f"{p}: the tokenizer has {tok.n_words} tokens but the model's vocabulary is only "
                         f"{model.args.vocab_size}; put the model's own tokenizer.model in the directory")
    name = p.parent.name if p.name == "final" else p.name
    return model, tok, name
