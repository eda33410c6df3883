"""``llama4 metap sweep``: the grids that show (or refute) transfer, run in parallel processes.

Every run is a :class:`~llama4.metap.proxy.ProxyRun` of 400 steps x 16 x 64 bytes unless it
says otherwise; MetaP's base is width 32, depth 2, 4 experts of width 1x. Stage 1 (``base``)
tunes MetaPConfig's per-layer knobs (hidden init std, output multiplier and LR, embedding LR)
with the global LR at the base shape; stage 2 uses those knobs for both parametrizations (so
they coincide at the base width and differ only in how they scale) with 7 LRs on a log-2 grid
around the base optimum:

* ``width``: widths 32, 64, 128, 256 (8x) x 7 LRs x {MetaP (2 seeds, 4 at 32 and 64), standard}
* ``depth``: depths 2, 4, 8 at width 64, MetaP (CompleteP residual scaling)
* ``experts``: 16 experts, and experts 4x wider, at width 64, MetaP and standard
* ``tokens``: 200 and 800 steps at width 64, MetaP (the predictor's token-budget axis)

Results go to ``DIR/runs.jsonl`` as they finish (a rerun skips what is there, so an interrupted
sweep resumes), then ``DIR/sweep.csv``, ``DIR/summary.json`` and ``DIR/sweep.png``.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from llama4.metap.proxy import ProxyRun

WIDTHS = (32, 64, 128, 256)
DEPTHS = (2, 4, 8)
# Stage 1, at the base shape: MetaPConfig's per-layer knobs and the global LR, by a seeded random
# search (log-uniform in these ranges) with one round of successive halving: every candidate
# once, the best ``BASE_FINALISTS`` with ``BASE_FINAL_SEEDS`` more seeds, the best seed mean wins.
KNOB_RANGES = {"lr": (2.0 ** -9, 2.0 ** -4), "init_std": (0.01, 0.1), "output_mult": (1.0, 64.0),
               "output_lr_mult": (1 / 16, 1.0), "embed_lr_mult": (0.5, 16.0)}
KNOBS = ("init_std", "output_mult", "output_lr_mult", "embed_lr_mult")
BASE_CANDIDATES = 40
BASE_FINALISTS = 8
BASE_FINAL_SEEDS = (1, 2)


def base_run(steps: int = 400, width: int = WIDTHS[0]) -> ProxyRun:
    return ProxyRun(width=width, lr=2.0 ** -7, steps=steps, base_width=width, expert_mult=1.0,
                    base_expert_mult=1.0)


def knob_candidates(n: int = BASE_CANDIDATES, seed: int = 0) -> list[dict]:
    """The standard parametrization's own values first, then log-uniform draws (3 digits)."""
    rng = np.random.default_rng(seed)
    out = [{"lr": 2.0 ** -7, "init_std": 0.02, "output_mult": 1.0, "output_lr_mult": 1.0, "embed_lr_mult": 1.0}]
    while len(out) < n:
        out.append({k: float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.3g}")
                    for k, (lo, hi) in KNOB_RANGES.items()})
    return out


def knob_runs(steps: int = 400, candidates: list[dict] | None = None, seeds=(0,),
              width: int = WIDTHS[0]) -> list[ProxyRun]:
    """Stage 1 runs at the base shape (MetaP and standard coincide there)."""
    b = replace(base_run(steps, width), family="base")
    return [replace(b, seed=s, **c) for c in (candidates or knob_candidates()) for s in seeds]


def _knobs_of(row: dict) -> dict:
    return {k: row[k] for k in ("lr", *KNOBS)}


def finalists(rows: list[dict], n: int = BASE_FINALISTS) -> list[dict]:
    ok = sorted((r for r in rows if r["family"] == "base" and r["seed"] == 0 and not r["diverged"]),
                key=lambda r: r["val_loss"])
    if not ok:
        raise RuntimeError("every base-shape run diverged; narrow KNOB_RANGES")
    return [_knobs_of(r) for r in ok[:n]]


def pick_knobs(rows: list[dict]) -> dict:
    """The finalist with the lowest validation loss averaged over its seeds."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        if r["family"] == "base":
            by.setdefault(json.dumps(_knobs_of(r), sort_keys=True), []).append(r)
    n_seeds = max(len(v) for v in by.values())
    full = [v for v in by.values() if len(v) == n_seeds and not any(r["diverged"] for r in v)]
    best = min(full, key=lambda v: sum(r["val_loss"] for r in v) / len(v))
    return {**_knobs_of(best[0]), "lr_exp": round(math.log2(best[0]["lr"])), "seeds": len(best),
            "val_loss": sum(r["val_loss"] for r in best) / len(best)}


def plan_runs(knobs: dict, families: tuple[str, ...] = ("width", "depth", "experts", "tokens"),
              widths=WIDTHS, steps: int = 400, seeds: tuple[int, ...] = (0, 1)) -> list[ProxyRun]:
    """Stage 2. The LR grid is 7 points on a log-2 grid around the base optimum, skewed low (the
    standard parametrization's optimum falls with width)."""
    lrs = tuple(2.0 ** (knobs["lr_exp"] + d) for d in range(-4, 3))
    base = replace(base_run(steps, widths[0]), **{k: knobs[k] for k in KNOBS})
    runs: list[ProxyRun] = []

    def add(family, params, seed_list, **kw):
        for p in params:
            for s in seed_list:
                for lr in lrs:
                    runs.append(replace(base, family=family, param=p, seed=s, lr=lr, **kw))

    for fam in families:
        if fam == "width":
            for w in widths:
                # narrow models are the noisiest and the cheapest: twice the seeds for the two
                # narrowest widths, so every width's optimum is about as well determined
                extra = tuple(range(len(seeds), 2 * len(seeds))) if w <= widths[1] else ()
                add("width", ("metap",), seeds + extra, width=w)
                add("width", ("standard",), seeds[:1], width=w)
        elif fam == "depth":
            for d in DEPTHS[1:]:  # depth 2 at width 64 is in the width family
                add("depth", ("metap",), seeds[:1], width=64, depth=d)
        elif fam == "experts":
            add("experts", ("metap", "standard"), seeds[:1], width=64, n_experts=16)
            add("experts", ("metap", "standard"), seeds[:1], width=64, expert_mult=4.0)
        elif fam == "tokens":
            for n in (steps // 2, steps * 2):
                add("tokens", ("metap",), seeds[:1], width=64, steps=n)
        else:
            raise ValueError(f"unknown sweep family {fam!r}; use width, depth, experts, tokens")
    return runs


def run_key(run: ProxyRun) -> str:
    d = asdict(run)
    d.pop("family")
    return json.dumps(d, sort_keys=True)


def _worker(run: ProxyRun) -> dict:
    import torch

    torch.set_num_threads(1)
    from llama4.metap.proxy import train_proxy

    return train_proxy(run).row()


def run_all(runs: list[ProxyRun], out_jsonl: Path, workers: int | None = None, say=print) -> list[dict]:
    """Run what ``out_jsonl`` does not hold yet, largest first, ``workers`` processes of one
    thread each; rows are appended as runs finish. Returns every row for ``runs``."""
    out_jsonl = Path(out_jsonl)
    done: dict[str, dict] = {}
    if out_jsonl.exists():
        for line in out_jsonl.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[run_key(ProxyRun.from_row(row))] = row
    todo = [r for r in runs if run_key(r) not in done]
    todo.sort(key=lambda r: -r.cost())
    workers = workers or min(len(todo), os.cpu_count() or 1) or 1
    if todo:
        say(f"{len(todo)} runs to do ({len(runs) - len(todo)} already in {out_jsonl}), {workers} worker(s)")
    t0 = time.perf_counter()
    ctx = mp.get_context("fork" if sys.platform != "win32" else "spawn")
    with ctx.Pool(workers, maxtasksperchild=20) as pool, out_jsonl.open("a") as f:
        for i, row in enumerate(pool.imap_unordered(_worker, todo), 1):
            f.write(json.dumps(row) + "\n")
            f.flush()
            done[run_key(ProxyRun.from_row(row))] = row
            say(f"[{i}/{len(todo)} {time.perf_counter() - t0:6.0f}s] {row['family']:>7} {row['param']:>8} "
                f"w{row['width']} L{row['depth']} E{row['n_experts']} x{row['expert_mult']:g} "
                f"steps {row['steps']} seed {row['seed']} lr 2^{math.log2(row['lr']):+.1f}: val {row['val_loss']:.4f}")
    return [done[run_key(r)] for r in runs]


def sweep(out, families: tuple[str, ...] = ("width", "depth", "experts", "tokens"), widths=WIDTHS,
          steps: int = 400, seeds: tuple[int, ...] = (0, 1), workers: int | None = None, say=print) -> dict:
    """Both stages into ``out``, then the report (``llama4.metap.report``). Returns the summary."""
    from llama4.metap.proxy import corpus_bytes
    from llama4.metap.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus_bytes("train"), corpus_bytes("val")  # once, before the workers fork
    t0 = time.perf_counter()
    jsonl = out / "runs.jsonl"
    say(f"stage 1: random search of the base knobs ({', '.join(KNOBS)}, LR) at the base shape")
    first = run_all(knob_runs(steps, width=widths[0]), jsonl, workers, say)
    final = run_all(knob_runs(steps, finalists(first), BASE_FINAL_SEEDS, widths[0]), jsonl, workers, say)
    base_rows = first + final
    knobs = pick_knobs(base_rows)
    say("base knobs: " + ", ".join(f"{k} {knobs[k]:.3g}" for k in ("lr", *KNOBS))
        + f" (val {knobs['val_loss']:.4f}, mean of {knobs['seeds']} seeds)")
    say("stage 2: " + ", ".join(families))
    rows = run_all(plan_runs(knobs, families, widths, steps, seeds), jsonl, workers, say)
    return write_report(out, base_rows + rows, knobs, wall_s=add_wall_time(out, time.perf_counter() - t0))


def add_wall_time(out: Path, seconds: float) -> float:
    """Total training wall time of the sweep in ``out`` over every (resumed) invocation."""
    from llama4.metap.report import write_text

    f = Path(out) / "wall_time.json"
    total = (json.loads(f.read_text())["seconds"] if f.exists() else 0.0) + seconds
    write_text(f, json.dumps({"seconds": round(total, 1)}) + "\n")
    return total
