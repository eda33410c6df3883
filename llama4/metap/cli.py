"""``llama4 metap ...``: argument parsing only; the work is in the modules of :mod:`llama4.metap`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _coord_check(a: argparse.Namespace) -> int:
    from llama4.metap.coord import run_coord_check

    r = run_coord_check(a.out, widths=a.widths, steps=a.steps, lr=a.lr, seeds=tuple(range(a.seeds)))
    print(f"slope of log2 mean|x| vs log2 width after {a.steps} steps (0 = width-independent):")
    names = list(r["slope_last_step"]["standard"])
    print(f"  {'activation':<12}" + "".join(f"{n:>10}" for n in names))
    for p in ("standard", "metap"):
        print(f"  {p:<12}" + "".join(f"{r['slope_last_step'][p][n]:>+10.2f}" for n in names))
    print(f"wrote {Path(a.out) / 'coord_check.json'} and coord_check.png")
    return 0


def _sweep(a: argparse.Namespace) -> int:
    from llama4.metap.sweep import sweep

    s = sweep(a.out, families=tuple(a.families.split(",")), widths=a.widths, steps=a.steps,
              seeds=tuple(range(a.seeds)), workers=a.workers, say=lambda t: print(t, flush=True))
    c = s.get("checks", {})
    if "metap_lr_shift" in c:
        print(f"best LR across widths {a.widths[0]}..{a.widths[-1]}: MetaP moves {c['metap_lr_shift']:.2f}x "
              f"(slope {c['metap_lr_slope']:+.2f}), standard {c['standard_lr_shift']:.2f}x "
              f"(slope {c['standard_lr_slope']:+.2f}); MetaP best loss by width {c['metap_best_loss_by_width']}")
        print(f"pass: {c['pass']}" + (f" ({c['note']})" if "note" in c else ""))
    print(f"wrote {a.out}/sweep.csv, summary.json, sweep.png ({s.get('wall_s', 0) / 60:.1f} min of training)")
    return 0


def _predict(a: argparse.Namespace) -> int:
    from llama4.metap.predict import REFERENCE_SWEEP, SweepError, predict
    from llama4.metap.report import write_text

    try:
        p = predict(a.sweep or REFERENCE_SWEEP, a.target, a.tokens, a.batch)
    except SweepError as e:
        print(f"llama4 metap predict: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(p, indent=1) + "\n"
    out = Path(a.out or f"runs/metap/predict-{Path(a.target).stem}.json")
    write_text(out, text)
    print(f"{a.target}: base LR {p['lr']:.3g} (log2 {p['log2_lr']:+.2f}) for {a.tokens:,} tokens; law "
          + ", ".join(f"{k} {v:+.3f}" for k, v in p["law"]["coef"].items())
          + f"; leave-one-out error {p['law']['loo_rms_log2']:.2f} (log2)")
    print(f"  {'group':<12}{'init std':>10}{'lr':>11}{'lr mult':>9}{'wd mult':>9}")
    for g in p["groups"]:
        std = "ones/zeros" if g["init_std"] is None else f"{g['init_std']:.3g}"
        print(f"  {g['name']:<12}{std:>10}{g['lr']:>11.3g}{g['lr_mult']:>9.3g}{g['wd_mult']:>9.3g}")
    print("  forward: " + ", ".join(f"{k} {v:.4g}" for k, v in p["forward"].items() if v is not None))
    for n in p["notes"]:
        print(f"  note: {n}")
    print(f"wrote {out} (train with: llama4 train --recipe ... --metap {out})")
    return 0


def _validate(a: argparse.Namespace) -> int:
    from llama4.metap.predict import SweepError, validate

    try:
        r = validate(a.sweep, a.width, a.workers, say=lambda t: print(t, flush=True))
    except SweepError as e:
        print(f"llama4 metap validate: error: {e}", file=sys.stderr)
        return 2
    print(f"held-out width {r['width']} (proxies {r['proxy_widths']}): predicted LR {r['predicted_lr']:.3g}, "
          f"loss {r['loss_at_predicted_lr']:.4f} vs the best MetaP run there {r['best_loss']:.4f} "
          f"(gap {100 * r['gap_to_best']:.2f}%, limit 1%): {'pass' if r['pass'] else 'FAIL'}")
    b = r["baselines"]
    print(f"baselines at the base proxy's LR {b['metap_base_lr_no_law']['lr']:.3g}: MetaP "
          f"{b['metap_base_lr_no_law']['val_loss']}, standard {b['standard_base_lr']['val_loss']}")
    return 0 if r["pass"] else 1


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser("metap", help="MetaP: transferable per-layer init/LR, coord check, sweeps, predictor")
    sub = p.add_subparsers(dest="metap_command", required=True)

    c = sub.add_parser("coord-check", help="activation scale vs width after a few steps, standard vs MetaP")
    c.add_argument("--out", required=True, help="folder for coord_check.json and coord_check.png")
    c.add_argument("--widths", type=_ints, default=(64, 128, 256, 512, 1024), help="comma-separated widths")
    c.add_argument("--steps", type=int, default=5)
    c.add_argument("--lr", type=float, default=3e-3)
    c.add_argument("--seeds", type=int, default=2)
    c.set_defaults(func=_coord_check)

    s = sub.add_parser("sweep", help="LR x width/depth/experts/tokens grids for both parametrizations "
                       "(~25 min on 2 cores; resumes)")
    s.add_argument("--out", default="runs/metap-sweep", help="folder (runs.jsonl, sweep.csv, summary.json, sweep.png)")
    s.add_argument("--families", default="width,depth,experts,tokens")
    s.add_argument("--widths", type=_ints, default=(32, 64, 128, 256))
    s.add_argument("--steps", type=int, default=400, help="steps per run (16 x 64 bytes each)")
    s.add_argument("--seeds", type=int, default=2, help="seeds of the MetaP width runs (others use 1)")
    s.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    s.set_defaults(func=_sweep)

    r = sub.add_parser("predict", help="fit the sweep's best-LR law and give a target its LR and per-group table")
    r.add_argument("--target", required=True, help="flavor (scout, ...), recipe (default, ...) or ModelArgs/config.json")
    r.add_argument("--tokens", type=int, required=True, help="training tokens")
    r.add_argument("--batch", type=int, default=None, help="tokens per optimizer step (recorded; see notes)")
    r.add_argument("--sweep", default=None,
                   help="a finished `llama4 metap sweep` folder (default: the reference sweep shipped in "
                   "llama4/metap/reference_sweep, run on the README's machine)")
    r.add_argument("--out", default=None, help="the prediction as JSON (default: runs/metap/predict-TARGET.json)")
    r.set_defaults(func=_predict)

    v = sub.add_parser("validate", help="check the predictor on a proxy wider than every swept one")
    v.add_argument("--sweep", default="runs/metap-sweep")
    v.add_argument("--width", type=int, default=None, help="held-out width (default: 2x the widest proxy)")
    v.add_argument("--workers", type=int, default=None)
    v.set_defaults(func=_validate)
