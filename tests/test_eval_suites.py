"""``llama4 eval --suite``: the suite runner (scripted responders and the real engine), the
results.json schema, bits per byte against a hand computation from the model's own logits, and
the errors bad input gets.

The model directory is a tiny random checkpoint saved with ``llama4.save`` plus its own
byte-level ``tokenizer.model`` (256 byte tokens + Llama 4's 2,048 special tokens = 2,304 ids).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

import llama4
from llama4.cli import main
from llama4.eval.ppl import corpus_bits_per_byte
from llama4.eval.suites import EngineResponder, results_document, run_tasks, write_results
from llama4.infer import generate
from llama4.infer.model_dir import load_model_dir
from llama4.model import ModelArgs, Transformer
from llama4.tokenizer.chat_format import encode_dialog_prompt
from llama4.tokenizer.files import write_tiktoken_bpe

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_args(**kw) -> ModelArgs:
    base = dict(vocab_size=2304, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, n_experts=4, top_k=1,
                expert_dim=32, dense_dim=64, interleave_moe_layer_step=2, nope_layer_interval=2,
                attention_chunk_size=16, floor_scale=8.0, max_seq_len=4096)
    return ModelArgs(**{**base, **kw})


def save_tiny(d, tokenizer: bool = True, **kw):
    torch.manual_seed(0)
    m = Transformer(tiny_args(**kw))
    m.init_weights(std=0.3)
    llama4.save(m, d)
    if tokenizer:
        write_tiktoken_bpe(d / "tokenizer.model", {bytes([b]): b for b in range(256)})
    return d


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-eval")


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model_dir(model_dir)


# --------------------------------------------------------------------------------------------
# a task that follows the llama4.tasks contract (TASKS_API.md), with a real verifier

@dataclass(frozen=True)
class Ex:
    task: str
    split: str
    lang: str
    messages: tuple
    answer: str
    meta: dict = field(default_factory=dict, compare=False, hash=False)


class CopyWord:
    """Reply with the given word; exact match after stripping."""

    name, metric, description = "copy_word", "exact_match", "repeat one word"
    langs = ("eng", "deu", "fra")

    def examples(self, split, n, seed=0, difficulty=1):
        import random

        rng = random.Random(f"{split}/{seed}/{difficulty}")
        out = []
        for i in range(n):
            word = "".join(rng.choice("abcdefgh") for _ in range(3 + difficulty))
            lang = self.langs[i % len(self.langs)]
            msgs = ({"role": "system", "content": "Answer with the word only."},
                    {"role": "user", "content": f"[{split}:{i}] Repeat: {word}"})
            out.append(Ex(self.name, split, lang, msgs, word))
        return out

    def score(self, example, response):
        return float(response.strip() == example.answer)


class Arith(CopyWord):
    name, metric = "add", "exact_match"
    langs = ("",)  # no language

    def examples(self, split, n, seed=0, difficulty=1):
        out = []
        for i in range(n):
            a, b = 10 * i + seed, 7 + i
            msgs = ({"role": "user", "content": f"[{split}] {a} + {b} = ?"},)
            out.append(Ex(self.name, split, "", msgs, str(a + b)))
        return out


def oracle(examples_by_prompt):
    """A scripted model that always gives the reference answer."""
    def respond(dialogs):
        return [examples_by_prompt[d[-1]["content"]] for d in dialogs]
    return respond


def test_runner_scores_a_perfect_and_a_partial_model(tmp_path):
    tasks = [CopyWord(), Arith()]
    ref = {e.messages[-1]["content"]: e.answer for t in tasks for e in t.examples("test", 7, seed=3)}
    results, records = run_tasks(tasks, oracle(ref), split="test", n=7, seed=3, batch_size=3, progress=False)
    assert set(results) == {"copy_word", "add"}
    for r in results.values():
        assert r["score"] == 1.0 and r["n"] == 7
    assert results["copy_word"]["by_lang"] == {"deu": 1.0, "eng": 1.0, "fra": 1.0}
    assert results["add"]["by_lang"] == {}  # examples without a language
    assert len(records) == 14 and all(r["score"] == 1.0 for r in records)

    # right only in German: the score and the per-language means follow
    de = {e.messages[-1]["content"] for e in CopyWord().examples("test", 7, seed=3) if e.lang == "deu"}
    got, _ = run_tasks([CopyWord()], lambda ds: [ref[d[-1]["content"]] if d[-1]["content"] in de else "no"
                                                 for d in ds], n=7, seed=3, batch_size=4, progress=False)
    r = got["copy_word"]
    assert r["by_lang"] == {"deu": 1.0, "eng": 0.0, "fra": 0.0}
    assert r["score"] == pytest.approx(len(de) / 7)

    # only some languages
    got, _ = run_tasks([CopyWord()], oracle(ref), n=7, seed=3, langs=["fra"], progress=False)
    assert got["copy_word"]["n"] == sum(e.lang == "fra" for e in CopyWord().examples("test", 7, seed=3))

    doc = results_document("m", "tasks", results, config={"limit": 7})
    write_results(tmp_path, doc, records)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == doc and list(on_disk)[:3] == ["model", "suite", "tasks"]
    assert set(on_disk["tasks"]["add"]) == {"metric", "score", "n", "by_lang"}
    md = (tmp_path / "results.md").read_text()
    assert "| copy_word | exact_match | 1.0000 | 7 |" in md
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 14
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temp file


def test_engine_responder_batches_like_single_prompts(loaded):
    model, tok, _ = loaded
    respond = EngineResponder(model, tok, max_tokens=6, seed=0)
    exs = CopyWord().examples("validation", 5)
    dialogs = [list(e.messages) for e in exs]
    batched = respond(dialogs)
    for d, reply in zip(dialogs, batched):  # greedy: a row of a batch gets what it gets alone
        ids = generate(model, encode_dialog_prompt(tok, d), 6, stop=tok.stop_tokens)
        stop = next((k for k, t in enumerate(ids) if t in tok.stop_tokens), len(ids))
        assert reply == tok.decode(ids[:stop]).strip()

    results, records = run_tasks([CopyWord(), Arith()], respond, split="validation", n=5, batch_size=2,
                                 progress=False)
    for r in results.values():
        assert r["n"] == 5 and 0.0 <= r["score"] <= 1.0
    assert [r["response"] for r in records[:5]] == [
        respond([list(e.messages)])[0] for e in CopyWord().examples("validation", 5)]


def test_eval_tasks_suite_end_to_end(model_dir, tmp_path, capsys):
    import llama4.tasks as T  # the real task generators (a missing package fails here, loudly)

    out = tmp_path / "tasks"
    assert main(["eval", "--model", str(model_dir), "--suite", "tasks", "--limit", "2", "--max-tokens", "4",
                 "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["model"] == "tiny-eval" and doc["suite"] == "tasks"
    assert set(doc["tasks"]) == set(T.SUITES["tasks"])
    for name, r in doc["tasks"].items():
        assert r["metric"] == T.TASKS[name].metric
        assert r["n"] == 2 and 0.0 <= r["score"] <= 1.0
        assert all(0.0 <= v <= 1.0 for v in r["by_lang"].values())
    assert "| task | metric | score | n |" in capsys.readouterr().out


def test_lm_eval_flag_hands_over_to_the_harness_and_writes_its_results(model_dir, tmp_path, monkeypatch):
    import llama4.eval.harness as harness

    calls = []
    entry = {"metric": "acc", "score": 0.5, "n": 4, "by_lang": {"eng": 0.5}}

    def fake(model_dir, tasks, include_path, limit, batch_size, out_dir, dtype, device):
        calls.append((model_dir, tasks, include_path, limit, batch_size, out_dir, dtype, device))
        return {"model": "tiny-eval", "suite": "lm-eval:a,b", "tasks": {"a": entry, "b": entry}, "lm_eval": {"v": 1}}

    monkeypatch.setattr(harness, "run_lm_eval", fake)
    out = tmp_path / "lm"
    assert main(["eval", "--model", str(model_dir), "--lm-eval-tasks", "a, b", "--include-path", str(tmp_path),
                 "--limit", "4", "--batch-size", "2", "--out", str(out), "--dtype", "float32"]) == 0
    assert calls == [(str(model_dir), ["a", "b"], str(tmp_path), 4, 2, str(out), "float32", None)]
    doc = json.loads((out / "results.json").read_text())
    assert doc["model"] == "tiny-eval" and doc["suite"] == "lm-eval:a,b" and doc["lm_eval"] == {"v": 1}
    assert doc["tasks"] == {"a": entry, "b": entry} and (out / "results.md").is_file()


# --------------------------------------------------------------------------------------------
# bits per byte

def test_bits_per_byte_is_the_models_own_nll_per_byte(loaded):
    from llama4.data.corpus import iter_corpus

    model, tok, _ = loaded
    text = next(iter_corpus("val", langs=("eng",))).text[:1500]
    doc = next(iter_corpus("val", langs=("fra",)))
    ids = torch.tensor([[tok.bos_id] + tok.encode(doc.text)])
    with torch.no_grad():
        nats = F.cross_entropy(model(ids)[0, :-1].float(), ids[0, 1:], reduction="sum").item()
    want = nats / math.log(2) / len(doc.text.encode("utf-8"))
    r = corpus_bits_per_byte(model, tok, ["fra"], max_docs=1, window=ids.shape[1], piece=300, progress=False)
    assert r["metric"] == "bits_per_byte" and r["n"] == 1
    assert r["by_lang"]["fra"] == pytest.approx(want, rel=1e-5) and r["score"] == pytest.approx(want, rel=1e-5)

    # windows of W tokens overlapping by one: every token after BOS scored once, context = its window
    from llama4.eval.ppl import text_nats

    W = 700
    ids = [tok.bos_id] + tok.encode(text)
    nats, n = 0.0, 0
    for s in range(0, len(ids) - 1, W - 1):
        w = torch.tensor([ids[s:s + W]])
        with torch.no_grad():
            nats += F.cross_entropy(model(w)[0, :-1].float(), w[0, 1:], reduction="sum").item()
        n += w.shape[1] - 1
    got, got_n = text_nats(model, tok, text, window=W, piece=256)
    assert got_n == n == len(ids) - 1
    assert got == pytest.approx(nats, rel=1e-5)


def test_eval_ppl_suite_cli(model_dir, tmp_path):
    out = tmp_path / "ppl"
    assert main(["eval", "--model", str(model_dir), "--suite", "ppl", "--limit", "1", "--langs", "eng,jpn",
                 "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "results.json").read_text())
    r = doc["tasks"]["ppl"]
    assert doc["suite"] == "ppl" and r["metric"] == "bits_per_byte" and r["n"] == 2
    assert set(r["by_lang"]) == {"eng", "jpn"}
    d = doc["details"]
    total = sum(v["nats"] for v in d.values()) / math.log(2) / sum(v["bytes"] for v in d.values())
    assert r["score"] == pytest.approx(total)
    assert (out / "results.md").is_file()


# --------------------------------------------------------------------------------------------
# bad input: a clear error naming what is wrong, exit status 2, nothing written

def run_err(capsys, *argv) -> str:
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama4 eval: error: "), err
    return err


def test_bad_input_errors(model_dir, tmp_path, capsys):
    m = ["--model", str(model_dir), "--out", str(tmp_path / "o"), "--no-progress"]
    assert "unknown language 'xx1'" in run_err(capsys, *m, "--suite", "ppl", "--langs", "eng,xx1")
    assert "unknown split 'dev'" in run_err(capsys, *m, "--suite", "ppl", "--split", "dev")
    assert "--limit must be >= 1" in run_err(capsys, *m, "--suite", "ppl", "--limit", "0")
    assert "--model DIR is required" in run_err(capsys, "--suite", "ppl")
    assert "say what to run" in run_err(capsys, *m)
    assert "model directory not found" in run_err(capsys, "--model", str(tmp_path / "nope"), "--suite", "ppl")
    assert "does not exist" in run_err(capsys, *m, "--lm-eval-tasks", "x", "--include-path", str(tmp_path / "no"))

    no_weights = save_tiny(tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    assert re.search(r"no model\.safetensors", run_err(capsys, "--model", str(no_weights), "--suite", "ppl"))
    no_tok = save_tiny(tmp_path / "no-tokenizer", tokenizer=False)  # falls back to the official 202,048 ids
    assert "put the model's own tokenizer.model" in run_err(capsys, "--model", str(no_tok), "--suite", "ppl")
    assert not (tmp_path / "o").exists()


def test_unknown_suite_or_task_names_the_known_ones(model_dir, tmp_path, capsys):
    import llama4.tasks as T

    err = run_err(capsys, "--model", str(model_dir), "--suite", "nosuch", "--out", str(tmp_path / "o"))
    assert "unknown suite or task 'nosuch'" in err and "safety" in err and "ppl" in err
    assert next(iter(T.TASKS)) in err
    assert not (tmp_path / "o").exists()
