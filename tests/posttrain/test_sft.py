"""`llama4 sft`: the assistant-only mask against the chat format's own encoding, the loss against a
hand-computed masked cross-entropy, a tiny run that memorises its answers, kill -9 + resume
bit-identity, the OUT/final export, and every bad input's message."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving import write_tiny_model_dir  # noqa: E402

import llama4  # noqa: E402
from llama4.posttrain.chat_data import (IGNORE_INDEX, SFTLoader, build_examples, labelled_example,  # noqa: E402
                                        load_messages_jsonl, pad_id_of, tokenize_conversation)
from llama4.posttrain.sft import sft, sft_loss  # noqa: E402
from llama4.tokenizer import Tokenizer  # noqa: E402
from llama4.tokenizer.chat_format import encode_dialog_prompt  # noqa: E402
from llama4.train.log import read_metrics  # noqa: E402
from llama4.train.trainer import FAULT_ENV  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Peru?"},
    {"role": "assistant", "content": "Lima."},
]
FACTS = [("Capital of France?", "Paris"), ("Capital of Peru?", "Lima"), ("Two plus two?", "4"),
         ("Colour of grass?", "green")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def tok(base):
    return Tokenizer(base / "tokenizer.model")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def facts_jsonl(path: Path) -> Path:
    return write_jsonl(path, [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                              for q, a in FACTS])


def test_mask_is_exactly_the_assistant_tokens(tok):
    ids, mask = tokenize_conversation(tok, DIALOG)
    expected = [False] * len(ids)
    for k, m in enumerate(DIALOG):
        if m["role"] != "assistant":
            continue
        # the chat format's own prompt for generating turn k ends right where the assistant starts writing
        prefix = encode_dialog_prompt(tok, DIALOG[:k])
        assert ids[:len(prefix)] == prefix
        body = tok.encode(m["content"]) + [tok.eot_id]
        assert ids[len(prefix):len(prefix) + len(body)] == body
        expected[len(prefix):len(prefix) + len(body)] = [True] * len(body)
    assert mask == expected
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Paris.<|eot|>Lima.<|eot|>"
    inputs, labels = labelled_example(ids, mask)
    assert inputs == ids[:-1]
    assert [y != IGNORE_INDEX for y in labels] == mask[1:]
    assert [y for y in labels if y != IGNORE_INDEX] == [i for i, m in zip(ids, mask) if m]


def test_tools_go_into_the_system_message(tok):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    ids, mask = tokenize_conversation(tok, DIALOG[1:3], tools=tools)
    text = tok.decode(ids)
    assert text.index("get_weather") < text.index("Capital of France?")
    assert "<|header_start|>system<|header_end|>" in text
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "Paris.<|eot|>"


def test_loss_equals_hand_computed_masked_cross_entropy(base, tok, tmp_path):
    convs = load_messages_jsonl(facts_jsonl(tmp_path / "d.jsonl"))
    convs.append(type(convs[0])(tuple(DIALOG), "dialog"))
    examples = build_examples(tok, convs, seq_len=128)
    loader = SFTLoader(examples, batch_size=len(examples), pad_id=pad_id_of(tok), seed=0)
    batch = loader.next_batch()
    assert batch.inputs.shape[1] == max(len(x) for x, _ in examples)  # padded to the longest, to the right
    model = llama4.load(base, dtype=torch.float32)
    rt = SimpleNamespace(device=torch.device("cpu"), dist=None, world_size=1)
    run = SimpleNamespace(model=model, rt=rt, autocast=contextlib.nullcontext)
    out = sft_loss(run, batch)

    # by hand: each conversation alone (no padding), -log p of the assistant tokens, averaged over them
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for x, y in examples:
            logp = torch.log_softmax(model(torch.tensor([x]))[0].double(), -1)
            for t, target in enumerate(y):
                if target != IGNORE_INDEX:
                    total -= logp[t, target]
                    count += 1
    assert out.metrics["assistant_tokens"] == count
    assert abs(out.loss.item() - (total / count).item()) < 1e-5
    assert out.loss.requires_grad


def test_loader_covers_every_example_each_epoch_and_resumes(tok):
    examples = [([1, 2, i], [IGNORE_INDEX, 3, i]) for i in range(5)]
    a = SFTLoader(examples, batch_size=2, pad_id=0, seed=3)
    seen = [a.next_batch().inputs[:, 2].tolist() for _ in range(5)]  # 10 draws = two epochs
    flat = sum(seen, [])
    assert sorted(flat[:5]) == sorted(flat[5:]) == list(range(5))
    b = SFTLoader(examples, batch_size=2, pad_id=0, seed=3)
    for _ in range(3):
        b.next_batch()
    c = SFTLoader(examples, batch_size=2, pad_id=0, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next_batch().inputs[:, 2].tolist() for _ in range(2)] == seen[3:]
    # two data-parallel ranks read disjoint halves of the same global batches
    r0, r1 = (SFTLoader(examples, batch_size=1, pad_id=0, seed=3, rank=r, world_size=2) for r in (0, 1))
    pairs = [[r0.next_batch().inputs[0, 2].item(), r1.next_batch().inputs[0, 2].item()] for _ in range(5)]
    assert sum(pairs, []) == flat
    with pytest.raises(ValueError, match="different data"):
        SFTLoader(examples[:4], batch_size=2, pad_id=0, seed=3).load_state_dict(b.state_dict())


def test_group_by_length_pads_less_and_still_covers_every_example():
    import random

    rng = random.Random(0)
    lengths = [rng.choice([8, 9, 10, 60, 200]) for _ in range(400)]
    examples = [([i] * n, [i] * n) for i, n in enumerate(lengths)]

    def epoch(loader):
        batches = [loader.next_batch() for _ in range(len(examples) // 8)]
        ids = [int(b.inputs[r, 0]) for b in batches for r in range(b.inputs.shape[0])]
        return ids, sum(b.inputs.numel() for b in batches)

    plain_ids, plain_cells = epoch(SFTLoader(examples, batch_size=8, pad_id=0, seed=1))
    grouped = SFTLoader(examples, batch_size=8, pad_id=0, seed=1, group_by_length=True)
    ids, cells = epoch(grouped)
    assert sorted(ids) == sorted(plain_ids) == list(range(400))  # one epoch: every example once
    assert cells < plain_cells / 2, (cells, plain_cells)  # padding compute at least halved
    assert ids != sorted(ids, key=lambda i: -lengths[i])  # the batches are shuffled, not longest-first
    again = SFTLoader(examples, batch_size=8, pad_id=0, seed=1, group_by_length=True)
    again.load_state_dict(grouped.state_dict())
    assert torch.equal(again.next_batch().inputs, grouped.next_batch().inputs)
    with pytest.raises(ValueError, match="group_by_length"):
        SFTLoader(examples, batch_size=8, pad_id=0, seed=1).load_state_dict(grouped.state_dict())


def test_tiny_sft_memorises_and_exports(base, tok, tmp_path):
    out = tmp_path / "sft"
    summary = sft(base, out, data=facts_jsonl(tmp_path / "d.jsonl"), max_steps=40, lr=3e-3, batch_size=4,
                  seq_len=64, overrides={"progress": False, "warmup_steps": 0, "checkpoint_every": 20})
    losses = [r["loss"] for r in read_metrics(out) if "event" not in r]
    assert len(losses) == 40 and losses[-1] < 0.05 < 5 < losses[0]
    assert summary["examples"] == 4 and summary["last_loss"] == losses[-1]
    for name in ("metrics.jsonl", "loss.png", "summary.json", "train_config.json", "tokenizer.model"):
        assert (out / name).is_file(), name
    assert (out / "final" / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    model = llama4.load(out / "final").eval()
    for q, a in FACTS:
        prompt = encode_dialog_prompt(tok, [{"role": "user", "content": q}])
        new = llama4.generate(model, prompt, max_new_tokens=len(tok.encode(a)) + 1)
        assert tok.decode(new) == a + "<|eot|>", (q, tok.decode(new))
    # `llama4 chat` / `serve` resolve the run folder to its final/
    from llama4.infer.model_dir import load_model_dir

    assert load_model_dir(out)[2] == "sft"


def cli(*args, env=None):
    cmd = [sys.executable, "-m", "llama4", "sft", "--no-progress", "--threads", "1", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.slow
def test_kill9_then_resume_is_bit_identical(base, tmp_path):
    data = facts_jsonl(tmp_path / "d.jsonl")
    args = ["--base", base, "--data", data, "--max-steps", 6, "--batch-size", 3, "--seq-len", 64, "--lr", 1e-3,
            "--checkpoint-every", 2]
    p = cli(*args, "--out", tmp_path / "a")
    assert p.returncode == 0, p.stderr
    ref = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / "a") if "event" not in r]
    assert [s for s, *_ in ref] == list(range(1, 7))
    b = tmp_path / "b"
    p = cli(*args, "--out", b, env={FAULT_ENV: "kill-after-step:5"})
    assert p.returncode == -9 and not (b / "final").exists()
    p = cli(*args, "--out", b)
    assert p.returncode == 2 and "--resume" in p.stderr  # a folder with checkpoints is not overwritten
    p = cli(*args, "--out", b, "--resume")
    assert p.returncode == 0 and "step 4/6" in p.stderr, p.stderr
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(b) if "event" not in r] == ref
    wa, wb = llama4.load(tmp_path / "a" / "final").state_dict(), llama4.load(b / "final").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # resuming on other data is refused
    other = write_jsonl(tmp_path / "o.jsonl", [json.loads(x) for x in data.read_text().splitlines()][:3])
    p = cli(*[other if x == data else x for x in args], "--out", b, "--resume")
    assert p.returncode == 2 and "different data" in p.stderr


BAD = [
    ("{\"messages\": [}\n", r"d\.jsonl:1: not valid JSON"),
    (json.dumps({"text": "hi"}), r"d\.jsonl:1: missing field 'messages'"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
     r"d\.jsonl:1: the conversation has no assistant turn"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
     r"d\.jsonl:1: field 'messages\[0\]\.role' is 'wizard'"),
    (json.dumps({"messages": [{"content": "hi"}]}), r"d\.jsonl:1: field 'messages\[0\]\.role' is missing"),
    (json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}),
     r"d\.jsonl:1: field 'messages\[0\]\.content' must be a string"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * 200}, {"role": "assistant", "content": "y"}]}),
     r"d\.jsonl:1: the conversation is \d+ tokens, longer than --seq-len 64.*--truncate"),
]


@pytest.mark.parametrize("line,message", BAD, ids=["json", "messages", "no-assistant", "role", "no-role",
                                                    "content", "too-long"])
def test_bad_data_is_a_clear_error_and_writes_nothing(base, tmp_path, capsys, line, message):
    import re

    from llama4.cli import main

    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    data = write_jsonl(tmp_path / "d.jsonl", [line, good])
    out = tmp_path / "out"
    rc = main(["sft", "--base", str(base), "--data", str(data), "--out", str(out), "--seq-len", "64", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("llama4 sft: error: ") and re.search(message, err), err
    assert not out.exists()


def test_bad_base_and_truncate(base, tmp_path, capsys):
    from llama4.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", [
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 100}]}),
        json.dumps({"messages": [{"role": "user", "content": "y" * 100}, {"role": "assistant", "content": "z"}]})])
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((base / "config.json").read_text())
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    for f in base.iterdir():
        if f.name != "tokenizer.model":
            (no_tok / f.name).write_bytes(f.read_bytes())
    for b, message in ((tmp_path / "missing", "base model directory not found"), (empty, "has no config.json"),
                       (no_weights, "no *.safetensors weights"), (no_tok, "has no tokenizer.model")):
        rc = main(["sft", "--base", str(b), "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("llama4 sft: error: ") and message in err, err
        assert not (tmp_path / "o").exists()
    # --truncate cuts a long conversation; one whose assistant turn is cut away entirely is still an error
    rc = main(["sft", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "o"), "--seq-len", "40",
               "--truncate", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "d.jsonl:2: no assistant token within the first 40 tokens" in err, err
    assert not (tmp_path / "o").exists()


def test_task_data_uses_the_reference_answer(base, tok, tmp_path, capsys):
    from llama4.cli import main
    from llama4.posttrain.chat_data import task_conversations
    from llama4.tasks import get_task

    convs = task_conversations(["arithmetic"], 3, seed=1)
    refs = get_task("arithmetic").examples("train", 3, seed=1)
    assert [c.messages for c in convs] == [(*r.messages, {"role": "assistant", "content": r.answer}) for r in refs]
    ids, mask = tokenize_conversation(tok, convs[0])
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == refs[0].answer + "<|eot|>"
    rc = main(["sft", "--base", str(base), "--tasks", "arithmetic,no_such_task", "--out", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown task 'no_such_task'" in err and not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("layout", [("--dp", "2"), ("--dp", "2", "--ep", "2")], ids=["fsdp2", "fsdp2xep"])
def test_two_processes_reproduce_one(base, tmp_path, layout):
    """`torchrun --nproc_per_node 2 -m llama4 sft ... --dp 2 [--ep 2]` (FSDP2, expert parallel; gloo
    on CPU) follows the single-process run: the loss is the mean over the *global* batch's assistant tokens."""
    import socket

    data = facts_jsonl(tmp_path / "d.jsonl")
    common = ["--base", base, "--data", data, "--max-steps", 5, "--seq-len", 64, "--lr", 1e-3, "--set", "dtype=float32"]
    p = cli(*common, "--batch-size", 4, "--out", tmp_path / "one")
    assert p.returncode == 0, p.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "llama4", "sft", "--no-progress", "--threads", "1",
           *map(str, common), "--batch-size", "2", *layout, "--out", str(tmp_path / "two")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = ([(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / d) if "event" not in r]
                for d in ("one", "two"))
    assert [s for s, *_ in two] == [s for s, *_ in one] == list(range(1, 6))
    for (_, la, ga), (_, lb, gb) in zip(one, two):
        assert abs(la - lb) < 1e-4 and abs(ga - gb) < 1e-4 * max(1.0, ga)
    wa, wb = llama4.load(tmp_path / "one" / "final").state_dict(), llama4.load(tmp_path / "two" / "final").state_dict()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_stage_run_starts_from_the_base_and_gives_a_frozen_reference(base, tok, tmp_path):
    from llama4.posttrain.stage import build_stage_run, open_base, reference_model, stage_config

    b = open_base(base)
    examples = build_examples(tok, load_messages_jsonl(facts_jsonl(tmp_path / "d.jsonl")), seq_len=64)
    cfg = stage_config(b, "probe", max_steps=3, batch_size=2, seq_len=64, progress=False)
    run = build_stage_run(b, cfg, tmp_path / "run", SFTLoader(examples, 2, pad_id_of(tok)))
    want = llama4.load(base, dtype=torch.float32).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in run.model.state_dict().items())
    assert (tmp_path / "run" / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    for ref in (reference_model(run), reference_model(run, b)):
        assert not ref.training and not any(p.requires_grad for p in ref.parameters())
        assert all(torch.equal(v, want[k]) for k, v in ref.state_dict().items())
