"""MetaP: the per-group rules (against microsoft/mup's μP optimizer), the coordinate check, the
export of MetaP's forward multipliers (against transformers), and the sweep/predictor plumbing."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oracles import require

import llama4
from llama4.checkpoint import CheckpointError
from llama4.metap import BaseShape, MetaP, MetaPConfig
from llama4.metap.coord import coord_check
from llama4.metap.fit import fit_law, optimum, point_of
from llama4.metap.proxy import proxy_args
from llama4.metap.sweep import plan_runs
from llama4.model import ConfigError, Transformer
from llama4.train.optim import param_groups

ROOT = Path(__file__).resolve().parents[1]


def plan_for(width, base_width=32, depth=2, base_depth=2, **kw) -> MetaP:
    return MetaP(MetaPConfig(base=BaseShape.of(proxy_args(base_width, base_depth)), **kw), proxy_args(width, depth))


def lr_wd_by_param(groups) -> dict[int, tuple[float, float]]:
    return {id(p): (g.get("lr_mult", 1.0) * g.get("lr", 1.0), g["weight_decay"]) for g in groups for p in g["params"]}


def test_at_the_base_shape_metap_is_the_standard_parametrization():
    plan = plan_for(32)
    assert not plan.model_args().has_forward_multipliers
    a, b = Transformer(plan.model_args()), Transformer(proxy_args(32))
    torch.manual_seed(0)
    plan.init_weights(a)
    torch.manual_seed(0)
    b.init_weights(0.02)
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), n
    ours = lr_wd_by_param(plan.param_groups(a, 0.1, 1e-8))
    ref = lr_wd_by_param(param_groups(b, 0.1))
    assert [ours[id(p)] for p in a.parameters()] == [ref[id(p)] for p in b.parameters()]


def test_lr_wd_and_init_follow_mup_for_every_hidden_and_vector_parameter():
    """mup.MuAdamW's groups on the same modules: hidden matrices lr/m and wd*m, vector-like
    (embedding, norms, output head) unchanged. Every width-like dimension scales together, since
    mup reads the fan-in from the last dim (nn.Linear's layout; our stacked experts are x @ W)."""
    mup = require("mup")
    base, delta, target = (Transformer(proxy_args(w)) for w in (32, 64, 128))
    # mup's own check agrees the router is a readout (width fan-in, expert-count fan-out)
    with pytest.raises(AssertionError, match="router has infinite fan-in and finite fan-out"):
        mup.set_base_shapes(Transformer(proxy_args(128)), base, delta=delta, rescale_params=False)
    mup.set_base_shapes(target, base, delta=delta, rescale_params=False, do_assert=False)
    lr, wd = 1e-2, 0.1
    ref = lr_wd_by_param(mup.MuAdamW(target.parameters(), lr=lr, weight_decay=wd).param_groups)
    plan = plan_for(128)
    checked = 0
    for name, p, g in plan.assign(target):
        mine = (lr * g.lr_mult, wd * g.wd_mult if g.wd_mult else 0.0)
        if g.name == "router":
            # mup treats a plain Linear with a finite fan-out as vector-like; μP's readout rule
            # (MuReadout: forward x 1/m, LR unchanged) is ours in its no-multiplier form.
            assert ref[id(p)][0] == pytest.approx(lr) and mine[0] == pytest.approx(lr / 4)
            continue
        if g.wd_mult == 0.0:  # embeddings and norms are never decayed here; mup decays everything
            assert ref[id(p)][0] == pytest.approx(mine[0]), name
        else:
            assert ref[id(p)] == pytest.approx(mine), name
        if p.infshape.ninf() == 2:
            extra = 1 / math.sqrt(2 * 2) if name.endswith(("wo.weight", "w2.weight", "experts.w2")) else 1.0
            assert g.init_std == pytest.approx(0.02 * extra / math.sqrt(p.infshape.width_mult())), name
        checked += 1
    assert checked == len(list(target.parameters())) - 2  # all but the two routers


def test_fan_in_not_fan_out_sets_the_expert_multipliers():
    b = proxy_args(64)
    plan = MetaP(MetaPConfig(base=BaseShape.of(b)), b.replace(expert_dim=4 * b.expert_dim))
    g = plan.groups
    assert g["experts.w1"].lr_mult == g["experts.w3"].lr_mult == 1.0  # fan-in dim unchanged
    assert g["experts.w2"].lr_mult == g["shared.w2"].lr_mult == 0.25
    assert g["router"].lr_mult == 1.0 and not plan.model_args().has_forward_multipliers


def test_depth_scales_the_residual_branches_completep():
    plan = plan_for(32, depth=8)
    assert plan.model_args().residual_mult == pytest.approx(0.25)
    assert plan.groups["attn.wq"].lr_mult == 1.0  # alpha = 1: no depth factor on hidden LRs
    half = plan_for(32, depth=8, depth_alpha=0.5)
    assert half.model_args().residual_mult == pytest.approx(0.5)
    assert half.groups["attn.wq"].lr_mult == pytest.approx(0.5)


def test_every_parameter_needs_a_rule_and_configs_are_checked():
    plan = plan_for(64)
    model = Transformer(plan.model_args())
    model.extra = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="no rule for parameter.*extra.weight"):
        plan.assign(model)
    with pytest.raises(ConfigError, match="depth_alpha"):
        MetaPConfig(base=BaseShape.of(proxy_args(32)), depth_alpha=2.0)
    with pytest.raises(ConfigError, match="unknown BaseShape field"):
        MetaPConfig.from_dict({"base": {"dim": 32, "widht": 3}})
    with pytest.raises(ConfigError, match="both must be MoE"):
        MetaP(MetaPConfig(base=BaseShape.of(proxy_args(32))), proxy_args(64, n_experts=0))


def test_coordinate_check_metap_flat_standard_grows(one_thread):
    """Tiny version of `llama4 metap coord-check`: 8x width range, a few Adam steps."""
    r = coord_check(widths=(32, 64, 128, 256), steps=4, seeds=(0,))
    for name, per_width in r["mean_abs"]["metap"].items():
        last = [v[-1] for v in per_width]
        assert max(last) / min(last) < 2.0, (name, last)
        assert abs(r["slope_last_step"]["metap"][name]) < 0.35, name
    std = r["mean_abs"]["standard"]
    logits = [v[-1] for v in std["logits"]]
    assert logits[-1] / logits[0] > 3.0, logits  # the standard model's logits grow with width
    assert r["slope_last_step"]["standard"]["block.1"] > 1.0


def test_metap_model_exports_to_a_checkpoint_transformers_runs(tmp_path):
    """Wider and deeper than the base, so every forward multiplier is active, then weights moved
    off their init so each multiplier matters: the folded export gives the same logits in
    llama4.load and in transformers."""
    transformers = require("transformers")
    plan = plan_for(128, depth=4, output_mult=4.0, embed_mult=2.0)
    args = plan.model_args()
    assert args.residual_mult == 0.5 and args.logit_mult == 1.0 and args.embed_mult == 2.0
    model = Transformer(args)
    torch.manual_seed(1)
    plan.init_weights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    x = torch.randint(0, 256, (2, 80))
    ref = model(x)
    llama4.save(model, tmp_path / "ckpt")
    assert not llama4.load(tmp_path / "ckpt").args.has_forward_multipliers
    assert (llama4.load(tmp_path / "ckpt")(x) - ref).abs().max() < 1e-4
    hf = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "ckpt", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(x).logits
    assert (got - ref).abs().max() < 1e-4
    plain = Transformer(args.replace(embed_mult=1.0, residual_mult=1.0, logit_mult=1.0))
    plain.load_state_dict(model.state_dict(), strict=False)
    assert (plain(x) - ref).abs().max() > 1e-2  # the multipliers did matter


def test_a_softmax_scale_under_qk_norm_refuses_to_export(tmp_path):
    args = proxy_args(64).replace(softmax_scale=0.1)
    with pytest.raises(CheckpointError, match="QK-norm"):
        llama4.save(Transformer(args), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    args = args.replace(use_qk_norm=False)
    m = Transformer(args).eval()
    torch.manual_seed(0)
    m.init_weights(0.3)
    x = torch.randint(0, 256, (1, 40))
    llama4.save(m, tmp_path / "y")
    assert (llama4.load(tmp_path / "y")(x) - m(x)).abs().max() < 1e-4


# --------------------------------------------------------------------------------------------
# sweep analysis and predictor, on synthetic sweeps with a known answer

def test_parabola_optimum_is_found_between_grid_points():
    rows = [dict(lr=2.0 ** k, val_loss=2.0 + 0.05 * (k + 6.4) ** 2, diverged=False, seed=0) for k in range(-9, -3)]
    o = optimum(rows)
    assert o.log2_lr == pytest.approx(-6.4, abs=1e-6) and not o.at_edge
    edge = optimum([dict(r, val_loss=r["lr"]) for r in rows])
    assert edge.at_edge and edge.grid_log2_lr == -9
    rows[3]["diverged"], rows[3]["val_loss"] = True, math.nan
    assert optimum(rows).log2_lr <= -5


KNOBS = {"lr": 2.0 ** -6, "init_std": 0.03, "output_mult": 4.0, "output_lr_mult": 0.5, "embed_lr_mult": 4.0}


def test_base_knobs_successive_halving_picks_the_best_seed_mean():
    from llama4.metap.sweep import finalists, knob_candidates, knob_runs, pick_knobs

    cands = knob_candidates(10)
    assert cands[0] == {"lr": 2.0 ** -7, "init_std": 0.02, "output_mult": 1.0, "output_lr_mult": 1.0,
                        "embed_lr_mult": 1.0} and len({json.dumps(c) for c in cands}) == 10

    def row(run, loss):
        return run.__dict__ | {"val_loss": loss, "diverged": False}

    first = [row(r, 3.0 - 0.01 * i) for i, r in enumerate(knob_runs(candidates=cands))]  # last is best once
    top = finalists(first, 3)
    assert top[0] == cands[-1] and len(top) == 3
    # ... but over three seeds the second finalist is better
    more = [row(r, 2.9 if r.lr == top[1]["lr"] else 3.1) for r in knob_runs(candidates=top, seeds=(1, 2))]
    k = pick_knobs(first + more)
    assert {key: k[key] for key in top[1]} == top[1] and k["seeds"] == 3


def synthetic_sweep(out: Path, law=lambda p: -6 - 0.3 * math.log2(p["tokens"] / 409600)) -> None:
    """A finished sweep folder whose loss curves have the optimum ``law`` gives."""
    from llama4.metap.report import write_report
    from llama4.metap.sweep import knob_runs

    knobs = {**KNOBS, "lr_exp": -6, "val_loss": 2.6, "seeds": 3}
    runs = plan_runs(knobs) + knob_runs()
    rows = []
    for r in runs:
        p = point_of(r.__dict__)
        opt = law(p) if r.param == "metap" else -6 - math.log2(r.width / 32)
        row = r.__dict__ | {"tokens": r.tokens, "val_loss": 2.5 + 0.02 * (math.log2(r.lr) - opt) ** 2
                            - 0.01 * math.log2(r.width / 32), "train_loss": 2.5, "imbalance": 1.1,
                            "seconds": 1.0, "diverged": False}
        rows.append(row)
    out.mkdir(parents=True)
    (out / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(out, rows, knobs, wall_s=1.0)


def test_sweep_plan_and_report_on_a_known_answer(tmp_path):
    runs = plan_runs({**KNOBS, "lr_exp": -6})
    widths = sorted({r.width for r in runs if r.family == "width"})
    lrs = sorted({r.lr for r in runs})
    assert len(widths) >= 4 and widths[-1] / widths[0] >= 8
    assert len(lrs) >= 6 and all(b / a == 2 for a, b in zip(lrs, lrs[1:]))
    assert {r.depth for r in runs} >= {2, 4, 8} and {r.n_experts for r in runs} >= {4, 16}
    assert len({r.expert_mult for r in runs}) >= 2
    synthetic_sweep(tmp_path / "s")
    s = json.loads((tmp_path / "s" / "summary.json").read_text())
    c = s["checks"]
    assert c["metap_lr_shift"] == pytest.approx(1.0) and c["metap_wider_never_worse"]
    assert c["standard_lr_slope"] == pytest.approx(-1.0, abs=0.05) and c["pass"]
    assert (tmp_path / "s" / "sweep.png").stat().st_size > 10_000
    assert (tmp_path / "s" / "sweep.csv").read_text().count("\n") == len(runs) + 40 + 1


def test_predictor_recovers_the_law_and_writes_the_table(tmp_path):
    synthetic_sweep(tmp_path / "s")
    out = tmp_path / "pred.json"
    p = subprocess.run([sys.executable, "-m", "llama4", "metap", "predict", "--sweep", str(tmp_path / "s"),
                        "--target", "default", "--tokens", str(4 * 409600), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    pred = json.loads(out.read_text())
    assert pred["log2_lr"] == pytest.approx(-6.6, abs=0.05)  # -6 - 0.3 * log2(4)
    assert pred["law"]["coef"]["tokens"] == pytest.approx(-0.3, abs=0.02)
    assert abs(pred["law"]["coef"]["width"]) < 0.02
    groups = {g["name"]: g for g in pred["groups"]}
    assert groups["attn.wq"]["lr"] == pytest.approx(pred["lr"] / 4)  # default recipe: width 128 vs 32
    assert pred["forward"]["logit_mult"] == pytest.approx(1.0)  # output_mult 4 / width ratio 4
    assert pred["train_overrides"]["parametrization"] == "metap"
    bad = subprocess.run([sys.executable, "-m", "llama4", "metap", "predict", "--sweep", str(tmp_path / "none"),
                          "--target", "default", "--tokens", "1000"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "not a finished sweep" in bad.stderr and "Traceback" not in bad.stderr


def test_fit_law_is_exact_on_a_linear_law_and_reports_leave_one_out():
    base = {"width": 32, "depth": 2, "tokens": 1000, "n_experts": 4, "expert_mult": 1.0}
    pts = []
    for w in (32, 64, 128):
        for d in (2, 4):
            p = dict(base, width=w, depth=d)
            y = -6 + 0.1 * math.log2(w / 32) - 0.2 * math.log2(d / 2)
            pts.append((p, optimum([dict(lr=2.0 ** (y + k), val_loss=1 + k * k, diverged=False) for k in (-1, 0, 1)])))
    law = fit_law(pts, base)
    assert law.features == ("width", "depth")
    assert law.coef["width"] == pytest.approx(0.1, abs=1e-3) and law.coef["depth"] == pytest.approx(-0.2, abs=1e-3)
    assert law.loo_rms < 1e-2
    assert law.extrapolation(dict(base, width=1024)) == {"width": 8.0}


def test_coord_check_command_writes_json_and_png(tmp_path):
    p = subprocess.run([sys.executable, "-m", "llama4", "metap", "coord-check", "--out", str(tmp_path),
                        "--widths", "32,64", "--steps", "1", "--seeds", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "coord_check.json").read_text())
    assert r["widths"] == [32, 64] and set(r["slope_last_step"]) == {"standard", "metap"}
    assert (tmp_path / "coord_check.png").read_bytes()[:4] == b"\x89PNG"
    assert "slope of log2 mean|x|" in p.stdout
    bad = subprocess.run([sys.executable, "-m", "llama4", "metap", "coord-check", "--out", str(tmp_path),
                          "--widths", "32,x"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "comma-separated integers" in bad.stderr


def test_the_shipped_reference_sweep_passes_and_predicts_out_of_the_box(tmp_path):
    """The README's sweep ships with the package: its verdicts hold when recomputed from its runs,
    the stored summaries are exactly what the project's code makes of those runs (so they cannot
    drift), and `predict` needs no --sweep."""
    from llama4.metap.predict import REFERENCE_SWEEP, validate
    from llama4.metap.sweep import sweep

    # `llama4 metap sweep` and `llama4 metap validate` on a copy of the shipped runs.jsonl: every run
    # is already there, so nothing trains; they only re-summarize (and say nothing about runs to do).
    said: list[str] = []
    (tmp_path / "sweep").mkdir()
    shutil.copy(REFERENCE_SWEEP / "runs.jsonl", tmp_path / "sweep" / "runs.jsonl")
    s = sweep(tmp_path / "sweep", workers=1, say=said.append)
    held = validate(tmp_path / "sweep", workers=1, say=said.append)
    assert not [t for t in said if "runs to do" in t], said
    c = s["checks"]
    assert c["pass"] and c["metap_lr_shift"] < 2 and c["standard_lr_shift"] >= 2 and c["metap_wider_never_worse"]
    assert held["pass"] and held["width"] >= 2 * max(held["proxy_widths"]) and held["gap_to_best"] <= 0.01

    def without_wall_time(d):
        return {k: v for k, v in d.items() if k != "wall_s"}

    assert without_wall_time(s) == without_wall_time(json.loads((REFERENCE_SWEEP / "summary.json").read_text()))
    assert without_wall_time(held) == without_wall_time(json.loads((REFERENCE_SWEEP / "heldout.json").read_text()))
    p = subprocess.run([sys.executable, "-m", "llama4", "metap", "predict", "--target", "scout",
                        "--tokens", str(40 * 10 ** 12)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "extrapolates more than 4x" in p.stdout and "experts.w2" in p.stdout
    pred = json.loads((tmp_path / "runs/metap/predict-scout.json").read_text())  # the default --out
    assert pred["sweep"] == str(REFERENCE_SWEEP) and pred["model"]["n_experts"] == 16
