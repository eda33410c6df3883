"""The study's figures: per-position loss (log-x) per variant, Δ against k, passkey heatmaps."""

from __future__ import annotations

from pathlib import Path

from llama4.eval.common import pyplot, save_figure


def _mean(xs):
    return sum(xs) / len(xs)


def plot_loss_curves(base: dict, variants, seeds, L: int, path: Path) -> Path:
    """Per-position loss averaged over seeds, one line per variant, log-x."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for v in variants:
        curves = [base[(v, s)]["longppl"]["curve"] for s in seeds]
        ax.plot(curves[0]["position"], [_mean(c) for c in zip(*(c["loss"] for c in curves))], lw=1.2, label=v)
    ax.set_xscale("log")
    ax.axvline(L, color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"token position (log; dashed: training length L = {L})")
    ax.set_ylabel("loss (nats/token), mean over seeds")
    ax.set_title("per-position loss on held-out text")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_delta(base: dict, variants, seeds, path: Path, tuned: dict | None = None) -> Path:
    """Δ(k) per variant: the mean over seeds, bars from the lowest to the highest seed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))

    def draw(results, label, style):
        ks = results[0]["longppl"]["multiples"]
        per = [[r["longppl"]["delta"][str(k)] for r in results] for k in ks]
        mean = [_mean(p) for p in per]
        ax.errorbar(ks, mean, yerr=[[m - min(p) for m, p in zip(mean, per)], [max(p) - m for m, p in zip(mean, per)]],
                    marker="o", capsize=3, label=label, ls=style)

    for v in variants:
        draw([base[(v, s)] for s in seeds], v, "-")
    if tuned:
        draw(list(tuned.values()), "irope + temperature tuning", ":")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=0.05)
    ax.set_xlabel("k (context = k x L)")
    ax.set_ylabel("Δ (nats; symlog)")
    ax.set_title("Δ(k) = loss(last L | k·L context) − loss(same | own L)")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_passkey(base: dict, variants, seeds, L: int, path: Path) -> Path:
    """One heatmap per variant x filler: depth x length, exact-match averaged over seeds."""
    plt = pyplot()
    first = base[(variants[0], seeds[0])]["needle"]
    fillers = list(first["fillers"])
    lengths, depths = first["lengths"], first["depths"]
    fig, axes = plt.subplots(len(fillers), len(variants), squeeze=False, layout="constrained",
                             figsize=(2.2 * len(variants) + 1.5, 2.4 * len(fillers) + 0.6))
    for i, f in enumerate(fillers):
        for j, v in enumerate(variants):
            grids = [base[(v, s)]["needle"]["fillers"][f]["grid"] for s in seeds]
            grid = [[_mean([g[a][b] for g in grids]) for b in range(len(lengths))] for a in range(len(depths))]
            ax = axes[i][j]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [f"{n // L}L" for n in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths], fontsize=7)
            ax.set_title(f"{v} ({f})", fontsize=9)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="passkey exact match (mean over seeds)")
    fig.suptitle("passkey retrieval: needle depth x prompt length")
    return save_figure(fig, path)
