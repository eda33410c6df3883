"""The LoRA flags shared by `llama4 sft`, `llama4 dpo` and `llama4 rl` (light: no torch import).

    add_lora_arguments(parser)            # --lora-rank R --lora-alpha A --lora-targets ... --adapter-only
    model = lora_from_args(args, model)   # in the handler, after loading the model, before the optimizer

Without ``--lora-rank`` the model is trained in full and ``--adapter-only`` is an error.
"""

from __future__ import annotations

import argparse

TARGET_NAMES = ("attention", "experts", "shared", "dense")
DEFAULT_TARGETS = "attention,experts,shared"


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in names if t not in TARGET_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown LoRA target(s) {', '.join(bad) or '(none given)'}; "
                                         f"choose from {', '.join(TARGET_NAMES)}")
    return names


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("LoRA (low-rank adapters; base weights frozen)")
    g.add_argument("--lora-rank", type=_positive_int, default=None, metavar="R",
                   help="train rank-R adapters instead of the full model (default: full fine-tuning)")
    g.add_argument("--lora-alpha", type=_positive_float, default=None, metavar="A",
                   help="adapter scale is A/R (default A = R, i.e. scale 1)")
    g.add_argument("--lora-targets", type=_targets, default=_targets(DEFAULT_TARGETS), metavar="LIST",
                   help=f"comma-separated weights to adapt, from {', '.join(TARGET_NAMES)} "
                        f"(experts: one adapter per routed expert; dense: FFN of non-MoE layers; "
                        f"default {DEFAULT_TARGETS})")
    g.add_argument("--adapter-only", action="store_true",
                   help="write the adapter alone (adapter_model.safetensors + adapter_config.json) "
                        "instead of the merged model")


def check_lora_args(args) -> None:
    """ValueError for flag combinations argparse cannot reject on its own."""
    if getattr(args, "adapter_only", False) and getattr(args, "lora_rank", None) is None:
        raise ValueError("--adapter-only needs --lora-rank")
    if getattr(args, "lora_alpha", None) is not None and getattr(args, "lora_rank", None) is None:
        raise ValueError("--lora-alpha needs --lora-rank")


def lora_from_args(args, model):
    """Apply the adapters the flags ask for (nothing without ``--lora-rank``); returns the model."""
    check_lora_args(args)
    if getattr(args, "lora_rank", None) is None:
        return model
    from llama4.posttrain.lora import apply_lora

    apply_lora(model, args.lora_rank, args.lora_alpha, targets=args.lora_targets)
    # read by llama4.posttrain.lora.export_stage_model at the end of the stage
    model._lora_adapter_only = bool(getattr(args, "adapter_only", False))
    return model
