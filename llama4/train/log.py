"""What a user watches: a progress bar, ``metrics.jsonl``, and PNG plots.

``metrics.jsonl`` holds one JSON object per line. Training records have ``step``, ``loss``
(mean over the logging interval), ``lr``, ``tokens_per_s``, ``tokens``, ``grad_norm``, the MoE
``aux_loss`` / ``z_loss`` and ``expert_load`` (max/mean load per MoE layer); other records carry
an ``event``: ``eval`` (per-language validation loss on a few batches), ``final_eval`` (the
reported figure, on more batches), ``nonfinite`` (a skipped step),
``resume``, ``final``. On resume, records after the checkpoint's step are dropped first, so the
file reads as one uninterrupted run.

Only the main process (rank 0) writes or prints anything.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

METRICS = "metrics.jsonl"


class MetricsLog:
    def __init__(self, out_dir: Path, enabled: bool = True):
        self.path = Path(out_dir) / METRICS
        self.enabled = enabled

    def truncate_after(self, step: int, drop_events_at: tuple[str, ...] = ()) -> None:
        """Drop records of steps after ``step`` (they belong to the part of a run being redone),
        and records at ``step`` whose event is in ``drop_events_at`` (a finished run's final
        evaluation, which a resume repeats)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if rec.get("step", 0) < step or (rec.get("step", 0) == step and rec.get("event") not in drop_events_at):
                keep.append(json.dumps(rec))
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


class Progress:
    """tqdm bar over optimizer steps, showing loss, tokens/s and lr; tqdm adds the ETA."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                            file=sys.stderr, smoothing=0.1)

    def update(self, n: int, **stats) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if stats:
                self.bar.set_postfix(stats, refresh=False)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fmt_stats(loss: float, tokens_per_s: float, lr: float) -> dict:
    return {"loss": f"{loss:.3f}", "tok/s": f"{tokens_per_s:.0f}", "lr": f"{lr:.2e}"}


# --------------------------------------------------------------------------------------------
# plots (matplotlib, headless)

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: list[dict], out: Path, title: str = "", unigram: float | None = None) -> Path:
    """Train loss and per-language validation loss against tokens seen."""
    plt = _plt()
    train = [r for r in records if "loss" in r and "event" not in r and math.isfinite(r["loss"])]
    evals = [r for r in records if r.get("event") == "eval"]
    fig, ax = plt.subplots(figsize=(10, 6))
    if train:
        ax.plot([r["tokens"] / 1e6 for r in train], [r["loss"] for r in train], color="black", lw=1.5,
                label="train")
    langs = sorted({k for r in evals for k in r["val_loss"]})
    cmap = plt.get_cmap("tab20")
    for i, lang in enumerate(langs):
        pts = [(r["tokens"] / 1e6, r["val_loss"][lang]) for r in evals if lang in r["val_loss"]]
        ax.plot(*zip(*pts), lw=1, marker=".", color=cmap(i % 20), label=f"val {lang}")
    if evals:
        ax.plot([r["tokens"] / 1e6 for r in evals], [r["val_loss_mean"] for r in evals], color="red", lw=2,
                ls="--", label="val (all)")
    if unigram is not None:
        ax.axhline(unigram, color="gray", ls=":", label=f"unigram entropy {unigram:.2f}")
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_expert_load(records: list[dict], final_loads: list[list[float]] | None, out: Path,
                     title: str = "") -> Path:
    """Left: max/mean expert load of each MoE layer over training. Right: the final load share of
    every expert in every MoE layer."""
    plt = _plt()
    train = [r for r in records if r.get("expert_load") and "event" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    if train:
        n = len(train[0]["expert_load"])
        for i in range(n):
            ax.plot([r["step"] for r in train], [r["expert_load"][i] for r in train], lw=1, label=f"MoE layer {i}")
    ax.axhline(1.5, color="red", ls=":", lw=1, label="1.5")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean tokens per expert")
    ax.set_title("expert load imbalance (train batches)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax = axes[1]
    if final_loads:
        import numpy as np

        a = np.asarray(final_loads, dtype=float)
        a = a / a.sum(1, keepdims=True).clip(min=1e-9)
        im = ax.imshow(a, aspect="auto", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title("final model's load share (training text)")
        fig.colorbar(im, ax=ax)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_runs(runs: dict[str, list[dict]], out: Path, title: str = "") -> Path:
    """Several runs on one plot: train loss (thin) and validation loss (thick) against tokens."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    cmap = plt.get_cmap("tab10")
    for i, (name, records) in enumerate(runs.items()):
        train = [r for r in records if "loss" in r and "event" not in r and math.isfinite(r["loss"])]
        evals = [r for r in records if r.get("event") == "eval"]
        if train:
            ax.plot([r["tokens"] / 1e6 for r in train], [r["loss"] for r in train], color=cmap(i), lw=0.8,
                    alpha=0.5, label=f"{name} train")
        if evals:
            ax.plot([r["tokens"] / 1e6 for r in evals], [r["val_loss_mean"] for r in evals], color=cmap(i), lw=2,
                    marker="o", label=f"{name} val")
    ax.set_xlabel("tokens seen (M)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def format_report(s: dict) -> str:
    """The end-of-run report the trainer prints, from its summary.json dict."""
    lines = [f"\n== {s['recipe']}: {s['steps']} steps, {s['tokens'] / 1e6:.2f}M tokens, {s['elapsed_s']:.0f}s =="]
    if s["val_loss"]:
        lines.append(f"validation loss {s['val_loss_mean']:.3f} nats/token  (unigram entropy of the corpus "
                     f"{s['unigram_entropy']:.3f}; unigram model on these tokens "
                     f"{_mean(s['unigram_val'].values()):.3f})")
        lines.append(f"{'lang':6s} {'val loss':>9s} {'unigram':>8s} {'bits/byte':>9s}")
    for lang, v in s["val_loss"].items():
        lines.append(f"{lang:6s} {v:9.3f} {s['unigram_val'].get(lang, float('nan')):8.3f} "
                     f"{s['bits_per_byte'].get(lang, float('nan')):9.3f}")
    if s["expert_load_max_over_mean"]:
        loads = ", ".join(f"{v:.2f}" for v in s["expert_load_max_over_mean"])
        n_dead = sum(len(d) for d in s["dead_experts"])
        val = ", ".join(f"{v:.2f}" for v in s["expert_load_max_over_mean_val"])
        lines.append(f"expert load max/mean per MoE layer, final model: {loads} on training text; {val} on "
                     f"validation text; dead experts: {n_dead}")
        if s["expert_load_max_over_mean_export"]:
            exp = ", ".join(f"{v:.2f}" for v in s["expert_load_max_over_mean_export"])
            lines.append(f"  without the selection bias (the exported routing): {exp} on training text")
    if s["samples"]:
        ok = sum(x["detected"] == x["lang"] for x in s["samples"])
        lines.append(f"samples ({ok}/{len(s['samples'])} detected as the prompted language):")
        for x in s["samples"]:
            text = (x["prompt"] + x["text"]).replace("\n", " ⏎ ")
            lines.append(f"  [{x['lang']}->{x['detected']}] {text}")
    if s["warning"]:
        lines.append(f"WARNING: {s['warning']}")
    lines.append(f"exported {s['final']} (HF layout + tokenizer); plots: {', '.join(s['plots']) or 'none'}")
    return "\n".join(lines)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")
