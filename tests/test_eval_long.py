"""``llama4 eval needle`` and ``llama4 eval longppl``: prompt construction and scoring, the files
the needle tester's users expect, the chunked-prefill path against the no-cache reference, the Δ(k)
math against plain forwards, the KV-memory estimate, and the errors for bad lengths/depths.

Tiny random checkpoint + byte-level ``tokenizer.model``, as in test_eval_suites.py.
"""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
import torch.nn.functional as F

from llama4.cli import main
from llama4.eval.common import kv_cache_bytes, parse_depths, parse_ints, parse_lengths, reply_text, token_nlls
from llama4.eval.longppl import corpus_sequences, long_ppl
from llama4.eval.needle import (FIELDS_OF_THE_TESTER, SENTENCES, Needle, build_prompt, filler_ids, prompt_frame,
                                run_needle, score_response)
from llama4.infer.generation import full_forward_greedy
from llama4.infer.kv_cache import KVCache
from llama4.infer.model_dir import load_model_dir
from test_eval_suites import save_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny-long")


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model_dir(model_dir)


def run_err(capsys, *argv) -> str:
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert "llama4 eval: error: " in err, err
    return err.split("llama4 eval: error: ", 1)[1]


# --------------------------------------------------------------------------------------------
# flags

def test_parse_lengths_depths_and_lists():
    assert parse_lengths("256,1k,4k,16K,1.5k,1m") == [256, 1024, 4096, 16384, 1536, 1 << 20]
    assert parse_depths("0,25,50.5,100") == [0.0, 25.0, 50.5, 100.0]
    assert parse_ints("1,2,64", "--multiples") == [1, 2, 64]
    for bad, what in (("4q", "'4q' is not a length"), ("1k,,2k", "comma-separated"), ("0", "whole positive"),
                      ("1.3", "whole positive"), ("", "comma-separated"), ("-4", "not a length")):
        with pytest.raises(ValueError, match=re.escape(what)):
            parse_lengths(bad)
    with pytest.raises(ValueError, match="'abc' is not a number"):
        parse_depths("50,abc")
    with pytest.raises(ValueError, match=r"depth 150 is outside \[0, 100\]"):
        parse_depths("0,150")
    with pytest.raises(ValueError, match="--multiples: 'x' is not an integer"):
        parse_ints("1,x", "--multiples")


# --------------------------------------------------------------------------------------------
# needle: prompt, scorer, files

@pytest.mark.parametrize("fmt", ["chat", "completion"])
def test_needle_prompt_has_the_exact_length_and_the_needle_at_its_depth(loaded, fmt):
    _, tok, _ = loaded
    needle = Needle.make("passkey", random.Random(1))
    assert 5 <= len(needle.answer) <= 7 and needle.answer in needle.sentence
    for kind in ("random", "corpus"):
        pool = filler_ids(tok, kind, 3000, seed=0)
        head, tail = prompt_frame(tok, needle, fmt)
        where = []
        for depth in (0, 25, 50, 75, 100):
            ids = build_prompt(tok, pool, needle, 2000, depth, fmt)
            assert len(ids) == 2000 and ids[:len(head)] == head and ids[-len(tail):] == tail
            hay = tok.decode(ids[len(head):len(ids) - len(tail)])
            assert hay.count(needle.sentence) == 1
            at = hay.index(needle.sentence)
            where.append(at / len(hay))
            before = hay[:at].rstrip(" ")
            assert before == "" or before.endswith((".", "\n"))  # spliced at a sentence boundary
            if depth == 100:  # the last sentence boundary: no other one follows the needle
                assert not re.search(r"[.\n]", hay[at + len(needle.sentence):-1])
        assert where[0] < 0.01 and where[-1] > 0.9 and where == sorted(where)
        assert all(abs(w - d) < 0.1 for w, d in zip(where[1:4], (0.25, 0.5, 0.75)))
    text = tok.decode(build_prompt(tok, filler_ids(tok, "random", 3000), needle, 1000, 50, fmt))
    assert needle.question in text
    if fmt == "chat":
        assert text.startswith("<|begin_of_text|><|header_start|>system<|header_end|>")
        assert text.endswith("<|eot|><|header_start|>assistant<|header_end|>\n\n")
    else:
        assert text.endswith(needle.primer)
    sentences = set(SENTENCES)
    assert set(s.strip() + "." for s in tok.decode(filler_ids(tok, "random", 500)).split(".")[:-1]) <= sentences


def test_needle_scorer_is_exact_match_on_the_digits():
    n = Needle("The special magic number is 4729531.", "?", "4729531", "")
    assert score_response("The special magic number is 4729531.", n) == 1.0
    assert score_response("4729531", n) == 1.0
    assert score_response("It is 14729531.", n) == 0.0  # part of a longer number
    assert score_response("472953", n) == 0.0
    assert score_response("", n) == 0.0
    kv = Needle.make("kv", random.Random(0))
    assert kv.question in f"{kv.question}" and score_response(f"{kv.answer}", kv) == 1.0


def reader(tok):
    """A scripted model that reads the needle out of its prompt (what a perfect model replies)."""
    def respond(prompts, max_tokens):
        found = [re.search(r"is (\d{5,7})\.", tok.decode(p)).group(1) for p in prompts]
        return [f"It is {digits}." for digits in found]
    return respond


def test_needle_sweep_writes_cells_summary_and_heatmap(loaded, tmp_path):
    model, tok, _ = loaded
    lengths, depths = [600, 1024], [0.0, 50.0, 100.0]
    s = run_needle(model, tok, "tiny", lengths, depths, tmp_path, fillers=("random", "corpus"), kind="kv",
                   batch_size=2, respond=reader(tok), progress=False)
    assert s["mean"] == 1.0 and s["n_cells"] == 12
    cells = sorted((tmp_path / "cells").rglob("*.json"))
    assert len(cells) == 12
    c = json.loads((tmp_path / "cells" / "corpus" / "len_1024_depth_50.json").read_text())
    assert set(FIELDS_OF_THE_TESTER) <= set(c)
    assert c["context_length"] == 1024 and c["depth_percent"] == 50.0 and c["score"] == 1.0
    assert c["expected_answer"] in c["needle"] and c["expected_answer"] in c["model_response"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["fillers"]["random"]["grid"] == [[1.0, 1.0]] * 3
    assert summary["fillers"]["corpus"]["by_length"] == {"600": 1.0, "1024": 1.0}
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    s = run_needle(model, tok, "tiny", [600], [50.0], tmp_path / "wrong", respond=lambda p, m: ["12345"] * len(p),
                   progress=False)
    assert s["mean"] == 0.0


def test_needle_cli_runs_the_engine_through_chunked_prefill(model_dir, loaded, tmp_path, capsys):
    """Real generation: a cell's reply is what the no-cache reference decodes from the same prompt."""
    model, tok, _ = loaded
    out = tmp_path / "needle"
    assert main(["eval", "needle", "--model", str(model_dir), "--lengths", "512,1k", "--depths", "0,100",
                 "--filler", "both", "--prefill-chunk", "96", "--max-tokens", "6", "--out", str(out),
                 "--no-progress"]) == 0
    assert "KV cache ~" in capsys.readouterr().err  # the memory it will take, said before allocating
    cells = [json.loads(p.read_text()) for p in (out / "cells").rglob("*.json")]
    assert len(cells) == 8 and all(c["score"] in (0.0, 1.0) for c in cells)
    c = next(c for c in cells if c["filler"] == "corpus" and c["context_length"] == 1024 and c["depth_percent"] == 100)
    needle = Needle(c["needle"], c["question"], c["expected_answer"], "")
    pool = filler_ids(tok, "corpus", 1024, seed=0 + 1024)
    prompt = build_prompt(tok, pool, needle, 1024, 100.0, "chat")
    assert reply_text(tok, full_forward_greedy(model, prompt, 6)) == c["model_response"]
    assert (out / "heatmap.png").is_file() and (out / "summary.json").is_file()


def test_kv_estimate_is_what_the_cache_allocates(loaded):
    model, _, _ = loaded
    for rows, T in ((1, 5), (3, 16), (2, 1000)):
        assert kv_cache_bytes(model, rows, T) == KVCache.for_model(model, rows, T).nbytes()


def test_token_nlls_in_pieces_equal_the_full_forward(loaded):
    model, _, _ = loaded
    ids = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    for piece in (24, 16, 99, 1000):  # pieces across chunk (16) boundaries, on them, one piece
        assert torch.allclose(token_nlls(model, ids, piece=piece), ref.view(2, 99), atol=1e-4)


# --------------------------------------------------------------------------------------------
# longppl

def test_longppl_delta_matches_plain_forwards(loaded):
    model, tok, _ = loaded
    L, ks = 32, [1, 2, 4]
    res = long_ppl(model, tok, "tiny", L, ks, n_docs=2, langs=["eng", "deu"], piece=40, progress=False)
    seqs, langs = corpus_sequences(tok, 4 * L, 2, ["eng", "deu"])
    assert res["langs"] == langs == ["eng", "deu"] and res["n_docs"] == 2

    def nll(x):
        x = torch.tensor([x])
        with torch.no_grad():
            return F.cross_entropy(model(x)[0, :-1].float(), x[0, 1:], reduction="none")

    for k in ks:
        full = [nll(s[:k * L])[-(L - 1):].mean().item() for s in seqs]  # the last L-1 targets of k*L
        own = [nll(s[(k - 1) * L:k * L]).mean().item() for s in seqs]  # the same tokens, own window only
        assert res["loss_full"][str(k)] == pytest.approx(sum(full) / 2, abs=1e-4)
        assert res["loss_own"][str(k)] == pytest.approx(sum(own) / 2, abs=1e-4)
        assert res["delta"][str(k)] == pytest.approx((sum(full) - sum(own)) / 2, abs=1e-4)
    assert abs(res["delta"]["1"]) < 1e-5
    whole = torch.stack([nll(s) for s in seqs]).mean(0)  # (4L - 1,) per-position curve
    assert res["curve"]["loss"][0] == pytest.approx(whole[0].item(), abs=1e-4)
    assert res["curve"]["position"][-1] <= 4 * L and len(res["curve"]["loss"]) == len(res["curve"]["position"])


def test_longppl_cli(model_dir, tmp_path):
    out = tmp_path / "lp"
    assert main(["eval", "longppl", "--model", str(model_dir), "--train-len", "16", "--multiples", "1,2,4",
                 "--n-docs", "2", "--langs", "fra", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "longppl.json").read_text())
    assert res["multiples"] == [1, 2, 4] and set(res["delta"]) == {"1", "2", "4"} and res["n_docs"] == 2
    assert (out / "longppl.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------
# bad input

def test_long_context_bad_input(model_dir, tmp_path, capsys, monkeypatch):
    m = ["--model", str(model_dir), "--out", str(tmp_path / "o"), "--no-progress"]
    assert "'4q' is not a length" in run_err(capsys, "needle", *m, "--lengths", "1k,4q")
    assert "'abc' is not a number" in run_err(capsys, "needle", *m, "--lengths", "1k", "--depths", "0,abc")
    assert "outside [0, 100]" in run_err(capsys, "needle", *m, "--lengths", "1k", "--depths", "150")
    err = run_err(capsys, "needle", *m, "--lengths", "1k,8k")
    assert "8,192" in err and "context limit of 4,096" in err and "--max-context" in err
    assert "too short for the prompt" in run_err(capsys, "needle", *m, "--lengths", "100")
    assert "unknown language 'xx1'" in run_err(capsys, "needle", *m, "--lengths", "1k", "--filler-lang", "xx1")
    assert "model directory not found" in run_err(capsys, "needle", "--model", str(tmp_path / "x"), "--lengths", "1k")
    assert "--multiples: 'x' is not an integer" in run_err(capsys, "longppl", *m, "--train-len", "8",
                                                           "--multiples", "1,x")
    assert "context limit of 4,096" in run_err(capsys, "longppl", *m, "--train-len", "256", "--multiples", "1,32")
    err = run_err(capsys, "longppl", *m, "--train-len", "2048", "--multiples", "64", "--langs", "kor",
                  "--max-context", "200000")
    assert "fewer than one sequence of 131,072" in err

    import llama4.eval.common as common

    monkeypatch.setattr(common, "available_memory", lambda device: 1 << 20)  # 1 MiB free
    err = run_err(capsys, "needle", *m, "--lengths", "1k")
    assert "more than the 1.0 MiB free" in err and "KV cache" in err
    assert not (tmp_path / "o").exists()
