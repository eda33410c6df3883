"""Several runs' loss curves on one plot, and their final validation losses side by side.

    python -m llama4.train.compare runs/default runs/default-dense --out runs/moe_vs_dense.png

Used for the MoE-vs-dense comparison: same data, same tokens, same active parameters.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llama4.train.log import plot_runs, read_metrics


def compare(run_dirs: list[str | Path], out: str | Path, title: str = "") -> list[dict]:
    runs, rows = {}, []
    for d in map(Path, run_dirs):
        summary = json.loads((d / "summary.json").read_text())
        name = summary["recipe"] if summary["recipe"] not in runs else d.name  # two runs of one recipe
        runs[name] = read_metrics(d)
        rows.append({"run": name, "dir": str(d), "tokens": summary["tokens"],
                     "active": summary["params"]["active"], "total": summary["params"]["total"],
                     "val_loss": summary["val_loss_mean"], "elapsed_s": summary["elapsed_s"]})
    plot_runs(runs, Path(out), title or " vs ".join(runs))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (each with summary.json and metrics.jsonl)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--title", default="")
    a = p.parse_args(argv)
    rows = compare(a.runs, a.out, a.title)
    print("| run | active params | total params | tokens | val loss | time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['active'] / 1e6:.2f}M | {r['total'] / 1e6:.2f}M | {r['tokens'] / 1e6:.2f}M | "
              f"{r['val_loss']:.3f} | {r['elapsed_s']:.0f}s |")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
