"""The sweep's outputs: ``sweep.csv`` (one row per run), ``summary.json`` (best LR per
configuration, the pass/fail checks) and ``sweep.png`` (loss vs LR per family)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from llama4.metap.fit import Optimum, group_configs, lr_curve, optimum
from llama4.tokenizer.files import atomic_write_bytes

# Pass thresholds of the issue: MetaP's best LR moves by < 2x over the width range; the standard
# parametrization's must visibly drift (>= 2x, otherwise the experiment has no power to show
# anything and the result is reported as inconclusive).
MAX_METAP_SHIFT = 2.0
MIN_STANDARD_DRIFT = 2.0


def write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue())


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """A matplotlib figure to PNG, atomically, then closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _opt_dict(o: Optimum) -> dict:
    return {"lr": 2.0 ** o.log2_lr, "log2_lr": round(o.log2_lr, 3), "loss": round(o.loss, 4),
            "grid_lr": 2.0 ** o.grid_log2_lr, "grid_loss": round(o.grid_loss, 4), "at_edge": o.at_edge,
            "seeds": o.n_seeds}


def _select(rows, **kw) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in kw.items())]


def _shift(opts: list[Optimum]) -> float:
    xs = [o.log2_lr for o in opts]
    return 2.0 ** (max(xs) - min(xs))


def _slope(xs, opts: list[Optimum]) -> float:
    return float(np.polyfit(np.log2(xs), [o.log2_lr for o in opts], 1)[0])


def summarize(rows: list[dict], knobs: dict) -> dict:
    """Every family's optima and the checks of the issue."""
    stage2 = [r for r in rows if r["family"] != "base"]
    width_rows = _select(stage2, family="width")
    widths = sorted({r["width"] for r in width_rows})
    s: dict = {"knobs": knobs, "lr_grid": sorted({r["lr"] for r in stage2}), "n_runs": len(rows),
               "diverged_runs": sum(r["diverged"] for r in rows)}
    checks: dict = {}
    width_opts: dict[str, list[Optimum]] = {}
    if width_rows:
        s["width"] = {}
        for p in ("metap", "standard"):
            opts = [optimum(_select(width_rows, param=p, width=w)) for w in widths]
            width_opts[p] = opts
            s["width"][p] = {str(w): _opt_dict(o) for w, o in zip(widths, opts)}
            checks[f"{p}_lr_shift"] = round(_shift(opts), 3)
            checks[f"{p}_lr_slope"] = round(_slope(widths, opts), 3)  # log2 LR* per doubling of width
            checks[f"{p}_edge_optima"] = [w for w, o in zip(widths, opts) if o.at_edge]
            # the widest model at the grid LR that was best for the narrowest one
            xs, ys, _ = lr_curve(_select(width_rows, param=p, width=widths[-1]))
            at = dict(zip(xs.tolist(), ys.tolist())).get(opts[0].grid_log2_lr, math.nan)
            checks[f"{p}_transfer_regret"] = round(at - opts[-1].grid_loss, 4)
        best = [o.grid_loss for o in width_opts["metap"]]
        checks["metap_wider_never_worse"] = all(b <= a for a, b in zip(best, best[1:]))
        checks["metap_best_loss_by_width"] = [round(b, 4) for b in best]
        checks["standard_best_loss_by_width"] = [round(o.grid_loss, 4) for o in width_opts["standard"]]
        checks["pass"] = bool(checks["metap_lr_shift"] < MAX_METAP_SHIFT and checks["metap_wider_never_worse"]
                              and checks["standard_lr_shift"] >= MIN_STANDARD_DRIFT
                              and not checks["metap_edge_optima"])
        if checks["standard_lr_shift"] < MIN_STANDARD_DRIFT:
            checks["note"] = "the standard parametrization did not drift: inconclusive, not a MetaP success"
    depth_rows = _select(stage2, family="depth") + _select(width_rows, param="metap", width=64, seed=0)
    if _select(stage2, family="depth"):
        depths = sorted({r["depth"] for r in depth_rows})
        opts = [optimum(_select(depth_rows, depth=d)) for d in depths]
        s["depth"] = {str(d): _opt_dict(o) for d, o in zip(depths, opts)}
        checks["depth_lr_shift"] = round(_shift(opts), 3)
        checks["depth_best_loss"] = [round(o.grid_loss, 4) for o in opts]
    exp_rows = _select(stage2, family="experts")
    if exp_rows:
        s["experts"] = {}
        for p in ("metap", "standard"):
            base = _select(width_rows, param=p, width=64, seed=0)
            variants = {"4 experts, width 1x": base,
                        "16 experts, width 1x": _select(exp_rows, param=p, n_experts=16),
                        "4 experts, width 4x": _select(exp_rows, param=p, expert_mult=4.0)}
            opts = {k: optimum(v) for k, v in variants.items() if v}
            s["experts"][p] = {k: _opt_dict(o) for k, o in opts.items()}
            checks[f"experts_{p}_lr_shift"] = round(_shift(list(opts.values())), 3)
    tok_rows = _select(stage2, family="tokens") + _select(width_rows, param="metap", width=64, seed=0)
    if _select(stage2, family="tokens"):
        steps = sorted({r["steps"] for r in tok_rows})
        opts = [optimum(_select(tok_rows, steps=n)) for n in steps]
        s["tokens"] = {str(n * 16 * 64): _opt_dict(o) for n, o in zip(steps, opts)}
        checks["tokens_lr_slope"] = round(_slope(steps, opts), 3)
    # load balance of the MoE at each configuration's best LR (max/mean over experts, worst layer)
    for p in ("metap", "standard"):
        imb = [min(v, key=lambda r: r["val_loss"])["imbalance"]
               for v in group_configs([r for r in stage2 if r["param"] == p and not r["diverged"]]).values()]
        if imb:
            checks[f"imbalance_at_best_lr_{p}"] = {"median": round(float(np.median(imb)), 3),
                                                   "max": round(max(imb), 3)}
    s["checks"] = checks
    return s


def plot(path: Path, rows: list[dict], summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stage2 = [r for r in rows if r["family"] != "base"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    cmap = plt.get_cmap("viridis")

    def curves(ax, groups: dict[str, list[dict]], title: str):
        for i, (label, rs) in enumerate(groups.items()):
            if not rs:
                continue
            xs, ys, _ = lr_curve(rs)
            ok = np.isfinite(ys)
            ax.plot(xs[ok], ys[ok], "o-", color=cmap(i / max(1, len(groups) - 1)), label=label)
            o = optimum(rs)
            ax.plot([o.log2_lr], [o.loss], "k*", ms=9)
        ax.set_title(title)
        ax.set_xlabel("log2 base LR")
        ax.set_ylabel("val loss (nats/byte)")
        ax.legend(fontsize=8)

    wr = _select(stage2, family="width")
    widths = sorted({r["width"] for r in wr})
    curves(axes[0, 0], {f"width {w}": _select(wr, param="standard", width=w) for w in widths},
           "standard parametrization: width")
    curves(axes[0, 1], {f"width {w}": _select(wr, param="metap", width=w) for w in widths}, "MetaP: width")
    if "width" in summary:
        ax = axes[0, 2]
        for p, m in (("standard", "s--"), ("metap", "o-")):
            ws = [int(w) for w in summary["width"][p]]
            ax.plot(np.log2(ws), [summary["width"][p][str(w)]["log2_lr"] for w in ws], m,
                    label=f"{p}: shift {summary['checks'][f'{p}_lr_shift']:.2f}x")
        ax.set_xlabel("log2 width")
        ax.set_ylabel("log2 best LR")
        ax.set_title("best LR vs width")
        ax.legend(fontsize=8)
    dr = _select(stage2, family="depth") + _select(wr, param="metap", width=64, seed=0)
    curves(axes[1, 0], {f"depth {d}": _select(dr, depth=d) for d in sorted({r["depth"] for r in dr})},
           "MetaP: depth (width 64, CompleteP residual 1/L)")
    er = _select(stage2, family="experts")
    groups = {}
    for p in ("metap", "standard"):
        groups[f"{p}: 4 experts x1"] = _select(wr, param=p, width=64, seed=0)
        groups[f"{p}: 16 experts x1"] = _select(er, param=p, n_experts=16)
        groups[f"{p}: 4 experts x4 wide"] = _select(er, param=p, expert_mult=4.0)
    curves(axes[1, 1], groups, "experts: count and width (width 64)")
    tr = _select(stage2, family="tokens") + _select(wr, param="metap", width=64, seed=0)
    curves(axes[1, 2], {f"{n * 1024 // 1000}k tokens": _select(tr, steps=n) for n in sorted({r["steps"] for r in tr})},
           "MetaP: token budget (width 64)")
    fig.tight_layout()
    save_figure(fig, path)


def write_report(out: Path, rows: list[dict], knobs: dict, wall_s: float | None = None) -> dict:
    out = Path(out)
    summary = summarize(rows, knobs)
    if wall_s is not None:
        summary["wall_s"] = round(wall_s, 1)
    write_csv(out / "sweep.csv", rows)
    write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    plot(out / "sweep.png", rows, summary)
    return summary
