"""The real entry point: `torchrun --nproc_per_node 2 -m llama4 train --recipe debug --dp 2 --ep 2`
logs the same losses, gradient norms and balance losses as `llama4 train --recipe debug` in one
process on the same global batch, exports the same model, and its DCP checkpoint resumes on one
process (another world size) onto the same curve."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

TOL = 1e-5
STEPS = ["--max-steps", "4", "--checkpoint-every", "2", "--no-progress", "--set", "sample_tokens=0",
         "--set", "plots=false"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(cmd, out):
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def _torchrun(n, port, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master-addr", "127.0.0.1",
            "--master-port", str(port), "-m", "llama4", *args]


def _curve(out):
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [(r["step"], r["loss"], r["grad_norm"], r["aux_loss"], r["z_loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from dist_harness import free_port

    root = tmp_path_factory.mktemp("train")
    ref = root / "single"
    _run([sys.executable, "-m", "llama4", "train", "--recipe", "debug", "--out", str(ref), *STEPS], ref)
    shared = ["--set", f"tokenizer={ref / 'tokenizer.model'}", "--set", f"data_dir={ref / 'data'}"]
    two = root / "fsdp_ep"
    log = _run(_torchrun(2, free_port(), "train", "--recipe", "debug", "--out", str(two), *STEPS, *shared,
                         "--set", "batch_size=4", "--dp", "2", "--ep", "2"), two)
    resumed = root / "resumed_on_one"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    shutil.rmtree(resumed / "final")
    _run(_torchrun(1, free_port(), "train", "--recipe", "debug", "--out", str(resumed), *STEPS, *shared,
                   "--set", "batch_size=8", "--resume"), resumed)
    return dict(ref=ref, two=two, resumed=resumed, log=log)


def test_two_processes_follow_the_single_process_curve(runs):
    ref, two = _curve(runs["ref"]), _curve(runs["two"])
    assert [r[0] for r in two] == [1, 2, 3, 4]
    assert ref[0][1] - ref[-1][1] > 0.05  # it trains: the curves are not flat constants
    for a, b in zip(two, ref):
        assert all(abs(x - y) <= TOL for x, y in zip(a[1:], b[1:])), (a, b)
    assert "dp_replicate=1 dp=2 ep=2 tp=1" in runs["log"]  # the layout asked for is the one used


def test_export_matches_the_single_process_model(runs):
    import llama4

    a, b = llama4.load(runs["ref"] / "final"), llama4.load(runs["two"] / "final")
    worst = max((a.state_dict()[k] - v).abs().max().item() for k, v in b.state_dict().items())
    assert worst <= TOL


def test_checkpoints_are_dcp_and_resume_on_another_world_size(runs):
    ckpt = runs["two"] / "checkpoints" / "step_00000002"
    names = {p.name for p in ckpt.iterdir()}
    assert {".metadata", "state.pt", "meta.json", "__0_0.distcp", "__1_0.distcp"} <= names
    assert json.loads((ckpt / "meta.json").read_text())["data_parallel"] == 2
    ref, resumed = _curve(runs["ref"]), _curve(runs["resumed"])
    assert [r[0] for r in resumed] == [1, 2, 3, 4]  # steps 1-2 kept from the log, 3-4 after the resume
    for a, b in zip(resumed[2:], ref[2:]):
        assert all(abs(x - y) <= TOL for x, y in zip(a[1:], b[1:])), (a, b)
    events = [json.loads(line).get("event") for line in open(runs["resumed"] / "metrics.jsonl")]
    assert "resume" in events
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert "model" not in state and state["step"] == 2  # the weights live in the DCP shards only


# --------------------------------------------------------------------------------------------
# FSDP2 (x EP) with the activation checkpointing `llama4 train --dp 2 --ep 2 --activation-checkpointing`
# applies: the trainer's own `setup` and `train_step` in 2 processes, each block recomputed in
# backward under FSDP2, and the same step as without it.

def _ac_worker(rank, world_size, sets, out_dir):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from dist_harness import dump
    from llama4.distributed import ParallelConfig
    from llama4.distributed.run import distributed_run
    from llama4.recipes import get_recipe
    from llama4.train import TrainState, apply_overrides, setup, train_step
    from llama4.train.state import Meter
    from llama4.train.step import lm_loss

    results = {}
    for ac in (False, True):
        cfg = apply_overrides(get_recipe("debug"), [*sets, "progress=false", "threads=1", "batch_size=4",
                                                    f"activation_checkpointing={str(ac).lower()}"])
        drun = distributed_run(cfg, ParallelConfig(dp=2, ep=2))  # what `llama4 train --dp 2 --ep 2` builds
        run = setup(cfg, out_dir / f"ac_{ac}", parallelize=drun.parallelize, runtime=drun.runtime())
        phase, calls = ["idle"], []

        def loss_fn(r, batch):  # the step's loss seam: everything after it returns is backward
            phase[0] = "forward"
            out = lm_loss(r, batch)
            phase[0] = "backward"
            return out

        for i, block in enumerate(run.model.layers):
            block.attention.register_forward_pre_hook(lambda *_, i=i: calls.append((phase[0], i)))
        state = TrainState(meter=Meter(len(run.moe), cfg.model.n_experts))
        steps = [train_step(run, state, loss_fn=loss_fn) for _ in range(2)]
        results[ac] = dict(
            calls=calls, loss=[s.loss for s in steps], grad_norm=[s.grad_norm for s in steps],
            fsdp=all(isinstance(b, FSDPModule) for b in run.model.layers),
            sharded=all(isinstance(p, DTensor) for p in run.model.layers[0].parameters()),
        )
    dump(results, out_dir / f"ac_rank{rank}.pkl")


@pytest.fixture(scope="module")
def ac_runs(tmp_path_factory):
    from dist_harness import load, spawn

    from llama4.data import prepare_embedded_corpus
    from llama4.data.corpus import iter_corpus
    from llama4.recipes import get_recipe
    from llama4.tokenizer.bpe import train_tokenizer_file

    d = tmp_path_factory.mktemp("ac")
    cfg = get_recipe("debug")
    docs = [x.text for x in iter_corpus("train")][:: cfg.tokenizer_doc_stride]
    tok = train_tokenizer_file(docs, cfg.model.vocab_size, d / "tokenizer.model")
    prepare_embedded_corpus(tok, d / "data", progress=False)
    spawn(_ac_worker, 2, [f"tokenizer={d / 'tokenizer.model'}", f"data_dir={d / 'data'}"], d)
    return [load(d / f"ac_rank{r}.pkl") for r in range(2)]


@pytest.mark.slow
def test_fsdp2_with_the_trainers_activation_checkpointing_recomputes_blocks(ac_runs):
    n = 4  # debug recipe blocks
    for rank in ac_runs:
        off, on = rank[False], rank[True]
        assert off["fsdp"] and on["fsdp"] and off["sharded"] and on["sharded"]  # FSDP2 really wraps every block
        fwd = [("forward", i) for i in range(n)]
        assert off["calls"] == fwd * 2  # no recomputation without it
        assert on["calls"] == (fwd + [("backward", i) for i in reversed(range(n))]) * 2  # each block again, in backward
        assert on["loss"] == pytest.approx(off["loss"], abs=1e-6)  # the same steps
        assert on["grad_norm"] == pytest.approx(off["grad_norm"], rel=1e-5)
    assert ac_runs[0][True]["loss"] == ac_runs[1][True]["loss"]  # every rank logs the global batch's mean
