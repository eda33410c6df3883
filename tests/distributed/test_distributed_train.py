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
