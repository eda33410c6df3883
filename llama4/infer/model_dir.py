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


def generation_defaults(path) -> dict:
    """What the folder's ``generation_config.json`` says about sampling, as transformers reads it:
    ``{"temperature", "top_p", "top_k", "stop"}`` for the keys it sets (``do_sample: false`` is
    temperature 0; ``eos_token_id``, an id or a list, gives the stop ids). ``{}`` without the file."""
    import json

    f = resolve_model_dir(path) / "generation_config.json"
    if not f.is_file():
        return {}
    try:
        cfg = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{f}: not a readable JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{f}: expected a JSON object")
    out = {}
    for key, kind in (("temperature", (int, float)), ("top_p", (int, float)), ("top_k", (int,))):
        v = cfg.get(key)
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, kind):
                raise ValueError(f"{f}: field {key!r} must be a number, got {v!r}")
            out[key] = v
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
    if out.get("top_k") == 0:
        out["top_k"] = None  # transformers: 0 disables top-k
    eos = cfg.get("eos_token_id")
    if eos is not None:
        eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
        if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
            raise ValueError(f"{f}: field 'eos_token_id' must be an id or a list of ids, got {cfg['eos_token_id']!r}")
        out["stop"] = eos
    return out


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
