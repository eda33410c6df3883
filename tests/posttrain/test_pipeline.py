"""``llama4 posttrain``: the whole pipeline (pruned SFT -> RL -> DPO, measured after every stage)
on a tiny base with the ``debug`` recipe, its outputs, its resume, and its refusals of bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from serving import write_tiny_model_dir

from llama4.posttrain import pipeline
from llama4.posttrain.chat_data import build_examples, load_messages_jsonl, pad_id_of, task_conversations
from llama4.posttrain.dpo import load_pairs_jsonl
from llama4.posttrain.recipes import get_recipe
from llama4.tasks import get_task

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPE = get_recipe("debug")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def human_pairs(tmp_path_factory):
    p = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    row = {"prompt": [{"role": "user", "content": "Say hi."}], "chosen": [{"role": "assistant", "content": "Hi!"}],
           "rejected": [{"role": "assistant", "content": "No."}]}
    p.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    return p


@pytest.fixture(scope="module")
def done(base, human_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "out"
    summary = pipeline.posttrain("debug", base, out, pairs=human_pairs, threads=1, progress=False)
    return out, summary


def test_summary_has_every_stage_measured(done):
    out, summary = done
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["stages"] == summary["stages"]
    assert list(on_disk["stages"]) == ["base", "sft", "rl", "dpo"]
    task_names = [t for t in RECIPE.tasks if not t.startswith("safety")]
    for stage, rec in on_disk["stages"].items():
        assert list(rec["tasks"]) == task_names, stage
        for v in [*rec["tasks"].values(), rec["refusal_harmful"], rec["refusal_harmless"]]:
            assert 0.0 <= v <= 1.0, (stage, rec)
        assert math.isfinite(rec["val_loss"]) and rec["val_loss"] > 0
        assert "skipped" not in rec, stage  # the debug recipe names its RL task, and DPO has the given pairs
    # the stages trained: the SFT'd model's validation loss differs from the random base's
    assert on_disk["stages"]["sft"]["val_loss"] != on_disk["stages"]["base"]["val_loss"]
    assert (out / "stages.png").stat().st_size > 10_000
    for stage in ("sft", "rl", "dpo"):
        assert (out / stage / "final" / "config.json").is_file()
        assert (out / stage / "metrics.jsonl").is_file()


def test_final_is_the_last_stage_and_chat_uses_it(done):
    from llama4.infer.model_dir import load_model_dir, resolve_model_dir
    from llama4.eval.suites import EngineResponder

    out, _ = done
    assert resolve_model_dir(out) == out / "final"
    for f in ("config.json", "tokenizer.model"):
        assert (out / "final" / f).read_bytes() == (out / "dpo" / "final" / f).read_bytes()
    model, tok, _ = load_model_dir(out)
    ref, _, _ = load_model_dir(out / "dpo")
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k
    reply = EngineResponder(model, tok, max_tokens=4)([[{"role": "user", "content": "hi"}]])
    assert isinstance(reply[0], str)


def test_sft_data_drops_the_easiest_half_by_the_bases_loss(done, base):
    import llama4

    out, _ = done
    report = json.loads((out / "sft_pruning.json").read_text())
    assert report["fraction_dropped"] > 0.5
    kept = load_messages_jsonl(out / "sft_data.jsonl")
    # recompute every candidate's loss under the base: per task, the kept ones are exactly the hardest
    from llama4.tokenizer import Tokenizer

    tok = Tokenizer(Path(base) / "tokenizer.model")
    model = llama4.load(base, dtype=torch.float32)
    kept_msgs = {json.dumps(c.messages) for c in kept}
    for name in RECIPE.tasks:
        convs = task_conversations([name], RECIPE.sft_candidates, seed=pipeline.SEED_SFT)
        losses = pipeline.assistant_losses(model, build_examples(tok, convs, RECIPE.sft["seq_len"]), pad_id_of(tok))
        is_kept = [json.dumps(c.messages) in kept_msgs for c in convs]
        assert sum(is_kept) == report["tasks"][name]["kept"] < len(convs) / 2, name
        assert min(l for l, k in zip(losses, is_kept) if k) >= max(l for l, k in zip(losses, is_kept) if not k), name


def test_assistant_losses_is_the_mean_cross_entropy_of_each_answer(base):
    import llama4
    from llama4.posttrain.chat_data import IGNORE_INDEX
    from llama4.tokenizer import Tokenizer

    tok = Tokenizer(Path(base) / "tokenizer.model")
    model = llama4.load(base, dtype=torch.float32)
    exs = build_examples(tok, task_conversations(["arithmetic"], 3), 512)
    got = pipeline.assistant_losses(model, exs, pad_id_of(tok), batch_size=2)  # one padded batch, one alone
    for (x, y), g in zip(exs, got):
        logits = model(torch.tensor([x]))[0]
        y = torch.tensor(y)
        want = torch.nn.functional.cross_entropy(logits[y != IGNORE_INDEX], y[y != IGNORE_INDEX])
        assert abs(g - want.item()) < 1e-4


def test_dpo_pairs_are_the_policys_wrong_answers_then_the_given_ones(done, human_pairs):
    out, _ = done
    pairs = load_pairs_jsonl(out / "dpo_pairs.jsonl")  # what `llama4 dpo --pairs` reads
    counts = json.loads((out / "dpo_pairs.json").read_text())
    assert counts["given"] == 2 and len(pairs) == sum(counts.values())
    made = pairs[:len(pairs) - 2]
    assert made, "the random policy answers everything wrong: there must be pairs"
    by_prompt = {}
    for name in RECIPE.tasks:
        for ex in get_task(name).examples("train", RECIPE.dpo_prompts, seed=pipeline.SEED_DPO):
            by_prompt[json.dumps(list(ex.messages))] = (get_task(name), ex)
    for p in made:
        task, ex = by_prompt[json.dumps(list(p.prompt))]
        assert p.chosen["content"] == ex.answer
        assert task.score(ex, p.rejected["content"]) < pipeline.WRONG_BELOW
    assert [p.chosen["content"] for p in pairs[-2:]] == ["Hi!", "Hi!"]


def test_resume_skips_what_is_done_and_a_used_folder_is_refused(done, base):
    out, summary = done
    before = {p: p.stat().st_mtime_ns for p in (out / "sft" / "final").iterdir()}
    again = pipeline.posttrain("debug", base, out, resume=True, threads=1, progress=False)
    assert again["stages"] == summary["stages"]
    assert {p: p.stat().st_mtime_ns for p in (out / "sft" / "final").iterdir()} == before
    with pytest.raises(FileExistsError, match="--resume"):
        pipeline.posttrain("debug", base, out, threads=1, progress=False)


@pytest.mark.parametrize("what", ["recipe", "pairs", "base"])
def test_bad_input_is_refused_before_anything_is_written(base, tmp_path, what):
    out = tmp_path / "out"
    bad_pairs = tmp_path / "bad.jsonl"
    bad_pairs.write_text('{"prompt": [{"role": "user", "content": "x"}], "chosen": []}\n')
    args = {"recipe": ("nope", base, None, "unknown posttrain recipe 'nope'"),
            "pairs": ("debug", base, bad_pairs, "bad.jsonl:1"),
            "base": ("debug", tmp_path / "missing", None, "not found")}[what]
    with pytest.raises((ValueError, FileNotFoundError), match=args[3]):
        pipeline.posttrain(args[0], args[1], out, pairs=args[2], threads=1, progress=False)
    assert not out.exists()


def test_cli_help_lists_the_recipes():
    from llama4.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["posttrain", "--recipe", "nope", "--base", "x", "--out", "y"])
    text = build_parser()._subparsers._group_actions[0].choices["posttrain"].format_help()
    assert "debug" in text and "default" in text
