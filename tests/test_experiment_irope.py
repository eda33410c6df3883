"""`llama4 experiment irope`: the variants, the passkey training rows, temperature tuning's identity
below floor_scale, the pre-registered criteria, and the whole --quick study end to end."""

from __future__ import annotations

import copy
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama4.experiments.irope.passkey import StudyBatches, passkey_row, repeat_row
from llama4.experiments.irope.probes import apply_temperature, passkey_accuracy
from llama4.experiments.irope.spec import FULL, QUICK, VARIANTS, variant_args
from llama4.experiments.irope.verdict import criteria
from llama4.model import Transformer


def test_variants_differ_only_in_attention_layout():
    a = {v: variant_args(v, FULL) for v in VARIANTS}
    nope = {v: [i for i in range(FULL.n_layers) if a[v].is_nope_layer(i)] for v in VARIANTS}
    assert nope == {"irope": [3, 7], "irope-noqk": [3, 7], "rope": [], "nope": list(range(8)), "local": []}
    assert [a[v].attention_chunk_size for v in VARIANTS] == [64, 64, None, None, 64]
    assert a["irope"].use_qk_norm and not a["irope-noqk"].use_qk_norm
    layout = {"nope_layer_interval", "attention_chunk_size", "use_qk_norm"}
    for v in VARIANTS:
        same = {k: x for k, x in vars(a[v]).items() if k not in layout}
        assert same == {k: x for k, x in vars(a["irope"]).items() if k not in layout}, v
    assert not any(x.attn_temperature_tuning for x in a.values())  # switched on at inference only
    with pytest.raises(ValueError, match="unknown variant 'alibi'"):
        variant_args("alibi", FULL)


@torch.no_grad()
def test_temperature_tuning_changes_nothing_below_floor_scale():
    args = variant_args("irope", QUICK).replace(nope_layer_interval=2)  # two NoPE layers
    torch.manual_seed(0)
    model = Transformer(args)
    for p in model.parameters():  # O(1) weights: every component matters
        p.copy_(torch.randn_like(p) * (0.5 if p.dim() > 1 else 1.0))
    model.eval()
    f = 16
    x = torch.randint(0, args.vocab_size, (2, f + 8))
    off = model(x)
    apply_temperature(model, {"floor_scale": f, "attn_scale": 0.1})
    on = model(x)
    # positions p < f - 1: floor((p + 1) / f) = 0, the scale is exactly 1
    assert torch.equal(on[:, :f - 1], off[:, :f - 1])
    assert (on[:, f - 1:] - off[:, f - 1:]).abs().amax(-1).min() > 1e-4  # from position f - 1 on, it acts
    apply_temperature(model, None)
    assert torch.equal(model(x), off)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from llama4.experiments.irope.training import prepare_shared
    from llama4.data.packing import TokenStream
    from llama4.tokenizer import Tokenizer

    d = prepare_shared(tmp_path_factory.mktemp("irope") / "shared", QUICK, lambda m: None)
    return Tokenizer(d / "tokenizer.model"), TokenStream(d / "data", "train")


def test_passkey_rows_are_needle_prompts_with_their_answer(shared):
    tok, stream = shared
    rng = random.Random(3)
    for _ in range(6):
        ids, at = passkey_row(tok, QUICK.train_len, rng, stream)
        assert len(ids) == QUICK.train_len + 1
        prompt, answer = tok.decode(ids[:at]), tok.decode(ids[at:])
        digits = answer.strip().rstrip(".")
        assert digits.isdigit() and 5 <= len(digits) <= 7
        assert prompt.endswith("What is the special magic number?\nThe special magic number is")
        assert prompt.count(f"The special magic number is {digits}.") == 1  # the needle, once, in the haystack

    class FakeRun:
        class loader:
            stream = None

            @staticmethod
            def next_batch():
                from llama4.data.packing import Batch

                x = torch.arange(2 * QUICK.train_len).view(2, -1)
                return Batch(x, x + 1, torch.zeros_like(x, dtype=torch.int32), torch.zeros_like(x, dtype=torch.int32))

    FakeRun.loader.stream = stream
    x, y, answer = StudyBatches(tok, QUICK.train_len, 3, seed=0, repeat_rows=1)(FakeRun)
    assert x.shape == y.shape == answer.shape == (6, QUICK.train_len)
    assert not answer[5].any() and torch.equal(y[5, :-1], x[5, 1:])
    assert not answer[:2].any()  # corpus rows: no answer
    assert torch.equal(x[:2], torch.arange(2 * QUICK.train_len).view(2, -1))
    for row_x, row_y, row_a in zip(x[2:5], y[2:5], answer[2:5]):
        scored = row_a.nonzero().flatten()
        assert 6 <= len(scored) <= 9 and scored[-1] == QUICK.train_len - 1  # the answer ends the row
        assert torch.equal(row_y[:-1], row_x[1:])  # targets are the next inputs
        assert tok.decode(row_y[scored].tolist()).strip().rstrip(".").isdigit()
    again = StudyBatches(tok, QUICK.train_len, 3, seed=0, repeat_rows=1)(FakeRun)
    assert torch.equal(again[0], x)  # a function of (seed, step)


def test_repeat_rows_repeat_one_corpus_segment(shared):
    _, stream = shared
    rng = random.Random(1)
    for _ in range(5):
        row = repeat_row(QUICK.train_len, rng, stream)
        assert len(row) == QUICK.train_len + 1
        periods = [p for p in range(1, 65) if row[p:] == row[:-p]]
        assert periods and periods[0] >= 16  # one segment of 16-64 tokens, over and over


def _fake(delta: dict, loss_full: dict, grid: list[list[float]], lengths, depths) -> dict:
    return {"longppl": {"delta": {str(k): v for k, v in delta.items()},
                        "loss_full": {str(k): v for k, v in loss_full.items()}, "multiples": list(delta)},
            "needle": {"lengths": lengths, "depths": depths,
                       "fillers": {"random": {"grid": grid}, "corpus": {"grid": grid}}}}


def test_criteria_follow_the_preregistered_thresholds():
    spec = FULL
    L = spec.train_len
    lengths, depths = [k * L for k in spec.needle_multiples], list(spec.depths)
    ks = spec.multiples

    def grid(acc_by_k):
        return [[acc_by_k(k) for k in spec.needle_multiples] for _ in depths]

    good = {("rope", s): _fake({k: 0.0 if k == 1 else 0.6 * k for k in ks}, {k: 5 + k for k in ks},
                               grid(lambda k: 1.0 if k == 1 else 0.0), lengths, depths) for s in (0, 1)}
    good |= {("irope", s): _fake({k: 0.01 for k in ks}, {k: 5.0 for k in ks}, grid(lambda k: 1.0), lengths, depths)
             for s in (0, 1)}
    good |= {("local", s): _fake({k: 0.0 for k in ks}, {k: 5.0 for k in ks}, grid(lambda k: 0.0), lengths, depths)
             for s in (0, 1)}
    tuning = {"identity": {"tokens": 63, "max_abs_logit_change": 0.0}, "chosen": {"floor_scale": 64, "attn_scale": 0.1},
              "effect": {"measured": {"Δ gain": 0.0}, "pass": False}}
    rows = criteria(spec, [0, 1], good, tuning, None)
    verdict = {r["criterion"][:40]: r["pass"] for r in rows}
    assert [r["pass"] for r in rows] == [True] * 8 + [False, True]
    assert all(set(r) == {"criterion", "threshold", "measured", "pass"} for r in rows)
    assert rows[0]["measured"] == {"seed 0": 2.4, "seed 1": 2.4}

    bad = copy.deepcopy(good)
    bad[("irope", 1)]["longppl"]["delta"]["16"] = 0.2  # one seed extrapolates badly at 16L
    bad[("rope", 0)]["longppl"]["delta"]["4"] = 0.1  # one seed's baseline does not fail enough
    bad[("local", 0)]["needle"]["fillers"]["random"]["grid"][0][2] = 1.0  # the control finds one far needle
    bad_rows = {r["criterion"][:40]: r for r in criteria(spec, [0, 1], bad, tuning, None)}
    assert not bad_rows["2. irope: worst Δ(k) for k <= 16"]["pass"]
    assert bad_rows["2. irope: worst Δ(k) for k <= 16"]["measured"] == {"seed 0": 0.01, "seed 1": 0.2}
    assert not bad_rows["1. rope: Δ at 4L shows the failure"]["pass"]
    assert bad_rows[next(k for k in bad_rows if k.startswith("3. local"))]["pass"]  # 1 of 10 far cells: 10% <= 20%
    assert len(verdict) == len(bad_rows)
    one_seed = criteria(spec, [0], good, tuning, None)
    assert not one_seed[-1]["pass"] and one_seed[-1]["measured"] == {"seeds": 1}


def test_passkey_accuracy_selects_cells():
    s = {"lengths": [256, 512], "depths": [0, 50],
         "fillers": {"random": {"grid": [[1, 0], [1, 1]]}, "corpus": {"grid": [[0, 0], [1, 0]]}}}
    assert passkey_accuracy(s) == 0.5
    assert passkey_accuracy(s, [256]) == 0.75
    assert passkey_accuracy(s, [512], [50]) == 0.5


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "llama4", "experiment", "irope", *args], capture_output=True,
                          text=True, timeout=timeout, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def test_bad_input_is_refused_before_anything_is_written(tmp_path):
    r = _cli("--out", str(tmp_path / "a"), "--quick", "--seeds", "0")
    assert r.returncode == 2 and "--seeds must be >= 1" in r.stderr and not (tmp_path / "a").exists()
    r = _cli("--out", str(tmp_path / "b"), "--quick", "--default-model", str(tmp_path / "missing"))
    assert r.returncode == 2 and "--default-model" in r.stderr and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_quick_study_end_to_end_and_resumable(tmp_path):
    out = tmp_path / "study"
    r = _cli("--out", str(out), "--quick", "--seeds", "2", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    verdict = json.loads((out / "verdict.json").read_text())
    assert [v["criterion"][:2] for v in verdict[:10]] == ["1.", "1.", "2.", "2.", "3.", "3.", "3.", "4.", "4.", "5."]
    for v in verdict:
        assert set(v) == {"criterion", "threshold", "measured", "pass"} and isinstance(v["pass"], bool)
    assert all(set(v["measured"]) == {"seed 0", "seed 1"} for v in verdict[:7])
    assert verdict[7]["pass"] and verdict[7]["measured"] == {"max |Δ logit|": 0.0}  # identity below floor_scale
    s = json.loads((out / "summary.json").read_text())
    assert set(s["tables"]) == set(VARIANTS) | {"default"}
    assert s["temperature"]["chosen"]["floor_scale"] in QUICK.floor_scales
    assert s["temperature"]["select_k"] not in s["temperature"]["report_ks"]  # reported on other lengths only
    rows = s["prefill_cost"]["irope-s0"]["rows"]
    assert [x["tokens"] for x in rows] == [k * QUICK.train_len for k in QUICK.multiples]
    assert all(x["peak_rss_mib"] > 0 and x["tokens_per_s"] > 0 for x in rows)
    for f in ("report.md", "delta.png", "loss_by_position.png", "passkey.png", "runs/irope-s1/final/config.json",
              "probes/rope-s0/longppl/longppl.json", "probes/local-s1/needle/summary.json"):
        assert (out / f).is_file(), f
    # what `llama4 eval needle` writes, cell by cell
    cell = json.loads(next((out / "probes/irope-s0/needle/cells/corpus").iterdir()).read_text())
    assert cell["prompt_format"] == "completion" and cell["context_length"] % QUICK.train_len == 0

    # a second call reuses every run and probe and gives the same verdict
    stamp = (out / "runs/irope-s0/final/model.safetensors").stat().st_mtime_ns
    r2 = _cli("--out", str(out), "--quick", "--seeds", "2", "--no-progress")
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert (out / "runs/irope-s0/final/model.safetensors").stat().st_mtime_ns == stamp
    assert "run(s) of" not in r2.stdout and "probing" not in r2.stdout and "training the default" not in r2.stdout
    assert json.loads((out / "verdict.json").read_text()) == verdict

    # a folder trained with other settings is refused
    study = json.loads((out / "study.json").read_text())
    study["spec"]["steps"] += 1
    (out / "study.json").write_text(json.dumps(study))
    r3 = _cli("--out", str(out), "--quick", "--seeds", "2", "--no-progress")
    assert r3.returncode == 2 and "other settings (steps" in r3.stderr
