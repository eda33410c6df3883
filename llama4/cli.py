"""The ``llama4`` command: argument parsing and a call into the room that does the work."""

from __future__ import annotations

import argparse
import json
import sys


def _params(a: argparse.Namespace) -> int:
    from llama4.model import count_params, flavor, kv_bytes_per_token, vision_flavor

    args = flavor(a.flavor)
    counts = count_params(args, vision_flavor(a.flavor))  # with the vision tower, where the flavor has one
    if a.kv:
        counts["kv_bytes_per_token"] = kv_bytes_per_token(args)
    if a.json:
        print(json.dumps(counts))
    else:
        print(f"{a.flavor}: total {counts['total'] / 1e9:.2f}B, active {counts['active'] / 1e9:.2f}B")
        if "vision" in counts:
            print(f"  text decoder {counts['text'] / 1e9:.2f}B + vision encoder, adapter, projector "
                  f"{counts['vision'] / 1e9:.3f}B")
        if a.kv:
            _print_kv(args, counts["kv_bytes_per_token"])
    return 0


def _print_kv(args, kv: dict) -> None:
    """KV-cache cost per token of context, bf16: a naive cache vs one that follows iRoPE."""
    n_global = sum(args.is_nope_layer(i) or args.attention_chunk_size is None for i in range(args.n_layers))
    print(f"  KV cache, bf16, per sequence ({args.n_layers} layers: {n_global} global/NoPE, "
          f"{args.n_layers - n_global} chunked, chunk {args.attention_chunk_size}):")
    print(f"    naive (every layer keeps everything): {kv['all_layers']:,} bytes per token")
    print(f"    iRoPE-bounded (llama4.infer.KVCache):  {kv['global_layers']:,} bytes per token "
          f"+ {kv['local_layer_bound']:,} bytes fixed (the chunked layers' rings)")
    for n in (8192, 131072, 1 << 20, 10 << 20):
        bounded = kv["global_layers"] * n + kv["local_layer_bound"] * min(1.0, n / (args.attention_chunk_size or n))
        print(f"    {n:>10,} tokens: naive {kv['all_layers'] * n / 2**30:10.2f} GiB   bounded {bounded / 2**30:10.2f} GiB")


def _demo(a: argparse.Namespace) -> int:
    from llama4.demo import run_demo

    return run_demo(out_dir=a.out, seed=a.seed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama4", description="Llama 4 in readable, fast PyTorch")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("params", help="parameter counts of a flavor (meta device, nothing allocated)")
    sp.add_argument("flavor")
    sp.add_argument("--json", action="store_true",
                    help='print {"total": N, "active": N} (+ "text", "vision" for a multimodal flavor)')
    sp.add_argument("--kv", action="store_true", help="also report KV-cache bytes per token (bf16)")
    sp.set_defaults(func=_params)

    sp = sub.add_parser("demo", help="build a debug model, save/load it as a HF checkpoint, generate")
    sp.add_argument("--out", default="runs/demo", help="directory for the demo checkpoint")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=_demo)

    from llama4.data.cli import add_subparser as add_data
    from llama4.infer.cli import add_subparsers as add_infer
    from llama4.tokenizer.cli import add_subparser as add_tokenizer
    from llama4.train.cli import add_subparser as add_train
    from llama4.distributed.cli import add_subparsers as add_distributed
    from llama4.metap.cli import add_subparser as add_metap
    from llama4.tasks.cli import add_subparser as add_tasks
    from llama4.eval.cli import add_subparser as add_eval
    from llama4.posttrain.cli_sft import add_subparser as add_sft
    from llama4.posttrain.cli_dpo import add_subparser as add_dpo
    from llama4.posttrain.cli_rl import add_subparser as add_rl
    from llama4.posttrain.cli_posttrain import add_subparser as add_posttrain
    from llama4.arena.cli import add_subparser as add_arena
    from llama4.quant.cli import add_subparser as add_quantize
    from llama4.experiments.cli import add_subparser as add_experiment
    from llama4.cli_export import add_subparsers as add_export

    add_tokenizer(sub)  # llama4 tokenizer train
    add_data(sub)  # llama4 data prepare
    add_infer(sub)  # llama4 generate / chat / serve
    add_train(sub)  # llama4 train
    add_distributed(sub)  # llama4 plan / dcp to-hf / dcp from-hf
    add_metap(sub)  # llama4 metap coord-check / sweep / predict / validate
    add_tasks(sub)  # llama4 tasks list / sample
    add_eval(sub)  # llama4 eval / eval needle / eval longppl
    add_sft(sub)  # llama4 sft
    add_dpo(sub)  # llama4 dpo
    add_rl(sub)  # llama4 rl
    add_posttrain(sub)  # llama4 posttrain
    add_arena(sub)  # llama4 arena / arena ratings / arena export / arena auto
    add_quantize(sub)  # llama4 quantize
    add_experiment(sub)  # llama4 experiment irope
    add_export(sub)  # llama4 export gguf
    return p


def main(argv: list[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else argv)[:1] in (["train"], ["metap"], ["sft"], ["dpo"], ["rl"], ["posttrain"], ["experiment"]):
        # Before anything imports torch: OpenMP reads its wait policy once, and spinning threads
        # run training 3-10x slower on a shared 2-core machine (PLATFORM.md). The environment wins.
        import os

        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return a.func(a) or 0
    except (ValueError, FileNotFoundError) as e:  # our errors name the field / file / tensor
        print(f"llama4 {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
