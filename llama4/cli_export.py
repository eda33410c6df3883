"""``llama4 export gguf``: argument parsing only; the work is in llama4/checkpoint/gguf.py."""

from __future__ import annotations

import argparse
import sys

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")  # llama4.checkpoint.gguf.GGUF_TYPES (no torch import here)


def _export_gguf(a: argparse.Namespace) -> int:
    from llama4.checkpoint.gguf import export_gguf

    r = export_gguf(a.model, a.out, a.type)
    print(f"wrote {r.path} ({r.gguf_type}, {r.n_tensors} tensors, {r.bytes / 1e6:.1f} MB)")
    for note in r.notes:
        print(f"  note: {note}", file=sys.stderr)
    return 0


def add_subparsers(sub) -> None:
    p = sub.add_parser("export", help="write a model in another program's format (gguf: llama.cpp)")
    kinds = p.add_subparsers(dest="format", required=True)
    g = kinds.add_parser(
        "gguf", help="a GGUF file for llama.cpp (architecture llama4)",
        description="Write the model and its tokenizer as one GGUF file, with llama.cpp's llama4 tensor names "
                    "and keys. Refuses a model llama.cpp would run differently (it hard-codes chunked attention "
                    "of 8192, NoPE every 4th layer, temperature tuning floor 8192 / scale 0.1, and QK-norm "
                    "unless the model has 128 experts). A `llama4 quantize` folder is dequantized first.")
    g.add_argument("--model", required=True, help="model folder (HF or Meta layout), training run, or quantized folder")
    g.add_argument("--out", required=True, help="the new .gguf file (must not exist)")
    g.add_argument("--type", default="f32", choices=GGUF_TYPES,
                   help="weight type: f32 (default), f16, q8_0 or q4_0 (norms and router stay f32)")
    g.set_defaults(func=_export_gguf)
