"""``llama4 dpo ...``: argument parsing only (no torch import); the work is in :mod:`llama4.posttrain.dpo`."""

from __future__ import annotations

import argparse

from llama4.posttrain.cli_common import (RUN_FLAGS, add_parallel_arguments, add_run_arguments, parallel_layout,
                                         run_cli, run_overrides)
from llama4.posttrain.lora_args import add_lora_arguments, check_lora_args


def _dpo(a: argparse.Namespace) -> int:
    check_lora_args(a)
    from llama4.posttrain.dpo import dpo

    parallel = parallel_layout(a)
    return run_cli("dpo", lambda: dpo(
        a.policy, a.pairs, a.out, ref=a.ref, beta=a.beta, max_steps=a.max_steps, lr=a.lr, batch_size=a.batch_size,
        max_length=a.max_length, resume=a.resume, seed=a.seed, overrides=run_overrides(a, RUN_FLAGS + ("grad_accum",)),
        lora=a, parallel=parallel))


def add_subparser(subparsers) -> None:
    s = subparsers.add_parser(
        "dpo", help="direct preference optimization on chosen/rejected pairs (sigmoid loss, as TRL)",
        description="Trains --policy (a llama4.save / HF directory or a training run folder) on TRL conversational "
        "preference JSONL ({\"prompt\": [messages], \"chosen\": [assistant message], \"rejected\": [assistant "
        "message]}) with the sigmoid DPO loss against the frozen starting policy (its log-probs computed once), "
        "into --out: checkpoints, metrics.jsonl (loss, rewards/chosen, rewards/rejected, rewards/margins, "
        "rewards/accuracies), loss.png, summary.json and OUT/final.")
    s.add_argument("--policy", required=True, help="model to start from (keeps its tokenizer.model)")
    s.add_argument("--pairs", required=True, help="TRL conversational preference JSONL file")
    s.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, loss.png, final/)")
    s.add_argument("--ref", default=None, help="reference model (default: the policy; must share its tokenizer)")
    s.add_argument("--beta", type=float, default=0.1, help="DPO temperature beta (default 0.1, TRL's)")
    s.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-6, constant)")
    s.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 100)")
    s.add_argument("--batch-size", type=int, default=None, help="pairs per micro-batch (default 4)")
    s.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    s.add_argument("--max-length", type=int, default=None,
                   help="longest prompt + completion in tokens (default: the policy's max_seq_len); longer is an error")
    s.add_argument("--seed", type=int, default=0, help="pair order seed")
    add_run_arguments(s)
    add_parallel_arguments(s)
    add_lora_arguments(s)
    s.set_defaults(func=_dpo)
