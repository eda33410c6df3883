"""``llama4 plan`` and ``llama4 dcp``: argument parsing only; the work is in this room's modules."""

from __future__ import annotations

import argparse


def _plan(a: argparse.Namespace) -> int:
    from llama4.distributed.plan import GiB, Layout, parse_gpus, parse_tokens, report
    from llama4.model import flavor

    args = flavor(a.flavor)
    gpus, mem = parse_gpus(a.gpus)
    layouts = None
    if a.dp or a.ep or a.tp:
        tp, ep = a.tp or 1, a.ep or 1
        if gpus % tp:
            raise ValueError(f"--tp {tp} does not divide the {gpus} GPUs")
        dp = a.dp or gpus // tp
        if dp * tp != gpus:
            raise ValueError(f"--dp {dp} x --tp {tp} != {gpus} GPUs")
        layouts = [Layout(dp=dp, ep=ep, tp=tp, activation_checkpoint=ac) for ac in (False, True)]
        from llama4.distributed.plan import valid

        why = valid(args, layouts[0])
        if why:
            raise ValueError(f"layout dp{dp} ep{ep} tp{tp}: {why}")
    context = parse_tokens(a.context) if a.context else None
    print(report(args, a.flavor, gpus, mem, parse_tokens(a.seq), a.batch, layouts, context,
                 reserve=a.reserve * GiB, compute_bytes={"bf16": 2, "fp32": 4}[a.compute],
                 serve_weight_bytes={"bf16": 2, "fp8": 1, "int4": 0.5}[a.serve_weights]))
    return 0


def _dcp(a: argparse.Namespace) -> int:
    from llama4.distributed import checkpoint as ckpt

    if a.dcp_command == "to-hf":
        out = ckpt.dcp_to_hf(a.src, a.dst, dtype=a.dtype)
    else:
        out = ckpt.hf_to_dcp(a.src, a.dst, dtype=a.dtype)
    print(f"wrote {out}")
    return 0


def add_subparsers(sub) -> None:
    p = sub.add_parser("plan", help="memory per GPU of parallel layouts (training and serving), on paper")
    p.add_argument("--flavor", required=True, help="debug, scout, maverick, behemoth")
    p.add_argument("--gpus", required=True, help="COUNTxMEMORY, e.g. 8x80GB (GB = GiB, as GPUs are sold)")
    p.add_argument("--seq", default="8192", help="training sequence length (e.g. 8192, 32k)")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch per data rank")
    p.add_argument("--dp", type=int, default=0, help="evaluate this layout only (FSDP degree)")
    p.add_argument("--ep", type=int, default=0, help="expert parallel degree (with --dp/--tp)")
    p.add_argument("--tp", type=int, default=0, help="tensor parallel degree (with --dp/--ep)")
    p.add_argument("--context", default=None, help="also plan serving one sequence of this context (e.g. 10M)")
    p.add_argument("--reserve", type=float, default=6.0, help="GiB per GPU kept free (default 6)")
    p.add_argument("--compute", choices=("bf16", "fp32"), default="bf16", help="compute dtype (default bf16)")
    p.add_argument("--serve-weights", choices=("bf16", "fp8", "int4"), default="bf16",
                   help="weight format when serving (default bf16)")
    p.set_defaults(func=_plan)

    p = sub.add_parser("dcp", help="convert distributed (DCP) checkpoints to and from the HF layout")
    s = p.add_subparsers(dest="dcp_command", required=True)
    for name, helptext in (("to-hf", "DCP training checkpoint -> Hugging Face folder"),
                           ("from-hf", "Hugging Face (or Meta) folder -> model-only DCP checkpoint")):
        c = s.add_parser(name, help=helptext)
        c.add_argument("src")
        c.add_argument("dst")
        c.add_argument("--dtype", default=None, help="float32, bfloat16 (default: as stored)")
        c.set_defaults(func=_dcp)
