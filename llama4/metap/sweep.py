"""``llama4 metap sweep``: the grids that show (or refute) transfer, run in parallel processes.

Every run is a :class:`~llama4.metap.proxy.ProxyRun` of 400 steps x 16 x 64 bytes unless it
says otherwise; MetaP's base is width 32, depth 2, 4 experts of width 1x. Stage 1 (``base``)
tunes MetaPConfig's output multiplier and embedding LR with the global LR at the base shape;
stage 2 uses those knobs for both parametrizations (so they coincide at the base width and
differ only in how they scale) with 6 LRs on a log-2 grid around the base optimum:

* ``width``: widths 32, 64, 128, 256 (8x) x 6 LRs x {MetaP (2 seeds), standard}
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

from llama4.metap.proxy import ProxyRun

WIDTHS = (32, 64, 128, 256)
DEPTHS = (2, 4, 8)
# Stage 1, at the base shape: the per-layer knobs of MetaPConfig that matter most (output
# multiplier, embedding LR) x the global LR. The best triple fixes the knobs for stage 2.
BASE_OUTPUT_MULTS = (1.0, 4.0, 16.0)
BASE_EMBED_LR_MULTS = (1.0, 4.0, 16.0)
BASE_LR_EXPS = (-9, -8, -7, -6, -5)


def base_run(steps: int = 400, width: int = WIDTHS[0]) -> ProxyRun:
    return ProxyRun(width=width, lr=2.0 ** -7, steps=steps, base_width=width, expert_mult=1.0,
                    base_expert_mult=1.0)


def knob_runs(steps: int = 400) -> list[ProxyRun]:
    """Stage 1: the knob grid at the base shape (MetaP and standard coincide there)."""
    b = base_run(steps)
    return [replace(b, family="base", output_mult=o, embed_lr_mult=e, lr=2.0 ** k)
            for o in BASE_OUTPUT_MULTS for e in BASE_EMBED_LR_MULTS for k in BASE_LR_EXPS]


def pick_knobs(rows: list[dict]) -> dict:
    """The stage-1 row with the lowest validation loss -> its knobs and log2 LR."""
    ok = [r for r in rows if r["family"] == "base" and not r["diverged"]]
    if not ok:
        raise RuntimeError("every base-shape run diverged; lower the LR grid")
    best = min(ok, key=lambda r: r["val_loss"])
    return {"output_mult": best["output_mult"], "embed_lr_mult": best["embed_lr_mult"],
            "lr_exp": round(math.log2(best["lr"])), "val_loss": best["val_loss"]}


def plan_runs(knobs: dict, families: tuple[str, ...] = ("width", "depth", "experts", "tokens"),
              widths=WIDTHS, steps: int = 400, seeds: tuple[int, ...] = (0, 1)) -> list[ProxyRun]:
    """Stage 2. The LR grid is 6 points on a log-2 grid around the base optimum, skewed low (the
    standard parametrization's optimum falls with width)."""
    lrs = tuple(2.0 ** (knobs["lr_exp"] + d) for d in range(-3, 3))
    base = replace(base_run(steps, widths[0]), output_mult=knobs["output_mult"],
                   embed_lr_mult=knobs["embed_lr_mult"])
    runs: list[ProxyRun] = []

    def add(family, params, seed_list, **kw):
        for p in params:
            for s in seed_list:
                for lr in lrs:
                    runs.append(replace(base, family=family, param=p, seed=s, lr=lr, **kw))

    for fam in families:
        if fam == "width":
            for w in widths:
                add("width", ("metap",), seeds, width=w)
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
                done[run_key(ProxyRun(**{k: row[k] for k in ProxyRun.__dataclass_fields__}))] = row
    todo = [r for r in runs if run_key(r) not in done]
    todo.sort(key=lambda r: -r.cost())
    workers = workers or min(len(todo), os.cpu_count() or 1) or 1
    if todo:
        say(f"{len(todo)} runs to do ({len(runs) - len(todo)} already in {out_jsonl}), {workers} worker(s)")
    t0 = time.perf_counter()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    ctx = mp.get_context("fork" if sys.platform != "win32" else "spawn")
    with ctx.Pool(workers, maxtasksperchild=20) as pool, out_jsonl.open("a") as f:
        for i, row in enumerate(pool.imap_unordered(_worker, todo), 1):
            f.write(json.dumps(row) + "\n")
            f.flush()
            done[run_key(ProxyRun(**{k: row[k] for k in ProxyRun.__dataclass_fields__}))] = row
            say(f"[{i}/{len(todo)} {time.perf_counter() - t0:6.0f}s] {row['family']:>7} {row['param']:>8} "
                f"w{row['width']} L{row['depth']} E{row['n_experts']} x{row['expert_mult']:g} "
                f"steps {row['steps']} seed {row['seed']} lr 2^{_log2(row['lr']):+.1f}: val {row['val_loss']:.4f}")
    return [done[run_key(r)] for r in runs]


def _log2(x: float) -> float:
    return math.log2(x)


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
    say("stage 1: output multiplier x embedding LR x LR at the base shape")
    base_rows = run_all(knob_runs(steps), jsonl, workers, say)
    knobs = pick_knobs(base_rows)
    say(f"base knobs: output_mult {knobs['output_mult']:g}, embed_lr_mult {knobs['embed_lr_mult']:g}, "
        f"LR 2^{knobs['lr_exp']} (val {knobs['val_loss']:.4f})")
    say("stage 2: " + ", ".join(families))
    rows = run_all(plan_runs(knobs, families, widths, steps, seeds), jsonl, workers, say)
    return write_report(out, base_rows + rows, knobs, wall_s=add_wall_time(out, time.perf_counter() - t0))


def add_wall_time(out: Path, seconds: float) -> float:
    """Total training wall time of the sweep in ``out`` over every (resumed) invocation."""
    f = Path(out) / "wall_time.json"
    total = (json.loads(f.read_text())["seconds"] if f.exists() else 0.0) + seconds
    f.write_text(json.dumps({"seconds": round(total, 1)}) + "\n")
    return total
