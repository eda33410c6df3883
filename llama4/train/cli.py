"""``llama4 train ...``: argument parsing only; the work is in :mod:`llama4.train.trainer`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


def _train(a: argparse.Namespace) -> int:
    from llama4.recipes import get_recipe
    from llama4.train import apply_overrides, train

    cfg = get_recipe(a.recipe)
    sets = list(a.set or [])
    for flag, key in (("max_steps", "max_steps"), ("checkpoint_every", "checkpoint_every"), ("seed", "seed"),
                      ("device", "device"), ("dtype", "dtype"), ("threads", "threads")):
        v = getattr(a, flag)
        if v is not None:
            sets.append(f"{key}={v}")
    if a.compile:
        sets.append("compile=true")
    if a.activation_checkpointing:
        sets.append("activation_checkpointing=true")
    if a.no_progress:
        sets.append("progress=false")
    if a.metap:
        sets = _metap_overrides(a.metap) + sets  # explicit --set still wins
    cfg = apply_overrides(cfg, sets)
    if "WORLD_SIZE" in os.environ or a.dp or a.ep or a.tp or a.dp_replicate:  # torchrun / a layout given
        from llama4.distributed import ParallelConfig
        from llama4.distributed.run import train_distributed

        layout = ParallelConfig(dp=a.dp or -1, dp_replicate=a.dp_replicate or -1, ep=a.ep or 1, tp=a.tp or 1)
        return run_cli("train", lambda: train_distributed(cfg, a.out, resume=a.resume, parallel=layout))
    return run_cli("train", lambda: train(cfg, a.out, resume=a.resume))


def run_cli(command: str, work: Callable[[], object]) -> int:
    """Run a training command's work; a diverged run exits 3, an --out that holds another run 2
    (``llama4.cli.main`` turns ValueError / FileNotFoundError into exit 2 with the message)."""
    from llama4.train import TrainingDiverged

    try:
        work()
    except TrainingDiverged as e:
        print(f"llama4 {command}: {e}", file=sys.stderr)
        return 3
    except FileExistsError as e:
        print(f"llama4 {command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _metap_overrides(path: str) -> list[str]:
    """``--metap FILE``: the ``train_overrides`` of a `llama4 metap predict --out FILE` as --set items."""
    import json

    try:
        d = json.loads(open(path).read())["train_overrides"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--metap {path}: not a `llama4 metap predict` output ({e})") from None
    return [f"{k}={json.dumps(v)}" for k, v in d.items()]


def add_subparser(subparsers) -> None:
    # No torch import here (see _train): the recipe name is checked when the recipe is built.
    t = subparsers.add_parser(
        "train", help="pretrain a Llama 4 from scratch (own BPE + embedded multilingual corpus by default)",
        description="Runs a named recipe into --out: tokenizer, shards, training with checkpoints, "
        "evaluation, samples, plots, and the HF export in OUT/final.")
    t.add_argument("--recipe", default="default",
                   help="named recipe in llama4/recipes: debug, default (the default), default-dense, default-metap, "
                   "scout-like")
    t.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, plots, final/)")
    t.add_argument("--max-steps", type=int, default=None, help="optimizer steps; sets the schedule's length")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    t.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1 ...")
    t.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16"], help="autocast dtype")
    t.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    t.add_argument("--compile", action="store_true", help="torch.compile every block")
    t.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    t.add_argument("--metap", default=None, metavar="FILE",
                   help="train under MetaP with the base LR and per-layer rules of `llama4 metap predict --out FILE`")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any TrainConfig field, e.g. --set lr=1e-3 --set model.dim=256 (repeatable)")
    t.add_argument("--dp", type=int, default=0,
                   help="under torchrun: FSDP2 shard degree (default: the ranks --tp and --dp-replicate leave)")
    t.add_argument("--dp-replicate", type=int, default=0, help="under torchrun: replicated data-parallel degree")
    t.add_argument("--ep", type=int, default=0, help="under torchrun: expert parallel degree (divides the data ranks)")
    t.add_argument("--tp", type=int, default=0, help="under torchrun: tensor parallel degree")
    t.set_defaults(func=_train)
