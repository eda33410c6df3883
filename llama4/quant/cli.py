"""``llama4 quantize``: argument parsing only; the work is in llama4/quant/checkpoint.py."""

from __future__ import annotations

import argparse

SCHEMES = ("bf16", "fp16", "int8", "int4")  # llama4.quant.formats.SCHEMES (no torch import here)


def _quantize(a: argparse.Namespace) -> int:
    from llama4.quant.checkpoint import quantize_dir

    out = quantize_dir(a.model, a.out, a.scheme, a.group_size, head=a.head)
    print(f"wrote {out} ({a.scheme}" + (f", group {a.group_size or 32}" if a.scheme == "int4" else "") + ")")
    return 0


def add_subparser(sub) -> None:
    p = sub.add_parser("quantize", help="write a weight-only quantized copy of a model (bf16/fp16/int8/int4)",
                       description="Weight-only quantization of attention, dense FFN, shared-expert, routed-expert "
                                   "and (unless --no-head) output-head weights; embedding, norms and router stay "
                                   "float. The result is a Hugging Face folder with a 'quantization_config' in "
                                   "config.json that llama4.load and `llama4 generate/chat/serve` read.")
    p.add_argument("--model", required=True, help="float model folder (HF layout) or training run")
    p.add_argument("--scheme", required=True, choices=SCHEMES,
                   help="bf16/fp16: 16-bit weights; int8: per output channel; int4: group-wise with zero points")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size: 32 (default), 64 or 128")
    p.add_argument("--head", action=argparse.BooleanOptionalAction, default=True,
                   help="also quantize the output head (default: yes)")
    p.add_argument("--out", required=True, help="new output folder (must not exist or be empty)")
    p.set_defaults(func=_quantize)
