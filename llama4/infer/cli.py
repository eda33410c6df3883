"""``llama4 generate``, ``llama4 chat`` and ``llama4 serve``: argument parsing, then a call into
the inference and server rooms."""

from __future__ import annotations

import argparse
import sys


_FROM_MODEL = "default: the model's generation_config.json, else"


def _sampling_args(sp: argparse.ArgumentParser, temperature: float) -> None:
    # None = not given: the model folder's generation_config.json decides, then these fallbacks
    sp.set_defaults(fallback_temperature=temperature)
    sp.add_argument("--model", required=True, help="model directory (HF layout, optional tokenizer.model)")
    sp.add_argument("--max-tokens", type=int, default=256, help="new tokens at most")
    sp.add_argument("--temperature", type=float, default=None,
                    help=f"0 = greedy ({_FROM_MODEL} {temperature:g})")
    sp.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling ({_FROM_MODEL} 1.0)")
    sp.add_argument("--top-k", type=int, default=None, help=f"({_FROM_MODEL} none)")
    sp.add_argument("--stop-id", type=int, action="append", default=None, metavar="ID",
                    help="a token id that ends generation (repeatable; default: the model's "
                         "generation_config.json eos_token_id, else <|end_of_text|>, <|eom|>, <|eot|>)")
    sp.add_argument("--seed", type=int, default=None)
    sp.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    sp.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    sp.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    sp.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow first call)")


def _setup(a):
    import torch

    from llama4.infer.model_dir import generation_defaults, load_model_dir

    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok, name = load_model_dir(a.model, dtype=a.dtype, device=a.device)
    _apply_generation_defaults(a, generation_defaults(a.model), tok)
    return model, tok, name


def _apply_generation_defaults(a, cfg: dict, tok) -> None:
    """Flags win; then the model's generation_config.json; then the command's fallbacks."""
    if a.temperature is None:
        a.temperature = cfg.get("temperature", a.fallback_temperature)
    if a.top_p is None:
        a.top_p = cfg.get("top_p", 1.0)
    if a.top_k is None:
        a.top_k = cfg.get("top_k")
    stops = a.stop_id if a.stop_id is not None else cfg.get("stop", tok.stop_tokens)
    bad = next((i for i in stops if not 0 <= i < tok.n_words), None)
    if bad is not None:
        raise ValueError(f"stop token id {bad} is outside the vocabulary [0, {tok.n_words})")
    a.stop = list(stops)


def _stream(model, tok, prompt: list[int], a, out, pixel_values=None) -> list[int]:
    """Generate and print text as it comes; returns the generated ids (stop token included)."""
    from llama4.infer.detok import TextStream
    from llama4.infer.generation import generate_stream

    text = TextStream(tok, skip_ids=a.stop)
    ids: list[int] = []
    for chunk in generate_stream(model, [prompt], a.max_tokens, a.temperature, a.top_p, a.top_k, a.seed,
                                 stop=a.stop, sync_every=1, compile=a.compile,
                                 pixel_values=None if pixel_values is None else [pixel_values]):
        ids += chunk[0]
        out.write(text.push(chunk[0]))
        out.flush()
    out.write(text.flush())
    out.flush()
    return ids


def _image_prompt(model, tok, messages):
    """Chat-format ids and pixel tiles of messages holding image parts (``llama4.vision.prompt``)."""
    from llama4.vision.prompt import ImageSpec, encode_prompt

    if not hasattr(model, "vision_args"):
        raise ValueError("this model has no vision tower; --image needs a multimodal checkpoint")
    p = encode_prompt(tok, messages, ImageSpec.for_model(model))
    return p.ids, p.pixel_values


def _generate(a) -> int:
    from llama4.tokenizer.chat_format import encode_dialog_prompt

    model, tok, _ = _setup(a)
    if a.image:  # images imply the chat format: one user turn, the images first
        parts = [{"type": "image", "image": path} for path in a.image] + [{"type": "text", "text": a.prompt}]
        prompt, pixels = _image_prompt(model, tok, [{"role": "user", "content": parts}])
        _stream(model, tok, prompt, a, sys.stdout, pixels)
        sys.stdout.write("\n")
        return 0
    if a.chat_format:
        prompt = encode_dialog_prompt(tok, [{"role": "user", "content": a.prompt}])
    else:
        prompt = tok.encode(a.prompt, bos=not a.no_bos)
    if not prompt:
        raise ValueError("the prompt is empty (pass --prompt TEXT, or drop --no-bos)")
    _stream(model, tok, prompt, a, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _chat(a) -> int:
    from llama4.tokenizer.chat_format import encode_dialog_prompt

    model, tok, name = _setup(a)
    messages = [{"role": "system", "content": a.system}] if a.system else []
    images = list(a.image or [])  # attached to the next user message
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {name} (empty line or /exit to quit, /reset to forget the conversation, "
              "/image PATH to show it an image)")
    while True:
        if interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or line.strip() in ("", "/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if a.system else []
            continue
        if line.strip().startswith("/image "):
            images.append(line.strip()[len("/image "):].strip())
            continue
        text = line.rstrip("\n")
        if images:
            messages.append({"role": "user", "content": [{"type": "image", "image": p} for p in images]
                             + [{"type": "text", "text": text}]})
            images = []
        else:
            messages.append({"role": "user", "content": text})
        pixels = None
        if any(isinstance(m["content"], list) for m in messages):
            try:
                prompt, pixels = _image_prompt(model, tok, messages)
            except ValueError as e:  # a bad image: say so, forget that turn, keep chatting
                print(f"error: {e}", file=sys.stderr)
                messages.pop()
                continue
        else:
            prompt = encode_dialog_prompt(tok, messages)
        if interactive:
            sys.stdout.write("assistant> ")
        ids = _stream(model, tok, prompt, a, sys.stdout, pixels)
        sys.stdout.write("\n")
        reply = tok.decode([i for i in ids if i not in a.stop])
        messages.append({"role": "assistant", "content": reply})


def _serve(a) -> int:
    from llama4.server.app import serve

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    serve(a.model, host=a.host, port=a.port, api_key=a.api_key, model_name=a.model_name,
          max_batch=a.max_batch, max_context=a.max_context, dtype=a.dtype, device=a.device,
          default_max_tokens=a.default_max_tokens, log_level=a.log_level, compile=a.compile,
          temperature=a.temperature, top_p=a.top_p)
    return 0


def add_subparsers(sub) -> None:
    sp = sub.add_parser("generate", help="generate from a prompt, streaming tokens as they come")
    _sampling_args(sp, temperature=0.0)
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--chat-format", action="store_true", help="wrap the prompt as one user turn")
    sp.add_argument("--no-bos", action="store_true", help="do not prepend <|begin_of_text|>")
    sp.add_argument("--image", action="append", metavar="PATH",
                    help="an image for a multimodal model (repeatable; implies --chat-format)")
    sp.set_defaults(func=_generate)

    sp = sub.add_parser("chat", help="multi-turn chat in the terminal (Llama 4 chat format)")
    _sampling_args(sp, temperature=0.7)
    sp.add_argument("--system", default=None, help="system prompt")
    sp.add_argument("--image", action="append", metavar="PATH",
                    help="an image shown with the first message (repeatable; later: /image PATH)")
    sp.set_defaults(func=_chat)

    sp = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)",
                        description="Chat completions stop at the model's generation_config.json eos_token_id "
                                    "(else <|end_of_text|>, <|eom|>, <|eot|>); requests that set no temperature "
                                    "or top_p get --temperature / --top-p, else the model's generation_config.json, "
                                    "else 1.0.")
    sp.add_argument("--model", required=True, help="model directory")
    sp.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    sp.add_argument("--model-name", default=None, help="id served on /v1/models (default: directory name)")
    sp.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    sp.add_argument("--max-context", type=int, default=None, help="prompt + completion limit per request")
    sp.add_argument("--default-max-tokens", type=int, default=512)
    sp.add_argument("--dtype", default=None)
    sp.add_argument("--device", default=None)
    sp.add_argument("--threads", type=int, default=None)
    sp.add_argument("--log-level", default="info")
    sp.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    sp.add_argument("--temperature", type=float, default=None,
                    help=f"for requests that set none ({_FROM_MODEL} 1.0, OpenAI's)")
    sp.add_argument("--top-p", type=float, default=None,
                    help=f"for requests that set none ({_FROM_MODEL} 1.0)")
    sp.set_defaults(func=_serve)
