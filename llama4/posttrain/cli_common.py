"""What the post-training commands share on the command line (no torch import): the run flags
every stage takes, their TrainConfig overrides, and the exit codes (2 bad input, 3 diverged)."""

from __future__ import annotations

import argparse
import os

from llama4.train.cli import run_cli  # noqa: F401  (the stage commands' exit codes, as `llama4 train`)

RUN_FLAGS = ("device", "dtype", "threads", "checkpoint_every")


def add_run_arguments(s: argparse.ArgumentParser) -> None:
    """--resume, --checkpoint-every, --device, --dtype, --threads, --no-progress."""
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    s.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints (default 50)")
    s.add_argument("--device", default=None, help="auto (default), cpu, cuda, ...")
    s.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16"], help="autocast dtype")
    s.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_overrides(a: argparse.Namespace, flags=RUN_FLAGS) -> dict:
    """The TrainConfig fields the given flags set (those left at None keep the stage's default)."""
    out = {f: getattr(a, f) for f in flags if getattr(a, f, None) is not None}
    if a.no_progress:
        out["progress"] = False
    return out


def add_parallel_arguments(s: argparse.ArgumentParser) -> None:
    """--dp, --ep: the layout under torchrun, as `llama4 train` takes it."""
    s.add_argument("--dp", type=int, default=0,
                   help="under torchrun: FSDP2 data-parallel degree (--batch-size is per data rank)")
    s.add_argument("--ep", type=int, default=0, help="under torchrun: expert parallel degree (divides the data ranks)")


def parallel_layout(a: argparse.Namespace):
    """A ``ParallelConfig`` under torchrun or when a layout is given (as `llama4 train`), else None."""
    if "WORLD_SIZE" not in os.environ and not a.dp and not a.ep:
        return None
    from llama4.distributed import ParallelConfig

    return ParallelConfig(dp=a.dp or -1, ep=a.ep or 1)
