"""Votes leave as data (llama4/arena/export.py: FastChat battles, TRL preference pairs that
``llama4 dpo --pairs`` trains on unchanged), ``llama4 arena ratings --json``, and the automatic
judge (llama4/arena/auto.py: held-out task prompts, decided by the task verifiers)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from arena_common import write_model
from llama4.arena import db
from llama4.arena.auto import decide, draw_examples, run_auto, schedule
from llama4.cli import main
from llama4.posttrain.dpo import load_pairs_jsonl, tokenize_pair
from llama4.tasks import get_task
from llama4.tokenizer import Tokenizer

U = lambda t: {"role": "user", "content": t}  # noqa: E731
A = lambda t: {"role": "assistant", "content": t}  # noqa: E731


def battles() -> list[db.Battle]:
    return [
        db.Battle("w1", "x", "y", "model_a", [U("2+2?"), A("4")], [U("2+2?"), A("five")]),
        db.Battle("w2", "x", "y", "model_b", [U("Capital of France?"), A("Lyon")], [U("Capital of France?"), A("Paris.")]),
        db.Battle("t1", "x", "z", "tie", [U("hi"), A("hello")], [U("hi"), A("hey")]),
        db.Battle("t2", "y", "z", "tie (bothbad)", [U("hi"), A("??")], [U("hi"), A("!!")]),
        db.Battle("m1", "y", "z", "model_a", [U("a"), A("b"), U("c"), A("d")], [U("a"), A("e"), U("c"), A("f")], turn=2),
        db.Battle("i1", "x", "z", "model_b", [U("same?"), A("yes")], [U("same?"), A("yes")]),
        db.Battle("w3", "z", "x", "model_a", [{"role": "system", "content": "Be brief."}, U("Sky colour?"), A("Blue.")],
                  [{"role": "system", "content": "Be brief."}, U("Sky colour?"), A("It is green")], source="auto",
                  judge="verifier:test"),
    ]


@pytest.fixture()
def arena_db(tmp_path):
    path = tmp_path / "arena.sqlite"
    con = db.connect(path)
    db.record_many(con, battles())
    con.close()
    return path


def test_export_battles_in_fastchat_format(arena_db, tmp_path, capsys):
    out = tmp_path / "battles.jsonl"
    assert main(["arena", "export", "--db", str(arena_db), "--battles", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 7 and "wrote 7 battles" in capsys.readouterr().err
    for r, b in zip(recs, battles()):
        assert (r["model_a"], r["model_b"], r["winner"]) == (b.model_a, b.model_b, b.winner)
        assert r["conversation_a"] == b.conversation_a and r["turn"] == b.turn and r["anony"] is True
    assert {r["winner"] for r in recs} == {"model_a", "model_b", "tie", "tie (bothbad)"}


def test_export_pairs_in_trl_format_read_by_dpo(arena_db, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert main(["arena", "export", "--db", str(arena_db), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "wrote 3 preference pairs" in err and "1 ties, 1 both-bad, 1 multi-turn, 1 with identical answers" in err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert recs == [
        {"prompt": [U("2+2?")], "chosen": [A("4")], "rejected": [A("five")]},
        {"prompt": [U("Capital of France?")], "chosen": [A("Paris.")], "rejected": [A("Lyon")]},
        {"prompt": [{"role": "system", "content": "Be brief."}, U("Sky colour?")], "chosen": [A("Blue.")],
         "rejected": [A("It is green")]},
    ]
    pairs = load_pairs_jsonl(out)  # what `llama4 dpo --pairs` reads, unchanged
    from llama4.tokenizer.files import write_tiktoken_bpe

    write_tiktoken_bpe(tmp_path / "tok.model", {bytes([b]): b for b in range(256)})
    tok = Tokenizer(tmp_path / "tok.model")
    assert all(len(tokenize_pair(tok, p).chosen_ids) > 1 for p in pairs)


def test_dpo_trains_on_the_exported_pairs(arena_db, tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert main(["arena", "export", "--db", str(arena_db), "--out", str(out)]) == 0
    policy = write_model(tmp_path / "policy")
    run = tmp_path / "dpo"
    code = main(["dpo", "--policy", str(policy), "--pairs", str(out), "--out", str(run), "--max-steps", "2",
                 "--batch-size", "3", "--threads", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_pairs"] == 3 and (run / "final" / "config.json").is_file()


def test_ratings_json(arena_db, capsys):
    assert main(["arena", "ratings", "--db", str(arena_db), "--json", "--rounds", "100"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [set(r) for r in got] == [{"model", "rating", "ci_low", "ci_high", "battles"}] * 3
    assert {r["model"]: r["battles"] for r in got} == {"x": 5, "y": 4, "z": 5}
    assert [r["rating"] for r in got] == sorted((r["rating"] for r in got), reverse=True)
    assert main(["arena", "ratings", "--db", str(arena_db), "--rounds", "100"]) == 0
    assert "rank" in capsys.readouterr().out


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert main(["arena", "export", "--db", str(tmp_path / "none.sqlite"), "--out", str(out)]) == 2
    assert "arena database not found" in capsys.readouterr().err and not out.exists()
    assert main(["arena", "ratings", "--db", str(tmp_path / "none.sqlite")]) == 2
    m = write_model(tmp_path / "m")
    for argv, needle in [(["--models", f"a={m}"], "at least two models"),
                         (["--models", f"a={m}", f"a={m}"], "given twice"),
                         (["--models", f"a={m}", "b"], "not NAME=DIR"),
                         (["--models", f"<b>={m}", f"c={m}"], "model name"),
                         (["--models", f"a={m}", f"b={tmp_path / 'nope'}"], "not found"),
                         ([], "--models NAME=DIR")]:
        assert main(["arena", *argv]) == 2, argv
        assert needle in capsys.readouterr().err, argv
    assert main(["arena", "auto", "--models", f"a={m}", f"b={m}", "--tasks", "nope", "--battles", "2",
                 "--db", str(tmp_path / "x.sqlite")]) == 2
    assert "unknown suite or task 'nope'" in capsys.readouterr().err and not (tmp_path / "x.sqlite").exists()
    (tmp_path / "empty").mkdir()
    assert main(["arena", "auto", "--models", f"a={m}", f"b={tmp_path / 'empty'}", "--tasks", "arithmetic",
                 "--battles", "2", "--db", str(tmp_path / "x.sqlite")]) == 2
    assert "b=" in capsys.readouterr().err and not (tmp_path / "x.sqlite").exists()


def test_schedule_and_decide():
    plan = schedule(["a", "b", "c"], 30, seed=0)
    pairs = [tuple(sorted(p)) for p in plan]
    assert {pairs.count(p) for p in set(pairs)} == {10}  # every pair equally often
    assert 0 < sum(p[0] == "a" for p in plan if "a" in p) < 20  # sides swapped
    assert [decide(1, 0), decide(0.2, 0.7), decide(1, 1), decide(0, 0)] == ["model_a", "model_b", "tie", "tie (bothbad)"]


def test_auto_scripted_oracle_model_beats_a_silent_one(tmp_path):
    exs = draw_examples(["arithmetic", "copy_span"], 12, "test", 0, 1)
    answers = {ex.messages[-1]["content"]: ex.answer for _, ex in exs}
    good = lambda dialogs: [answers[d[-1]["content"]] for d in dialogs]  # noqa: E731
    bad = lambda dialogs: ["" for _ in dialogs]  # noqa: E731
    path = tmp_path / "a.sqlite"
    s = run_auto({"good": "-", "bad": "-"}, ["arithmetic", "copy_span"], 12, path,
                 responders={"good": good, "bad": bad}, log=lambda m: None)
    assert s["battles"] == 12 and s["scores"]["good"]["score"] == 1.0 and s["scores"]["bad"]["score"] == 0.0
    con = db.open_existing(path)
    rows = db.battles(con)
    assert all(b.source == "auto" and b.judge in ("verifier:arithmetic", "verifier:copy_span") for b in rows)
    assert all(b.winner == ("model_a" if b.model_a == "good" else "model_b") for b in rows)
    assert {b.conversation_a[-2]["content"] for b in rows} == set(answers)  # held-out prompts, each once


def test_auto_cli_on_real_tiny_models_judges_by_the_verifiers(tmp_path, capsys, one_thread):
    m0, m1 = write_model(tmp_path / "m0", seed=0), write_model(tmp_path / "m1", seed=1)
    path = tmp_path / "auto.sqlite"
    argv = ["arena", "auto", "--models", f"m0={m0}", f"m1={m1}", "--tasks", "count_words", "--battles", "6",
            "--db", str(path), "--max-tokens", "6", "--rounds", "100", "--json", "--out", str(tmp_path / "s.json")]
    assert main(argv) == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert doc["battles"] == 6 and set(doc["scores"]) == {"m0", "m1"} and len(doc["ratings"]) == 2
    assert json.loads((tmp_path / "s.json").read_text()) == doc
    task = get_task("count_words")
    con = db.open_existing(path)
    by_prompt = {ex.messages[-1]["content"]: ex for ex in task.examples("test", 6)}
    for b in db.battles(con):  # re-judge every stored battle with the verifier
        ex = by_prompt[b.conversation_a[-2]["content"]]
        sa, sb = task.score(ex, b.conversation_a[-1]["content"]), task.score(ex, b.conversation_b[-1]["content"])
        assert b.winner == decide(sa, sb)
    con.close()
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM battles").fetchone()[0] == 6
    capsys.readouterr()
    assert main(argv[:-3]) == 0  # a second run adds to the same database, text output
    out = capsys.readouterr().out
    assert "leaderboard of all 12 battles" in out and "task score" in out
