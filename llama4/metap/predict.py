"""``llama4 metap predict`` and ``llama4 metap validate``: from a sweep to hyper-parameters.

The predictor fits log2 LR* = c0 + sum_j c_j log2(x_j / base_j) over the sweep's MetaP
configurations (width, depth, token budget, expert count, expert width: whichever the sweep
varied), then gives a target its base LR and MetaP's per-group table. Under a parametrization
that transfers, the width and depth slopes come out near 0 and the token slope negative
(longer runs want smaller LRs). The batch size was not varied by the sweep: the LR is for the
sweep's tokens per step, and the output says so.

``validate`` checks the predictor where it was not fitted: a model wider than every proxy, a
small LR sweep there, and the loss at the predicted LR against the best one found.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

from llama4.metap.fit import LRLaw, Optimum, fit_law, group_configs, lr_curve, optimum, point_of
from llama4.metap.param import BaseShape, MetaP, MetaPConfig
from llama4.metap.proxy import ProxyRun, proxy_args
from llama4.metap.report import write_text
from llama4.model.args import ModelArgs

# The bar for the held-out check: the predicted LR's loss within 1% of the best found.
MAX_HELDOUT_GAP = 0.01
# The sweep of the README (runs.jsonl, summary.json, heldout.json), shipped so `predict` works
# without re-running 27 minutes of proxies; `llama4 metap sweep --out DIR` makes your own.
REFERENCE_SWEEP = Path(__file__).with_name("reference_sweep")


class SweepError(ValueError):
    """A sweep folder that is missing, incomplete or not a sweep."""


def load_sweep(sweep_dir) -> tuple[list[dict], dict]:
    d = Path(sweep_dir)
    runs, summary = d / "runs.jsonl", d / "summary.json"
    if not runs.exists() or not summary.exists():
        raise SweepError(f"{d}: not a finished sweep (needs runs.jsonl and summary.json from `llama4 metap sweep`)")
    rows = [json.loads(line) for line in runs.read_text().splitlines() if line.strip()]
    return rows, json.loads(summary.read_text())


def base_run_of(rows: list[dict]) -> ProxyRun:
    """The sweep's base proxy (its shape, knobs and token budget) as a run."""
    r = next(r for r in rows if r["family"] == "width" and r["param"] == "metap"
             and r["width"] == r["base_width"] and r["seed"] == 0)
    return ProxyRun.from_row(r)


def metap_optima(rows: list[dict]) -> list[tuple[dict, Optimum]]:
    stage2 = [r for r in rows if r["family"] not in ("base", "heldout") and r["param"] == "metap"]
    return [(point_of(rs[0]), optimum(rs)) for rs in group_configs(stage2).values()]


def fit_sweep(rows: list[dict]) -> tuple[LRLaw, ProxyRun]:
    """-> (the LR law, the base ProxyRun) fitted on a sweep's rows (held-out runs left out)."""
    base = base_run_of(rows)
    return fit_law(metap_optima(rows), point_of(vars(base))), base


def target_args(spec: str) -> ModelArgs:
    """A flavor name (``scout``...), a training recipe (``default``...), or a JSON file of
    ModelArgs (``config.json`` of a HF checkpoint works too)."""
    from llama4.model.args import FLAVORS, flavor

    if spec in FLAVORS:
        return flavor(spec)
    p = Path(spec)
    if p.is_file() or (p.is_dir() and (p / "config.json").is_file()):
        f = p / "config.json" if p.is_dir() else p
        d = json.loads(f.read_text())
        if "hidden_size" in d or "text_config" in d:
            from llama4.checkpoint.hf import args_from_hf_config

            return args_from_hf_config(d, str(f)).args
        return ModelArgs.from_dict(d)
    from llama4.recipes import RECIPES, get_recipe

    if spec in RECIPES:
        return get_recipe(spec).model
    raise SweepError(f"unknown target {spec!r}: use a flavor ({', '.join(FLAVORS)}), a recipe "
                     f"({', '.join(RECIPES)}) or a ModelArgs / config.json file")


def metap_config_for(target: ModelArgs, base: ProxyRun) -> MetaPConfig:
    """The sweep's base shape and knobs, for ``target``. The base head width is the target's:
    heads transfer by number, and a head width other than the base's would need a softmax scale
    that a QK-normed model cannot export (see llama4.checkpoint.fold)."""
    b = base.base_args()
    shape = BaseShape(dim=b.dim, n_layers=b.n_layers, attn_dim=b.n_heads * b.hd, head_dim=target.hd,
                      dense_dim=b.dense_dim, expert_dim=b.expert_dim, n_experts=b.n_experts if target.n_experts else 0)
    return MetaPConfig(base=shape, init_std=base.init_std, output_mult=base.output_mult,
                       output_lr_mult=base.output_lr_mult, embed_lr_mult=base.embed_lr_mult)


def predict(sweep_dir, target: str, tokens: int, batch: int | None = None) -> dict:
    """The base LR and the per-group table for ``target`` trained on ``tokens`` tokens."""
    if tokens <= 0:
        raise SweepError(f"--tokens must be positive, got {tokens}")
    law, base = fit_sweep(load_sweep(sweep_dir)[0])
    args = target_args(target)
    point = {"width": args.dim, "depth": args.n_layers, "tokens": tokens,
             "n_experts": max(1, args.n_experts), "expert_mult": args.expert_dim / args.dim}
    log2_lr = law.predict_log2(point)
    lr = 2.0 ** log2_lr
    cfg = metap_config_for(args, base)
    plan = MetaP(cfg, args)
    fwd = plan.model_args()
    tokens_per_step = base.batch * base.seq_len
    notes = []
    extra = law.extrapolation(point)
    far = {k: round(v, 1) for k, v in extra.items() if v > 4}
    if far:
        notes.append(f"extrapolates more than 4x beyond the proxies on {', '.join(far)} ({far}): trust the "
                     "per-group scaling rules more than the fitted slopes there")
    if batch is not None and batch != tokens_per_step:
        notes.append(f"the sweep measured one batch ({tokens_per_step} tokens per step); the LR is not adjusted "
                     f"for {batch} tokens per step")
    if not args.n_experts:
        notes.append("dense target: the proxies were MoE; the dense FFN follows the same hidden-matrix rule")
    return {
        "target": target, "sweep": str(sweep_dir), "model": args.to_dict(), "tokens": tokens, "batch_tokens": batch,
        "lr": lr, "log2_lr": round(log2_lr, 3),
        "law": law.to_dict(), "extrapolation": {k: round(v, 2) for k, v in extra.items()},
        "metap": cfg.to_dict(),
        "forward": {"embed_mult": fwd.embed_mult, "residual_mult": fwd.residual_mult,
                    "logit_mult": fwd.logit_mult, "softmax_scale": fwd.softmax_scale},
        "groups": plan.table(lr=lr, weight_decay=0.0, eps=1e-8),
        "measured_batch_tokens": tokens_per_step,
        "train_overrides": {"parametrization": "metap", "metap": cfg.to_dict(), "lr": lr},
        "notes": notes,
    }


# --------------------------------------------------------------------------------------------
# held-out validation

def validate(sweep_dir, width: int | None = None, workers: int | None = None, say=print) -> dict:
    """Predict the LR of a proxy ``width`` (default: twice the widest proxy), then sweep 5 LRs
    around it (factor 2 apart, the prediction in the middle) at that width, plus two baselines:
    MetaP at the base proxy's own best LR (no law) and the standard parametrization at it. The
    gap is the predicted LR's loss against the best MetaP loss of all six runs.
    Results go to ``SWEEP/heldout.json``; the runs are kept in ``SWEEP/runs.jsonl``."""
    from llama4.metap.sweep import run_all

    sweep_dir = Path(sweep_dir)
    rows, summary = load_sweep(sweep_dir)
    law, base = fit_sweep(rows)
    proxy_widths = sorted({r["width"] for r in rows if r["family"] == "width"})
    width = width or 2 * proxy_widths[-1]
    if width <= proxy_widths[-1]:
        raise SweepError(f"the held-out width {width} must exceed every proxy width (max {proxy_widths[-1]})")
    proxy_args(width)  # shape check before any work
    held = replace(base, width=width, family="heldout")
    log2_pred = law.predict_log2(point_of(vars(held)))
    base_lr = summary["width"]["metap"][str(base.width)]["grid_lr"]
    runs = [replace(held, lr=2.0 ** (log2_pred + d)) for d in (-2, -1, 0, 1, 2)]
    runs += [replace(held, lr=base_lr), replace(held, lr=base_lr, param="standard")]
    t0 = time.perf_counter()
    got = run_all(runs, sweep_dir / "runs.jsonl", workers, say)
    grid = got[:5]
    o = optimum(grid)
    xs, ys, _ = lr_curve(grid)
    at_pred = ys[2]
    # the best MetaP loss seen at this width: the 5-point sweep or the no-law baseline
    best = float(min(min(ys), got[5]["val_loss"] if not got[5]["diverged"] else math.inf))
    gap = at_pred / best - 1.0
    result = {
        "width": width, "proxy_widths": proxy_widths, "steps": held.steps, "tokens": held.tokens,
        "predicted_lr": 2.0 ** log2_pred, "log2_predicted_lr": round(log2_pred, 3),
        "grid": [{"lr": r["lr"], "val_loss": r["val_loss"], "imbalance": r["imbalance"]} for r in grid],
        "best_grid_lr": 2.0 ** float(xs[int(ys.argmin())]), "best_grid_loss": round(float(min(ys)), 4),
        "best_loss": round(best, 4),
        "parabola_best_lr": 2.0 ** o.log2_lr, "optimum_at_edge": o.at_edge,
        "loss_at_predicted_lr": round(float(at_pred), 4), "gap_to_best": round(gap, 5),
        "pass": bool(gap <= MAX_HELDOUT_GAP),
        "baselines": {
            "metap_base_lr_no_law": {"lr": base_lr, "val_loss": round(got[5]["val_loss"], 4)},
            "standard_base_lr": {"lr": base_lr, "val_loss": round(got[6]["val_loss"], 4)
                                 if not got[6]["diverged"] else None},
        },
        "law": law.to_dict(),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    write_text(sweep_dir / "heldout.json", json.dumps(result, indent=1) + "\n")
    return result
