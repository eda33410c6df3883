"""``llama4 posttrain ...``: argument parsing only (no torch import); the work is in
:mod:`llama4.posttrain.pipeline`."""

from __future__ import annotations

import argparse

from llama4.posttrain.cli_common import run_cli
from llama4.posttrain.recipes import RECIPES


def _posttrain(a: argparse.Namespace) -> int:
    from llama4.posttrain.pipeline import posttrain

    return run_cli("posttrain", lambda: posttrain(a.recipe, a.base, a.out, pairs=a.pairs, resume=a.resume,
                                                  threads=a.threads, progress=not a.no_progress))


def add_subparser(subparsers) -> None:
    s = subparsers.add_parser(
        "posttrain", help="Llama 4's post-training: pruned SFT -> online RL -> DPO, measured after every stage",
        description="Turns --base into an assistant in --out: SFT on the recipe's tasks (the easiest half of the "
        "examples, by the base's own loss, dropped), GRPO on the tasks the SFT model solves sometimes, then DPO on "
        "the policy's own wrong or unsafe answers against the verified ones (plus --pairs). After every stage: "
        "held-out test scores per task and language, refusal rates on harmful requests and harmless look-alikes, "
        "validation loss on the pretraining text. Writes OUT/{sft,rl,dpo}/ (run folders), OUT/summary.json, "
        "OUT/stages.png and OUT/final (llama4 chat --model OUT). Recipes: "
        + "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()))
    s.add_argument("--recipe", default="default", choices=list(RECIPES), help="what to run (default: default)")
    s.add_argument("--base", required=True, help="the pretrained model (a llama4.save directory or a run folder)")
    s.add_argument("--out", required=True, help="pipeline folder")
    s.add_argument("--pairs", default=None,
                   help="extra preference pairs for DPO (TRL conversational JSONL, e.g. `llama4 arena export`)")
    s.add_argument("--resume", action="store_true", help="continue a pipeline: stages and measurements done are kept")
    s.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    s.set_defaults(func=_posttrain)
