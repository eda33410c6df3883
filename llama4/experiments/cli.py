"""``llama4 experiment irope --out DIR [--seeds 2] [--quick]``: the iRoPE length-generalisation study."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_subparser(sub) -> None:
    p = sub.add_parser("experiment", help="controlled studies on models trained here (irope)")
    subs = p.add_subparsers(dest="experiment", required=True, metavar="{irope}")
    e = subs.add_parser("irope", help="does iRoPE deliver? length generalisation and retrieval vs controls",
                        description="Trains irope, irope-noqk, rope, nope and local at one size, steps, data, LR "
                                    "and seeds at length L, probes each with `llama4 eval longppl` and `llama4 eval "
                                    "needle` far beyond L, chooses temperature tuning on one length and reports it "
                                    "on others, probes the default model too, and writes DIR/verdict.json (the pass "
                                    "criteria of LONG_CONTEXT.md §7), DIR/report.md, DIR/summary.json and plots. "
                                    "Resumable: a second call reuses every finished run and probe.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--out", required=True, help="study folder")
    e.add_argument("--seeds", type=int, default=2, help="seeds per variant (the criteria need >= 2)")
    e.add_argument("--quick", action="store_true", help="a minutes-long version (tiny models, few steps): the tests")
    e.add_argument("--default-model", default=None,
                   help="the default model to probe (a run folder or model folder); default: train the default "
                        "recipe (default-metap; debug with --quick) into DIR/default")
    e.add_argument("--default-train-len", type=int, default=None,
                   help="its training length (default: seq_len of the train_config.json beside it)")
    e.add_argument("--workers", type=int, default=2, help="runs and probes in parallel processes")
    e.add_argument("--threads", type=int, default=1, help="torch threads per process")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_irope)


def _irope(a) -> int:
    from llama4.experiments.irope.spec import FULL, QUICK
    from llama4.experiments.irope.study import run_study

    for flag, v in (("--workers", a.workers), ("--threads", a.threads)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    t0 = time.perf_counter()
    s = run_study(Path(a.out), QUICK if a.quick else FULL, seeds=a.seeds,
                  given_default=Path(a.default_model) if a.default_model else None,
                  default_train_len=a.default_train_len, workers=a.workers, threads=a.threads,
                  progress=not a.no_progress)
    print()
    print(f"{'criterion':<100} {'pass':>5}  measured")
    for r in s["verdict"]:
        print(f"{r['criterion'][:100]:<100} {'yes' if r['pass'] else 'NO':>5}  {r['measured']}")
    print(f"\nwall time of this call: {time.perf_counter() - t0:.0f}s; phases (s): {s['timing_s']}")
    print(f"wrote {Path(a.out) / 'verdict.json'}, report.md, summary.json, delta.png, loss_by_position.png, passkey.png")
    return 0
