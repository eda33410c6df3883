"""DPO (llama4/posttrain/dpo.py, logprobs.py) against TRL 1.13's DPOTrainer, plus bad input and a
tiny end-to-end ``llama4 dpo`` run.

The oracle: one tiny random checkpoint written by ``llama4.save`` with its Hugging Face tokenizer
files (tokenizer.json + Llama 4 chat template), loaded by transformers' ``Llama4ForCausalLM`` for
TRL and by ``llama4.load`` for us. TRL tokenizes the conversational pairs itself through the chat
template, precomputes the reference log-probs, collates ``[chosen; rejected]`` and computes its
sigmoid loss (``trainer.compute_loss``); its token ids, loss and every parameter's gradient must
equal ours (through our HF key table) to 1e-5 in float32.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from oracles import require
from serving import tiny_args

import llama4
from llama4.model import Transformer
from llama4.posttrain.chat_data import pad_id_of
from llama4.posttrain.dpo import (check_pair, load_pairs_jsonl, make_loss_fn, pair_batch, reference_logps,
                                  tokenize_pair, DPOBatch)
from llama4.tokenizer import Tokenizer
from llama4.tokenizer.files import write_tiktoken_bpe

BETA = 0.1

PAIRS = [
    {"prompt": [{"role": "user", "content": "What is 2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "five, I think"}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris."}],
     "rejected": [{"role": "assistant", "content": "Lyon"}]},
    {"prompt": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "Again, in German"}],
     "chosen": [{"role": "assistant", "content": "Hallo!"}],
     "rejected": [{"role": "assistant", "content": "Hello again, friend."}]},
]


def write_model(d: Path, seed: int = 0, std: float = 0.3) -> Path:
    """A tiny random model with O(1)-scale weights, its byte-level tokenizer.model and the HF tokenizer files."""
    d.mkdir(parents=True, exist_ok=True)
    tok_path = d.parent / f"{d.name}-tokenizer.model"
    write_tiktoken_bpe(tok_path, {bytes([b]): b for b in range(256)})
    torch.manual_seed(seed)
    m = Transformer(tiny_args())
    m.init_weights(std=std)
    llama4.save(m, d, tokenizer=tok_path)
    if not (d / "tokenizer.model").is_file():
        write_tiktoken_bpe(d / "tokenizer.model", {bytes([b]): b for b in range(256)})
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("dpo") / "tiny")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------
# the oracle


def trl_loss_and_grads(model_dir: Path, tmp: Path):
    require("trl")
    transformers = require("transformers")
    datasets = require("datasets")
    from trl import DPOConfig, DPOTrainer

    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.Llama4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp / "trl"), per_device_train_batch_size=len(PAIRS), beta=BETA,
                     loss_type=["sigmoid"], router_aux_loss_coef=0.0, precompute_ref_log_probs=True, max_length=None, report_to=[],
                     use_cpu=True, bf16=False, fp16=False, dataset_num_proc=None, seed=0, save_strategy="no",
                     logging_strategy="no", dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(PAIRS),
                         processing_class=hf_tok)
    ds = trainer.train_dataset
    ids = [(ds[i]["prompt_ids"], ds[i]["chosen_ids"], ds[i]["rejected_ids"]) for i in range(len(ds))]
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return ids, loss.detach(), grads


def our_loss_and_grads(model_dir: Path):
    tok = Tokenizer(model_dir / "tokenizer.model")
    pairs = [tokenize_pair(tok, check_pair(p, f"pair {i}")) for i, p in enumerate(PAIRS)]
    pad = pad_id_of(tok)
    ref = reference_logps(llama4.load(model_dir, dtype=torch.float32), pairs, pad, batch_size=2)
    model = llama4.load(model_dir, dtype=torch.float32).train()
    run = SimpleNamespace(model=model, rt=SimpleNamespace(device=torch.device("cpu")), autocast=contextlib.nullcontext)
    out = make_loss_fn(BETA)(run, DPOBatch(pair_batch(pairs, pad), ref))
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return pairs, out, grads, model


def test_loss_and_gradients_equal_trl_dpo_trainer(model_dir, tmp_path):
    from llama4.checkpoint.hf import plan

    trl_ids, trl_loss, trl_grads = trl_loss_and_grads(model_dir, tmp_path)
    pairs, ours, our_grads, model = our_loss_and_grads(model_dir)

    # TRL's chat-template tokenization of every pair = our chat format's
    assert trl_ids == [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    loss_err = abs(ours.loss.item() - trl_loss.item())
    print(f"\nDPO loss ours {ours.loss.item():.8f} TRL {trl_loss.item():.8f} |diff| {loss_err:.2e}; "
          f"margin {float(ours.metrics['rewards/margins']):.5f}")
    assert loss_err <= 1e-5
    # the loss is not trivially log 2 (policy = reference at step 0 gives exactly log 2 for both, so the
    # gradients are what tells the implementations apart)
    assert abs(float(ours.metrics["rewards/margins"])) < 1e-5

    compared, worst, scale = 0, 0.0, 0.0
    ours_state = {n: our_grads.get(n, torch.zeros_like(p)) for n, p in model.named_parameters()}
    for m in plan(ours_state.keys(), model.args.n_layers):
        for name, g in zip(m.hf, m.rule.to_hf([ours_state[k] for k in m.ours])):
            ref = trl_grads.get(name)
            assert ref is not None, f"TRL produced no gradient for {name}"
            assert ref.shape == g.shape, name
            err = (g - ref).abs().max().item()
            worst, scale = max(worst, err), max(scale, ref.abs().max().item())
            assert err <= 1e-5, f"{name}: max |grad ours - TRL| = {err:.3e}"
            compared += 1
    assert compared == len(trl_grads)
    assert scale > 1e-3  # the gradients are not vanishing: the comparison means something
    print(f"gradients: {compared} HF tensors, max |diff| {worst:.2e}, max |grad| {scale:.3e}")


def test_loss_and_gradients_equal_trl_after_policy_moved(model_dir, tmp_path):
    """Policy != reference: a checkpoint one step away, so the log-ratios and the margin are not zero."""
    moved = tmp_path / "moved"
    model = llama4.load(model_dir, dtype=torch.float32)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    llama4.save(model, moved, tokenizer=model_dir / "tokenizer.model")
    # TRL's reference is the model it is given (precomputed from it); give both sides the reference's
    # log-probs from the ORIGINAL model by computing TRL's with a ref_model
    require("trl")
    transformers = require("transformers")
    datasets = require("datasets")
    from trl import DPOConfig, DPOTrainer

    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    policy = transformers.Llama4ForCausalLM.from_pretrained(moved, dtype=torch.float32)
    ref_model = transformers.Llama4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(PAIRS), beta=BETA,
                     loss_type=["sigmoid"], router_aux_loss_coef=0.0, max_length=None, report_to=[], use_cpu=True, bf16=False, fp16=False,
                     seed=0, save_strategy="no", logging_strategy="no")
    trainer = DPOTrainer(model=policy, ref_model=ref_model, args=args, train_dataset=datasets.Dataset.from_list(PAIRS),
                         processing_class=hf_tok)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}

    tok = Tokenizer(model_dir / "tokenizer.model")
    pairs = [tokenize_pair(tok, check_pair(p, "x")) for p in PAIRS]
    ref = reference_logps(llama4.load(model_dir, dtype=torch.float32), pairs, pad_id_of(tok), batch_size=3)
    ours_model = llama4.load(moved, dtype=torch.float32).train()
    run = SimpleNamespace(model=ours_model, rt=SimpleNamespace(device=torch.device("cpu")),
                          autocast=contextlib.nullcontext)
    out = make_loss_fn(BETA)(run, DPOBatch(pair_batch(pairs, pad_id_of(tok)), ref))
    out.loss.backward()
    margin = float(out.metrics["rewards/margins"])
    loss_err = abs(out.loss.item() - trl_loss.item())
    print(f"\nmoved policy: DPO loss ours {out.loss.item():.8f} TRL {trl_loss.item():.8f} |diff| {loss_err:.2e}; "
          f"margin {margin:.5f}")
    assert abs(margin) > 1e-3 and loss_err <= 1e-5

    from llama4.checkpoint.hf import plan

    state = {n: p.grad for n, p in ours_model.named_parameters()}
    worst = 0.0
    for m in plan(state.keys(), ours_model.args.n_layers):
        for name, g in zip(m.hf, m.rule.to_hf([state[k] for k in m.ours])):
            err = (g - trl_grads[name]).abs().max().item()
            worst = max(worst, err)
            assert err <= 1e-5, f"{name}: max |grad ours - TRL| = {err:.3e}"
    print(f"moved policy gradients: max |diff| {worst:.2e}")


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("row, needle", [
    ("{not json", ":2: not valid JSON"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}]},
     ":2: missing field 'rejected'"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"},
                                                               {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "assistant", "content": "c"}]},
     ":2: field 'chosen' must be a list holding exactly one assistant message, got 2"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, ":2: field 'chosen[0].role' is 'user'"),
    ({"prompt": [{"role": "user", "content": 3}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "c"}]}, ":2: field 'prompt[0].content'"),
    ({"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
     ":2: the prompt differs between 'chosen' and 'rejected' (first at message 0)"),
])
def test_bad_pairs_name_line_and_field(tmp_path, row, needle):
    f = write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], row])
    with pytest.raises(ValueError) as e:
        load_pairs_jsonl(f)
    assert needle in str(e.value), str(e.value)


def test_implicit_prompt_format_is_the_explicit_one():
    p = PAIRS[1]
    implicit = {"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]}
    assert check_pair(implicit, "x") == check_pair(p, "x")


def run_cli(capsys, *args):
    """``llama4 dpo ARGS`` in process (the CLI's own error handling and exit code)."""
    from llama4.cli import main

    capsys.readouterr()
    rc = main(["dpo", *map(str, args)])
    err = capsys.readouterr().err
    return SimpleNamespace(returncode=rc, stderr=err)


def test_cli_bad_input_errors_and_writes_nothing(model_dir, tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", PAIRS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], PAIRS[1], {"prompt": PAIRS[0]["prompt"], "chosen": []}])
    long = write_jsonl(tmp_path / "long.jsonl", [{**PAIRS[0], "prompt": [{"role": "user", "content": "x" * 200}]}])
    other = write_model(tmp_path / "other")
    swapped = {bytes([b]): b for b in range(256)}
    swapped[b"a"], swapped[b"b"] = ord("b"), ord("a")  # same size, other ids: a different tokenizer
    write_tiktoken_bpe(other / "tokenizer.model", swapped)
    cases = [
        ((bad,), f"{bad}:3: missing field 'rejected'"),
        ((long, "--max-length", 100), f"{long}:1: the pair is"),
        ((good, "--ref", other), "has a different tokenizer"),
        ((tmp_path / "missing.jsonl",), "pairs file not found"),
    ]
    for i, (extra, needle) in enumerate(cases):
        out = tmp_path / f"out{i}"
        r = run_cli(capsys, "--policy", model_dir, "--pairs", *extra[:1], "--out", out, *extra[1:], "--max-steps", 1)
        assert r.returncode == 2 and "llama4 dpo: error: " in r.stderr and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not out.exists(), f"{out} was created for bad input"


# ---------------------------------------------------------------------------------------------
# end to end


def test_dpo_run_raises_margin_and_accuracy_and_final_loads(model_dir, tmp_path, capsys):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "run"
    r = run_cli(capsys, "--policy", model_dir, "--pairs", pairs, "--out", out, "--max-steps", 12, "--batch-size", 3,
                "--lr", 3e-4, "--beta", 0.1, "--no-progress")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in recs if "rewards/margins" in x]
    assert len(train) == 12
    first, last = train[0], train[-1]
    print(f"\nmargin {first['rewards/margins']:.4f} -> {last['rewards/margins']:.4f}, accuracy "
          f"{first['rewards/accuracies']:.2f} -> {last['rewards/accuracies']:.2f}, loss {first['loss']:.4f} -> "
          f"{last['loss']:.4f}")
    assert abs(first["rewards/margins"]) < 1e-5  # step 1: the policy is the reference
    assert last["rewards/margins"] > 0.5 and last["rewards/accuracies"] == 1.0 and last["loss"] < first["loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_pairs"] == 3 and summary["beta"] == 0.1
    # final/ loads, and the trained model prefers the chosen answers the way the log says
    tok = Tokenizer(out / "final" / "tokenizer.model")
    toks = [tokenize_pair(tok, check_pair(p, "x")) for p in PAIRS]
    pad = pad_id_of(tok)
    ref = reference_logps(llama4.load(model_dir, dtype=torch.float32), toks, pad, 3)
    new = reference_logps(llama4.load(out / "final", dtype=torch.float32), toks, pad, 3)
    margins = BETA * ((new[:, 0] - ref[:, 0]) - (new[:, 1] - ref[:, 1]))
    assert (margins > 0).all(), margins


@pytest.mark.slow  # three CLI processes, ~25 s on one thread
def test_kill9_then_resume_is_bit_identical(model_dir, tmp_path):
    """The reference log-probs are recomputed from --policy on --resume: the continued run must match."""
    import os
    import subprocess
    import sys

    from llama4.train.run import FAULT_ENV
    from llama4.train.log import read_metrics

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    args = ["dpo", "--policy", model_dir, "--pairs", pairs, "--max-steps", 4, "--batch-size", 2, "--lr", 1e-4,
            "--checkpoint-every", 2, "--no-progress", "--threads", 1]

    def cli(*extra, env=None):
        return subprocess.run([sys.executable, "-m", "llama4", *map(str, args), *map(str, extra)], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})

    keys = ("step", "loss", "grad_norm", "rewards/margins", "rewards/accuracies")
    p = cli("--out", tmp_path / "a")
    assert p.returncode == 0, p.stderr
    ref = [tuple(r[k] for k in keys) for r in read_metrics(tmp_path / "a") if "event" not in r]
    assert [r[0] for r in ref] == [1, 2, 3, 4]
    b = tmp_path / "b"
    p = cli("--out", b, env={FAULT_ENV: "kill-after-step:3"})
    assert p.returncode == -9 and not (b / "final").exists()
    p = cli("--out", b, "--resume")
    assert p.returncode == 0 and "step 2/4" in p.stderr, p.stderr
    assert [tuple(r[k] for k in keys) for r in read_metrics(b) if "event" not in r] == ref
    wa, wb = llama4.load(tmp_path / "a" / "final").state_dict(), llama4.load(b / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_explicit_reference_model(model_dir, tmp_path, capsys):
    """--ref with the policy's own weights is the default run; another reference starts with a nonzero margin."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    other = write_model(tmp_path / "ref", seed=1)
    for name, ref in (("same", model_dir), ("other", other)):
        r = run_cli(capsys, "--policy", model_dir, "--pairs", pairs, "--out", tmp_path / name, "--ref", ref,
                    "--max-steps", 1, "--batch-size", 3, "--no-progress")
        assert r.returncode == 0, r.stderr
    first = {n: json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[0]) for n in ("same", "other")}
    assert abs(first["same"]["rewards/margins"]) < 1e-5
    assert abs(first["other"]["rewards/margins"]) > 1e-3
    assert json.loads((tmp_path / "other" / "summary.json").read_text())["reference"] == str(other.resolve())


@pytest.mark.slow  # a torchrun of 2 processes, ~20 s on one thread
@pytest.mark.parametrize("layout", [("--dp", "2"), ("--dp", "2", "--ep", "2")], ids=["fsdp2", "fsdp2xep"])
def test_two_processes_reproduce_one(model_dir, tmp_path, layout):
    """`torchrun --nproc_per_node 2 -m llama4 dpo ... --dp 2 [--ep 2]` (FSDP2, expert parallel; gloo
    on CPU) follows the single-process run over 5 steps: 2 pairs per rank = the 4 pairs one process reads."""
    import os
    import socket
    import subprocess
    import sys

    from llama4.train.log import read_metrics

    extra = {"prompt": [{"role": "user", "content": "Name a colour."}],
             "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "No."}]}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS + [extra])
    common = ["dpo", "--policy", model_dir, "--pairs", pairs, "--max-steps", 5, "--lr", 3e-4, "--no-progress",
              "--threads", 1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "llama4", *map(str, common), "--batch-size", "4", "--out",
                        str(tmp_path / "one")], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(port), "-m", "llama4", *map(str, common), "--batch-size", "2",
                        *layout, "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=300,
                       env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    keys = ("step", "loss", "grad_norm", "rewards/margins")
    one, two = ([tuple(r[k] for k in keys) for r in read_metrics(tmp_path / d) if "event" not in r]
                for d in ("one", "two"))
    assert [r[0] for r in two] == [r[0] for r in one] == [1, 2, 3, 4, 5]
    assert one[-1][3] > one[0][3]  # it learned something worth comparing
    for a, b in zip(one, two):
        assert all(abs(x - y) < 1e-4 * max(1.0, abs(x)) for x, y in zip(a[1:], b[1:])), (a, b)
    wa, wb = llama4.load(tmp_path / "one" / "final").state_dict(), llama4.load(tmp_path / "two" / "final").state_dict()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
