"""The ``llama4`` command: argument parsing and a call into the room that does the work."""

from __future__ import annotations

import argparse
import json
import sys


def _params(a: argparse.Namespace) -> int:
    from llama4.model import count_params, flavor, kv_bytes_per_token

    args = flavor(a.flavor)
    counts = count_params(args)
    if a.kv:
        counts["kv_bytes_per_token"] = kv_bytes_per_token(args)
    if a.json:
        print(json.dumps(counts))
    else:
        print(f"{a.flavor}: total {counts['total'] / 1e9:.2f}B, active {counts['active'] / 1e9:.2f}B")
        for k, v in counts.get("kv_bytes_per_token", {}).items():
            print(f"  kv {k}: {v:,} bytes")
    return 0


def _demo(a: argparse.Namespace) -> int:
    from llama4.demo import run_demo

    return run_demo(out_dir=a.out, seed=a.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama4", description="Llama 4 in readable, fast PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("params", help="parameter counts of a flavor (meta device, nothing allocated)")
    sp.add_argument("flavor")
    sp.add_argument("--json", action="store_true", help='print {"total": N, "active": N}')
    sp.add_argument("--kv", action="store_true", help="also report KV-cache bytes per token (bf16)")
    sp.set_defaults(func=_params)

    sp = sub.add_parser("demo", help="build a debug model, save/load it as a HF checkpoint, generate")
    sp.add_argument("--out", default="runs/demo", help="directory for the demo checkpoint")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=_demo)

    from llama4.data.cli import add_subparser as add_data
    from llama4.infer.cli import add_subparsers as add_infer
    from llama4.tokenizer.cli import add_subparser as add_tokenizer

    add_tokenizer(sub)  # llama4 tokenizer train
    add_data(sub)  # llama4 data prepare
    add_infer(sub)  # llama4 generate / chat / serve
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.func(a) or 0
    except (ValueError, FileNotFoundError) as e:  # our errors name the field / file / tensor
        print(f"llama4 {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
