"""``llama4 rl ...``: argument parsing only (no torch import); the work is in :mod:`llama4.posttrain.rl`."""

from __future__ import annotations

import argparse

from llama4.posttrain.cli_common import add_run_arguments, run_cli, run_overrides
from llama4.posttrain.lora_args import add_lora_arguments, check_lora_args


def _rl(a: argparse.Namespace) -> int:
    check_lora_args(a)
    from llama4.posttrain.rl import rl

    return run_cli("rl", lambda: rl(a.policy, a.out, a.tasks, group_size=a.group_size, prompts_per_step=a.prompts_per_step,
           max_steps=a.max_steps, lr=a.lr, beta=a.beta, loss_type=a.loss_type, temperature=a.temperature,
           top_p=a.top_p, max_new_tokens=a.max_new_tokens, scale_rewards=a.scale_rewards, pool_size=a.pool_size,
           min_pass=a.min_pass, max_pass=a.max_pass, solved_at=a.solved_at, difficulty=a.difficulty,
       reestimate_every=a.reestimate_every, resume=a.resume, seed=a.seed, overrides=run_overrides(a), lora=a))


def add_subparser(subparsers) -> None:
    s = subparsers.add_parser(
        "rl", help="online RL with verifiable rewards (GRPO, adaptive prompt filtering)",
        description="Trains --policy with GRPO on the verifiable --tasks: each step samples --group-size "
        "completions of --prompts-per-step prompts with our batched KV-cache generator from the current policy, "
        "scores them with the task verifiers, and takes one optimizer step on the clipped, group-normalised loss "
        "(--loss-type grpo|bnpo|dr_grpo|dapo, optional k3 KL with --beta). Prompts come from a pool that keeps "
        "only medium-to-hard ones by running pass rate. Writes checkpoints, metrics.jsonl (reward, pass_rate, kl, "
        "entropy, response_length, pool/kept_fraction), loss.png, summary.json and OUT/final.")
    s.add_argument("--policy", required=True, help="model to start from (keeps its tokenizer.model)")
    s.add_argument("--tasks", required=True, help="task names, comma-separated (see `llama4 tasks list`)")
    s.add_argument("--out", required=True, help="run folder")
    s.add_argument("--group-size", type=int, default=8, help="samples per prompt G (default 8)")
    s.add_argument("--prompts-per-step", type=int, default=4, help="prompts per optimizer step (default 4)")
    s.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 100)")
    s.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-5, constant)")
    s.add_argument("--beta", type=float, default=0.0, help="k3 KL coefficient to the starting policy (default 0)")
    s.add_argument("--loss-type", default="dapo", choices=["grpo", "bnpo", "dr_grpo", "dapo"],
                   help="loss normalisation, TRL's names (default dapo)")
    s.add_argument("--scale-rewards", default="group", choices=["group", "batch", "none"],
                   help="advantage scaling (default group)")
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="longest completion (default 64)")
    s.add_argument("--pool-size", type=int, default=64, help="active prompts kept in the pool (default 64)")
    s.add_argument("--min-pass", type=float, default=0.0, help="drop prompts with pass rate <= this (default 0)")
    s.add_argument("--max-pass", type=float, default=1.0, help="drop prompts with pass rate >= this (default 1)")
    s.add_argument("--solved-at", type=float, default=1.0, help="verifier score counted as solved (default 1.0)")
    s.add_argument("--difficulty", type=int, default=None, help="starting task difficulty (default the lowest)")
    s.add_argument("--reestimate-every", type=int, default=0,
                   help="steps between pass-rate re-estimation passes over the pool (default 0: off)")
    s.add_argument("--seed", type=int, default=0, help="prompt and sampling seed")
    add_run_arguments(s)
    add_lora_arguments(s)
    s.set_defaults(func=_rl)
