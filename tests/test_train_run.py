"""Training runs of the debug recipe: the CLI end to end, kill -9 + resume bit-identity, NaN/Inf
safety, gradient accumulation, activation checkpointing, bias balancing, bf16 autocast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama4
from llama4.recipes import get_recipe
from llama4.train import TrainingDiverged, apply_overrides, train
from llama4.train import checkpointing as ckpt
from llama4.train import evaluate as ev
from llama4.train.log import read_metrics
from llama4.train.trainer import FAULT_ENV

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A debug tokenizer and tokenized corpus, made once for the runs that do not test them."""
    from llama4.data import prepare_embedded_corpus
    from llama4.data.corpus import iter_corpus
    from llama4.tokenizer.bpe import train_tokenizer_file

    d = tmp_path_factory.mktemp("shared")
    cfg = get_recipe("debug")
    docs = [x.text for x in iter_corpus("train")][:: cfg.tokenizer_doc_stride]
    tok = train_tokenizer_file(docs, cfg.model.vocab_size, d / "tokenizer.model")
    prepare_embedded_corpus(tok, d / "data", progress=False)
    return [f"tokenizer={d / 'tokenizer.model'}", f"data_dir={d / 'data'}"]


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def debug_cfg(shared, *sets):
    # one thread: in-process runs cannot set OMP_WAIT_POLICY, and spinning threads crawl on a busy machine
    return apply_overrides(get_recipe("debug"), [*shared, "progress=false", "sample_tokens=0", "plots=false",
                                                 "threads=1", *sets])


def cli(out, *args, env=None, check=True):
    cmd = [sys.executable, "-m", "llama4", "train", "--recipe", "debug", "--out", str(out), "--no-progress", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})},
                       timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def train_losses(out) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(out) if "event" not in r]


def test_cli_debug_recipe_end_to_end(tmp_path):
    """The whole job from the command line: own BPE, shards, training, report, plots, HF export."""
    out = tmp_path / "run"
    p = cli(out)
    for f in ("tokenizer.model", "metrics.jsonl", "summary.json", "train_config.json", "loss.png", "expert_load.png"):
        assert (out / f).is_file(), f
    for png in ("loss.png", "expert_load.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    recs = read_metrics(out)
    train_recs = [r for r in recs if "event" not in r]
    assert [r["step"] for r in train_recs] == list(range(1, 21))
    assert all({"step", "loss", "lr", "tokens_per_s", "expert_load"} <= set(r) for r in train_recs)
    assert any(r.get("event") == "eval" for r in recs)
    s = json.loads((out / "summary.json").read_text())
    # it learns: validation loss is well under a uniform guess over the vocabulary
    assert s["val_loss_mean"] < torch.log(torch.tensor(2560.0)).item() - 1.0
    assert set(s["val_loss"]) >= {"eng", "deu", "cmn", "other"}
    assert len(s["samples"]) == 3
    lid = ev.LanguageID()  # the report's language is what the identifier says of the sample's text
    assert all(x["detected"] == lid(x["text"]) and x["detected"] in lid.langs for x in s["samples"])
    assert "validation loss" in p.stdout and "[eng->" in p.stdout
    assert len(s["expert_load_max_over_mean"]) == 2 and s["warning"] is None

    # OUT/final: HF layout + the run's tokenizer; same weights as the last training checkpoint
    final = out / "final"
    assert (final / "tokenizer.model").read_bytes() == (out / "tokenizer.model").read_bytes()
    model = llama4.load(final)
    state, meta, _ = ckpt.latest_checkpoint(out / "checkpoints")
    assert meta["step"] == 20
    for k, v in model.state_dict().items():
        assert torch.equal(v, state["model"][k]), k
    from transformers import Llama4ForCausalLM

    hf = Llama4ForCausalLM.from_pretrained(final, torch_dtype=torch.float32, attn_implementation="sdpa")
    x = torch.randint(0, 2560, (1, 80))
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() < 1e-4
    from llama4.infer.model_dir import load_model_dir

    m2, tok, _ = load_model_dir(out)  # what `llama4 serve --model OUT` reads
    assert tok.n_words == 2560 and m2.args == model.args

    # a second run into the same folder without --resume refuses instead of clobbering
    p = cli(out, check=False)
    assert p.returncode == 2 and "--resume" in p.stderr


def test_kill9_during_save_then_resume_is_bit_identical(tmp_path, shared):
    sets = [x for s in shared for x in ("--set", s)] + ["--set", "sample_tokens=0", "--set", "plots=false"]
    args = ["--max-steps", "8", "--checkpoint-every", "2", *sets]
    cli(tmp_path / "a", *args)
    ref = train_losses(tmp_path / "a")
    assert [s for s, _ in ref] == list(range(1, 9))

    b = tmp_path / "b"
    p = cli(b, *args, env={FAULT_ENV: "kill-during-save:6"}, check=False)
    assert p.returncode == -9  # SIGKILL, between writing checkpoint 6 and renaming it into place
    assert [s for s, _ in ckpt.list_checkpoints(b / "checkpoints")] == [2, 4]
    assert any(x.name.startswith(".tmp-step_00000006") for x in (b / "checkpoints").iterdir())
    assert not (b / "final").exists()
    p = cli(b, *args, "--resume")
    assert "resumed from" in p.stderr and "step 4/8" in p.stderr
    assert not any(x.name.startswith(".tmp-") for x in (b / "checkpoints").iterdir())
    assert train_losses(b) == ref  # bit-identical floats, every step, with no duplicate from the redo
    ra = json.loads((tmp_path / "a" / "summary.json").read_text())
    rb = json.loads((b / "summary.json").read_text())
    assert ra["val_loss"] == rb["val_loss"]
    wa, wb = llama4.load(tmp_path / "a" / "final").state_dict(), llama4.load(b / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    # killed between steps (not during a save), resumed again from the same command line
    c = tmp_path / "c"
    p = cli(c, *args, env={FAULT_ENV: "kill-after-step:7"}, check=False)
    assert p.returncode == -9
    cli(c, *args, "--resume")
    assert train_losses(c) == ref


def test_resume_refuses_a_different_run(tmp_path, shared):
    out = tmp_path / "r"
    train(debug_cfg(shared, "max_steps=2", "checkpoint_every=2", "final_eval_batches=0"), out)
    with pytest.raises(ValueError, match="lr: checkpoint 0.003, now 0.001"):
        train(debug_cfg(shared, "max_steps=4", "lr=1e-3"), out, resume=True)


class Poison:
    """A parallelize hook (the distributed seam) that makes the logits NaN on chosen steps."""

    def __init__(self, steps):
        self.steps, self.calls = set(steps), 0

    def __call__(self, model, cfg):
        def hook(module, inp, out):
            self.calls += 1
            return out * float("nan") if self.calls in self.steps else out

        model.output.register_forward_hook(hook)
        return model


def test_nonfinite_step_is_skipped_and_logged(tmp_path, shared):
    cfg = debug_cfg(shared, "max_steps=6", "eval_every=100", "final_eval_batches=0", "checkpoint_every=1",
                    "keep_checkpoints=10")
    summary = train(cfg, tmp_path / "ok", parallelize=Poison({3}))
    recs = read_metrics(tmp_path / "ok")
    bad = [r for r in recs if r.get("event") == "nonfinite"]
    assert [r["step"] for r in bad] == [3]
    steps = [r["step"] for r in recs if "event" not in r]
    assert 3 not in steps and steps == [1, 2, 4, 5, 6]  # the skipped step has no loss record
    assert next(r for r in recs if r.get("step") == 4 and "event" not in r)["skipped"] == 1
    assert summary["steps"] == 6
    # the skipped step left weights and optimizer alone; the steps around it did update
    saved = {s: ckpt.load_checkpoint(p)[0] for s, p in ckpt.list_checkpoints(tmp_path / "ok" / "checkpoints")}
    assert 3 not in saved  # no checkpoint is written right after a bad step
    # step 3 was skipped: the next checkpoint (4) is exactly one AdamW update past step 2
    adam_steps = {s: saved[s]["optimizer"]["state"][0]["step"].item() for s in (2, 4, 5)}
    assert adam_steps == {2: 2, 4: 3, 5: 4}
    assert not torch.equal(saved[2]["model"]["output.weight"], saved[4]["model"]["output.weight"])
    assert all(torch.isfinite(v).all() for v in saved[6]["model"].values())


def test_repeated_nonfinite_stops_keeping_last_good_checkpoint(tmp_path, shared):
    out = tmp_path / "bad"
    cfg = debug_cfg(shared, "max_steps=20", "checkpoint_every=2", "max_bad_steps=3", "eval_every=100")
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps .*\(steps 5-7\).*step_00000004"):
        train(cfg, out, parallelize=Poison(range(5, 100)))
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2, 4]
    state, _, _ = ckpt.latest_checkpoint(out / "checkpoints")
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (out / "final").exists()


def test_grad_accumulation_matches_one_big_batch(tmp_path, shared):
    common = ["max_steps=3", "eval_every=100", "final_eval_batches=0", "balance=none", "z_loss_coef=0"]
    a = train(debug_cfg(shared, *common, "batch_size=8", "grad_accum=1"), tmp_path / "a")
    b = train(debug_cfg(shared, *common, "batch_size=4", "grad_accum=2"), tmp_path / "b")
    la, lb = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert a["tokens"] == b["tokens"]
    for (sa, xa), (sb, xb) in zip(la, lb):
        assert sa == sb and xa == pytest.approx(xb, abs=1e-5)


def test_activation_checkpointing_gives_the_same_run(tmp_path, shared):
    common = ["max_steps=3", "eval_every=100", "final_eval_batches=0"]
    train(debug_cfg(shared, *common), tmp_path / "a")
    train(debug_cfg(shared, *common, "activation_checkpointing=true"), tmp_path / "b")
    for (sa, xa), (sb, xb) in zip(train_losses(tmp_path / "a"), train_losses(tmp_path / "b")):
        assert sa == sb and xa == pytest.approx(xb, abs=1e-6)


def test_bias_balancing_trains_the_bias_and_warns_about_the_export(tmp_path, shared):
    out = tmp_path / "bias"
    s = train(debug_cfg(shared, "max_steps=6", "balance=bias", "bias_update_rate=0.01", "eval_every=100"), out)
    state, _, _ = ckpt.latest_checkpoint(out / "checkpoints")
    biases = state["expert_bias"]
    assert len(biases) == 2 and all(b.abs().sum() > 0 for b in biases.values())
    assert all(b.abs().max().item() <= 6 * 0.01 + 1e-6 for b in biases.values())  # sign steps of 0.01
    assert s["warning"] and "cannot hold" in s["warning"] and 0.0 <= s["routing_agreement_without_bias"] <= 1.0


def test_bf16_autocast_runs_on_cpu(tmp_path, shared):
    s = train(debug_cfg(shared, "max_steps=2", "dtype=bfloat16", "eval_every=100", "final_eval_batches=1"),
              tmp_path / "bf16")
    assert all(torch.isfinite(torch.tensor(v)) for v in s["val_loss"].values())
    assert llama4.load(tmp_path / "bf16" / "final").tok_embeddings.weight.dtype == torch.float32  # fp32 master


def test_compile_option_matches_eager(tmp_path, shared):
    common = ["max_steps=2", "eval_every=100", "final_eval_batches=0", "load_eval_windows=0"]
    train(debug_cfg(shared, *common), tmp_path / "eager")
    train(debug_cfg(shared, *common, "compile=true"), tmp_path / "compiled")
    for (sa, xa), (sb, xb) in zip(train_losses(tmp_path / "eager"), train_losses(tmp_path / "compiled")):
        assert sa == sb and xa == pytest.approx(xb, abs=1e-5)


METAP_BASE = {"dim": 32, "n_layers": 2, "attn_dim": 32, "head_dim": 16, "dense_dim": 128, "expert_dim": 64,
              "n_experts": 4}


def test_metap_run_uses_per_layer_rules_and_exports_the_trained_function(tmp_path, shared):
    from llama4.train.trainer import build_model

    cfg = debug_cfg(shared, "max_steps=3", "eval_every=100", "final_eval_batches=1", "parametrization=metap",
                    "metap=" + json.dumps({"base": METAP_BASE, "output_mult": 2.0}))
    s = train(cfg, tmp_path / "m")
    assert all(torch.isfinite(torch.tensor(v)) for v in s["val_loss"].values())
    state, _, _ = ckpt.latest_checkpoint(tmp_path / "m" / "checkpoints")
    model = build_model(cfg, torch.device("cpu"))
    assert model.args.residual_mult == 0.5 and model.args.logit_mult == 1.0  # depth 4 vs 2; 2.0 / (64 / 32)
    model.load_state_dict(state["model"])
    lrs = {g["name"]: g["lr"] for g in state["optimizer"]["param_groups"]}
    hidden = next(v for k, v in lrs.items() if "attn.wq" in k)
    assert hidden == pytest.approx(next(v for k, v in lrs.items() if "embedding" in k) / 2)  # 1/width ratio on hidden matrices
    x = torch.randint(0, 2560, (2, 70))
    with torch.no_grad():
        assert (llama4.load(tmp_path / "m" / "final")(x) - model(x)).abs().max() < 1e-4


def test_metap_config_errors_name_the_field(tmp_path):
    from llama4.train import TrainConfigError

    with pytest.raises(TrainConfigError, match="metap.*widht"):
        apply_overrides(get_recipe("debug"), ['metap={"base": {"widht": 3}}'])
    with pytest.raises(TrainConfigError, match="parametrization must be one of"):
        apply_overrides(get_recipe("debug"), ["parametrization=mup"])
    (tmp_path / "bad.json").write_text("{}")
    p = cli(tmp_path / "r", "--metap", str(tmp_path / "bad.json"), check=False)
    assert p.returncode == 2 and "not a `llama4 metap predict` output" in p.stderr and "Traceback" not in p.stderr
