"""``llama4 sft ...``: argument parsing only (no torch import); the work is in :mod:`llama4.posttrain.sft`."""

from __future__ import annotations

import argparse

from llama4.posttrain.cli_common import (RUN_FLAGS, add_parallel_arguments, add_run_arguments, parallel_layout,
                                         run_cli, run_overrides)
from llama4.posttrain.lora_args import add_lora_arguments, check_lora_args


def _sft(a: argparse.Namespace) -> int:
    check_lora_args(a)
    from llama4.posttrain.sft import sft
    from llama4.train.config import apply_overrides

    overrides = run_overrides(a, RUN_FLAGS + ("grad_accum",))
    if a.set:  # checked against TrainConfig's fields and types (a typo names the field)
        from llama4.train.config import TrainConfig

        probe = apply_overrides(TrainConfig(), a.set)
        for item in a.set:
            key = item.split("=", 1)[0]
            if key.startswith("model."):
                raise ValueError(f"--set {item}: the model is the base's; model fields cannot change")
            overrides[key] = getattr(probe, key)
    parallel = parallel_layout(a)
    return run_cli("sft", lambda: sft(
        a.base, a.out, data=a.data, tasks=a.tasks, max_steps=a.max_steps, lr=a.lr, batch_size=a.batch_size,
        seq_len=a.seq_len, resume=a.resume, seed=a.seed, n_per_task=a.n_per_task, difficulty=a.difficulty,
        truncate=a.truncate, group_by_length=a.group_by_length, overrides=overrides, parallel=parallel, lora=a))


def add_subparser(subparsers) -> None:
    s = subparsers.add_parser(
        "sft", help="supervised fine-tuning of a model on chat data (loss on assistant tokens only)",
        description="Fine-tunes --base (a llama4.save / HF directory or a training run folder) on TRL "
        "conversational JSONL ({\"messages\": [{\"role\", \"content\"}, ...], \"tools\"?: [...]}) or on the "
        "train split of verifiable tasks, into --out: checkpoints, metrics.jsonl, loss.png, summary.json and "
        "OUT/final (loadable by llama4.load, llama4 chat, llama4 serve).")
    s.add_argument("--base", required=True, help="model to start from (keeps its tokenizer.model)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="TRL conversational JSONL file")
    src.add_argument("--tasks", help="comma-separated task names (llama4 tasks list): train split, reference answers")
    s.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, loss.png, final/)")
    s.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 200)")
    s.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4, cosine to 10%%)")
    s.add_argument("--batch-size", type=int, default=None, help="conversations per micro-batch (default 8)")
    s.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    s.add_argument("--seq-len", type=int, default=None,
                   help="longest conversation in tokens (default 512); longer ones are an error unless --truncate")
    s.add_argument("--truncate", action="store_true", help="cut conversations longer than --seq-len instead of failing")
    s.add_argument("--group-by-length", action="store_true",
                   help="batch conversations of similar length (less padding; transformers' option of that name)")
    s.add_argument("--seed", type=int, default=0, help="data order (and task examples) seed")
    s.add_argument("--n-per-task", type=int, default=200, help="with --tasks: train examples per task")
    s.add_argument("--difficulty", type=int, default=1, help="with --tasks: task difficulty level")
    add_run_arguments(s)
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override another TrainConfig field, e.g. --set warmup_steps=0 (repeatable)")
    add_parallel_arguments(s)
    add_lora_arguments(s)
    s.set_defaults(func=_sft)
