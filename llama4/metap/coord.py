"""``llama4 metap coord-check``: μP's coordinate check on the proxy family.

Train a few Adam steps at several widths and record the mean |x| of the embedding output, each
layer's attention branch and block output (the residual stream) and the logits, at every step.
Under a parametrization whose updates are width-independent those curves are flat in width;
under the standard one the residual stream and the logits grow with it. The statistic is the
slope of log2(mean |x|) against log2(width) at the last step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from llama4.metap.report import save_figure, write_text
from llama4.metap.proxy import ProxyRun, build, optimizer_for, step_loss, train_batches
from llama4.train import losses
from llama4.train.optim import set_lr

WIDTHS = (64, 128, 256, 512, 1024)


def record(run: ProxyRun, steps: int) -> dict[str, list[float]]:
    """mean |x| of every tracked activation before each of ``steps`` Adam steps and after the
    last one (steps + 1 values each), at a constant LR."""
    torch.set_flush_denormal(True)
    model, plan = build(run)
    opt = optimizer_for(model, plan)
    set_lr(opt, run.lr)
    stats: dict[str, list[float]] = {}
    r = model.args.residual_mult

    def put(name, x):
        stats.setdefault(name, []).append(x.detach().abs().mean().item())

    hooks = [model.layers[0].register_forward_pre_hook(lambda m, a: put("embedding", a[0])),
             model.register_forward_hook(lambda m, a, y: put("logits", y))]
    for i, block in enumerate(model.layers):
        hooks.append(block.attention.register_forward_hook(lambda m, a, y, i=i: put(f"attn.{i}", r * y)))
        hooks.append(block.register_forward_hook(lambda m, a, y, i=i: put(f"block.{i}", y)))
    moe = losses.moe_layers(model)
    losses.record_router_stats(model)
    data = train_batches(run.seed, run.batch, run.seq_len)
    for _ in range(steps):
        loss, _, _ = step_loss(run, model, moe, *next(data))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        model(next(data)[0])  # the activations after the last step
    for h in hooks:
        h.remove()
    return stats


def slope(widths, values) -> float:
    return float(np.polyfit(np.log2(widths), np.log2(values), 1)[0])


def coord_check(widths=WIDTHS, steps: int = 5, lr: float = 3e-3, seeds=(0, 1), depth: int = 2,
                batch: int = 8, seq_len: int = 64) -> dict:
    """Both parametrizations at every width; MetaP's base is the narrowest width (where the two
    coincide), with the default knobs, so only the scaling rules differ."""
    result = {"widths": list(widths), "steps": steps, "lr": lr, "seeds": list(seeds), "depth": depth,
              "batch": batch, "seq_len": seq_len, "mean_abs": {}, "slope_last_step": {}, "slope_first_step": {}}
    for param in ("standard", "metap"):
        per_width = []
        for w in widths:
            runs = [record(ProxyRun(width=w, lr=lr, param=param, depth=depth, batch=batch, seq_len=seq_len,
                                    seed=s, base_width=widths[0], base_depth=depth, expert_mult=1.0,
                                    base_expert_mult=1.0), steps) for s in seeds]
            per_width.append({k: np.mean([r[k] for r in runs], axis=0).tolist() for k in runs[0]})
        names = list(per_width[0])
        result["mean_abs"][param] = {k: [pw[k] for pw in per_width] for k in names}
        result["slope_last_step"][param] = {k: round(slope(widths, [pw[k][-1] for pw in per_width]), 3) for k in names}
        result["slope_first_step"][param] = {k: round(slope(widths, [pw[k][0] for pw in per_width]), 3) for k in names}
    return result


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    widths = result["widths"]
    for ax, param in zip(axes, ("standard", "metap")):
        series = result["mean_abs"][param]
        cmap = plt.get_cmap("tab10")
        for i, (name, per_width) in enumerate(series.items()):
            last = [v[-1] for v in per_width]
            first = [v[0] for v in per_width]
            ax.plot(widths, last, "o-", color=cmap(i % 10),
                    label=f"{name} (slope {result['slope_last_step'][param][name]:+.2f})")
            ax.plot(widths, first, ":", color=cmap(i % 10), alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("width")
        ax.set_title(f"{'standard parametrization' if param == 'standard' else 'MetaP'}: "
                     f"mean |x| after {result['steps']} Adam steps (dotted: init)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("mean |activation|")
    fig.tight_layout()
    save_figure(fig, path)


def run_coord_check(out, **kw) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = coord_check(**kw)
    write_text(out / "coord_check.json", json.dumps(result, indent=1) + "\n")
    plot(out / "coord_check.png", result)
    return result
