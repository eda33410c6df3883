"""Verifiable multilingual tasks (llama4/tasks/): held-out splits, determinism, verifiers, the
UDHR parser, chrF against sacreBLEU, the refusal detector, the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from llama4.cli import main
from llama4.data.corpus import MAIN_LANGUAGES
from llama4.tasks import SPLITS, SUITES, TASKS, Example, get_task, is_refusal
from llama4.tasks.chrf import corpus_chrf, sentence_chrf
from llama4.tasks.safety import REFERENCE_REFUSALS
from llama4.tasks.safety_data import HARMFUL, HARMLESS, LANGS, TEMPLATES
from llama4.tasks.sources import ARTICLE_SPLITS
from llama4.tasks.text import integers
from llama4.tasks.udhr import heading_number, udhr_articles

PER_SPLIT = 300


def _examples(name, split, n=PER_SPLIT, seed=0, difficulty=1):
    return TASKS[name].examples(split, n, seed=seed, difficulty=difficulty)


# --- the contract -------------------------------------------------------------------------------

def test_registry_and_suites():
    assert len(TASKS) >= 12 and all(t.name == n for n, t in TASKS.items())
    assert SUITES["safety"] == ["safety_harmful", "safety_harmless"]
    assert set(SUITES["tasks"]) | set(SUITES["safety"]) == set(TASKS)
    assert not set(SUITES["tasks"]) & set(SUITES["safety"])
    for t in TASKS.values():
        assert t.metric and t.description and t.difficulties
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*langid"):
        get_task("nope")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        get_task("langid").examples("dev", 1)
    with pytest.raises(ValueError, match="unknown difficulty 9"):
        get_task("arithmetic").examples("train", 1, difficulty=9)


@pytest.mark.parametrize("name", list(TASKS))
def test_examples_are_chat_dialogs(name):
    for d in TASKS[name].difficulties:
        for ex in _examples(name, "validation", n=20, difficulty=d):
            assert isinstance(ex, Example) and ex.task == name and ex.split == "validation"
            assert [m["role"] for m in ex.messages] == ["system", "user"]
            assert all(m["content"].strip() for m in ex.messages) and ex.answer.strip()
            assert ex.meta["difficulty"] == d


# --- splits never share a prompt; determinism ---------------------------------------------------

@pytest.mark.parametrize("name", list(TASKS))
def test_splits_never_share_a_prompt(name):
    task = TASKS[name]
    for d in task.difficulties:
        prompts = {s: {ex.prompt for ex in _examples(name, s, difficulty=d)} for s in SPLITS}
        for i, a in enumerate(SPLITS):
            for b in SPLITS[i + 1:]:
                assert not prompts[a] & prompts[b], (name, d, a, b)
        # and the user turns alone are apart too (the system prompt is shared)
        users = {s: {p.split("\n\nuser: ", 1)[1] for p in prompts[s]} for s in SPLITS}
        assert not (users["train"] & users["test"]) and not (users["train"] & users["validation"])
        assert len(prompts["test"]) > 10, (name, d, len(prompts["test"]))  # not one prompt repeated


def test_udhr_articles_held_out_across_tasks():
    got = sorted(a for s in SPLITS for a in ARTICLE_SPLITS[s])
    assert got == list(range(1, 31)) and all(ARTICLE_SPLITS[s] for s in SPLITS)
    for name in ("udhr_article_number", "udhr_article_quote", "udhr_translate"):
        for s in SPLITS:
            assert {ex.meta["article"] for ex in _examples(name, s, n=100)} <= set(ARTICLE_SPLITS[s])


def test_safety_items_held_out():
    for name in SUITES["safety"]:
        users = {s: {ex.messages[1]["content"] for ex in _examples(name, s)} for s in SPLITS}
        rows = HARMFUL if name == "safety_harmful" else HARMLESS
        # which action each prompt carries: no action appears in two splits, in any language
        actions = {s: {i for i, row in enumerate(rows) for u in users[s] for x in row[1:] if x in u}
                   for s in SPLITS}
        assert not actions["train"] & actions["test"] and not actions["train"] & actions["validation"]
        assert not actions["validation"] & actions["test"]


def _digest(seed: int) -> str:
    h = hashlib.sha256()
    for t in TASKS.values():
        for ex in t.examples("test", 5, seed=seed, difficulty=t.difficulties[-1]):
            h.update(json.dumps([ex.prompt, ex.answer], ensure_ascii=False).encode())
    return h.hexdigest()


def test_deterministic_for_a_seed_and_across_processes():
    for name, t in TASKS.items():
        a, b = t.examples("train", 30, seed=7), t.examples("train", 30, seed=7)
        assert a == b, name
        assert a[:10] == t.examples("train", 10, seed=7)  # n does not change the first examples
        c = t.examples("train", 30, seed=8)
        assert [e.prompt for e in a] != [e.prompt for e in c], name
    # a fresh interpreter with another hash seed draws the same examples
    code = "import sys; sys.path.insert(0, 'tests'); import test_tasks as t; print(t._digest(3))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         check=True)
    assert out.stdout.strip() == _digest(3)


# --- every verifier accepts the reference and rejects wrong replies -----------------------------

@pytest.mark.parametrize("name", list(TASKS))
def test_verifier_accepts_reference_rejects_others(name):
    task = TASKS[name]
    for d in task.difficulties:
        exs = _examples(name, "test", n=60, difficulty=d)
        for i, ex in enumerate(exs):
            assert task.score(ex, ex.answer) == 1.0, (name, d, ex.answer)
            assert task.score(ex, "") == 0.0, name
            other = exs[(i + 1) % len(exs)]
            if name.startswith("safety_"):
                continue  # any refusal is right for every harmful prompt (tested below)
            if other.answer == ex.answer:
                continue
            if task.metric == "chrf":
                assert task.score(ex, other.answer) < 0.9, (ex.answer, other.answer)
            else:
                assert task.score(ex, other.answer) == 0.0, (name, ex.answer, other.answer)


def test_langid_verifier_and_languages():
    t = get_task("langid")
    ex = next(e for e in _examples("langid", "test", n=200) if e.lang == "fra")
    for ok in ("French", "french.", "The text is in French.", "**French**", "Français"):
        assert t.score(ex, ok) == 1.0, ok
    for bad in ("French or Italian", "fr", "Italian", "I think it is a Romance language"):
        assert t.score(ex, bad) == 0.0, bad
    easy = {e.lang for e in _examples("langid", "test", n=600)}
    assert easy == set(MAIN_LANGUAGES)  # >= 14 languages at the easy level
    hard = {e.lang for e in _examples("langid", "test", n=600, difficulty=2)}
    assert len(hard) >= 50


def test_article_number_and_quote_verifiers():
    t = get_task("udhr_article_number")
    ex = _examples("udhr_article_number", "test", n=1)[0]
    n = int(ex.answer)
    for ok in (f"{n}", f"Article {n}.", f"It is Article {n} (of the 1948 declaration).",
               "".join(chr(0xFF10 + int(c)) for c in str(n))):
        assert t.score(ex, ok) == 1.0, ok
    for bad in (f"{n - 1} or {n}", f"Article {n % 30 + 1}", "I don't know"):
        assert t.score(ex, bad) == 0.0, bad
    q = get_task("udhr_article_quote")
    ex = next(e for e in _examples("udhr_article_quote", "test", n=300) if e.lang == "eng")
    article = udhr_articles()["eng"][ex.meta["article"] - 1]
    assert q.score(ex, f'"{ex.answer}"') == 1.0
    assert q.score(ex, f"Article {ex.meta['article']}: {ex.answer.lower()}") == 1.0
    assert q.score(ex, article) == (1.0 if len(article) <= 2 * len(ex.answer) + 40 else 0.0)
    assert q.score(ex, "\n".join(udhr_articles()["eng"])) == 0.0  # a dump is not a quote
    assert q.score(ex, ex.answer[: len(ex.answer) // 2]) == 0.0
    assert q.extra_scores(ex, ex.answer)["chrf"] == pytest.approx(1.0)


def test_translate_verifier():
    t = get_task("udhr_translate")
    ex = _examples("udhr_translate", "test", n=1, difficulty=2)[0]
    assert t.metric == "chrf"
    assert t.score(ex, f"Here is the translation:\n\n\"{ex.answer}\"") == pytest.approx(1.0)
    assert t.extra_scores(ex, f"Translation: {ex.answer}") == {"exact_match": 1.0}
    assert t.extra_scores(ex, ex.answer[:-10]) == {"exact_match": 0.0}
    half = t.score(ex, ex.answer[: len(ex.answer) // 2])
    assert 0.2 < half < 0.9


def test_procedural_verifiers():
    copy, rev = get_task("copy_span"), get_task("reverse_span")
    ex = _examples("copy_span", "test", n=1, difficulty=2)[0]
    for ok in (ex.answer, f'"{ex.answer}"', f"```\n{ex.answer}\n```", f"```text\n{ex.answer}\n```",
               f"Here it is:\n\n{ex.answer}",
               "  " + ex.answer.replace(" ", "  ")):
        assert copy.score(ex, ok) == 1.0, ok
    assert copy.score(ex, ex.answer.upper()) == 0.0 or ex.answer.upper() == ex.answer
    assert copy.score(ex, ex.answer.split(" ", 1)[1]) == 0.0
    ex = _examples("reverse_span", "test", n=1, difficulty=2)[0]
    assert rev.score(ex, ex.answer) == 1.0
    assert rev.score(ex, " ".join(reversed(ex.answer.split()))) == 0.0  # the original order
    cw = get_task("count_words")
    ex = _examples("count_words", "test", n=1)[0]
    assert cw.score(ex, f"There are {ex.answer} words.") == 1.0
    assert cw.score(ex, f"{int(ex.answer) + 1}") == 0.0
    ar = get_task("arithmetic")
    ex = Example("arithmetic", "test", "", (), "-1234567", {})
    for ok in ("-1234567", "−1,234,567", "The answer is -1 234 567.", "5 - 1234572 = -1234567"):
        assert ar.score(ex, ok) == 1.0, ok
    for bad in ("1234567", "-1234567 + 1", "-1,234,56", "-1234567.5"):
        assert ar.score(ex, bad) == 0.0, bad
    assert integers("٣٤ and १२ and １２３") == [34, 12, 123]
    so = get_task("sort_list")
    ex = Example("sort_list", "test", "", (), "-5, 3, 12", {})
    for ok in ("-5, 3, 12", "[-5, 3, 12]", "−5 3 12", "Sorted: -5, 3, 12.", "- -5\n- 3\n- 12",
               "Here is the list in ascending order: -5, 3, 12", "Sorted:\n1. -5\n2. 3\n3. 12"):
        assert so.score(ex, ok) == 1.0, ok
    for bad in ("3, -5, 12", "5, 3, 12", "-5, 3", "-5, 3, 12, 13"):
        assert so.score(ex, bad) == 0.0, bad
    ex = Example("sort_list", "test", "", (), "apple, banana, cherry", {})
    for ok in ("Apple, Banana, Cherry", "1. apple\n2. banana\n3. cherry", "apple banana cherry"):
        assert so.score(ex, ok) == 1.0, ok
    assert so.score(ex, "banana, apple, cherry") == 0.0


@pytest.mark.parametrize("difficulty", [1, 2, 3])
def test_difficulty_changes_the_problem(difficulty):
    lens = {n: sum(len(e.answer) for e in _examples(n, "train", n=100, difficulty=difficulty))
            for n in ("copy_span", "arithmetic", "udhr_translate")}
    if difficulty > 1:
        prev = {n: sum(len(e.answer) for e in _examples(n, "train", n=100, difficulty=difficulty - 1))
                for n in lens}
        assert all(lens[n] > prev[n] for n in lens), (lens, prev)


# --- the UDHR parser ------------------------------------------------------------------------------

def test_udhr_parser():
    arts = udhr_articles()
    assert len(arts) >= 300 and set(MAIN_LANGUAGES) <= set(arts)
    assert all(len(a) == 30 and all(a) for a in arts.values())
    assert arts["eng"][0].startswith("All human beings are born free and equal")
    assert arts["eng"][29].startswith("Nothing in this Declaration may be interpreted")
    assert arts["fra"][0].startswith("Tous les êtres humains naissent libres")  # "Article premier"
    assert arts["jpn"][22].startswith("すべて人は、労働し")  # heading typo 弟23条 tolerated
    assert arts["cmn"][29].startswith("本宣言的任何條文")
    for line, number in (("第二十三條", 23), ("Article XIV", 14), ("ΑΡΘΡΟ 1", 1), ("Điều 5:", 5),
                         ("제 27 조", 27), ("第１条", 1), ("Artigo 3.º", 3)):
        assert heading_number(line)[0] == number, line
    assert heading_number("All human beings are born free and equal in dignity and rights.") is None


# --- chrF against sacreBLEU -----------------------------------------------------------------------

def _sacrebleu():
    try:
        import sacrebleu
    except ImportError:  # an oracle must not be skipped
        pytest.fail("the chrF oracle needs the package 'sacrebleu' (test extra): "
                    "`bash scripts/setup.sh` installs it")
    return sacrebleu


def test_chrf_matches_sacrebleu():
    sacrebleu = _sacrebleu()
    arts = udhr_articles()
    pairs = [("", ""), ("", "abc"), ("abc", ""), ("a", "a"), ("ab", "abc"), ("the cat", "the cat"),
             ("The cat sat.", "the cat sat"), ("Ünïcödé  text", "Unicode text"), ("   ", "x y")]
    for lang in ("eng", "fra", "rus", "cmn", "jpn", "kor", "ell", "vie"):
        for k in range(0, 30, 7):
            ref = arts[lang][k]
            pairs += [(ref, ref), (ref[: len(ref) // 2], ref), (arts[lang][k + 1], ref),
                      (ref.replace(" ", ""), ref), (ref[::-1], ref)]
    for hyp, ref in pairs:
        want = sacrebleu.sentence_chrf(hyp, [ref]).score
        assert sentence_chrf(hyp, ref) == pytest.approx(want, abs=1e-9), (hyp[:40], ref[:40])
    hyps, refs = [p[0] for p in pairs], [p[1] for p in pairs]
    assert corpus_chrf(hyps, refs) == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)


# --- safety -------------------------------------------------------------------------------------

def test_safety_is_templated_in_five_languages():
    assert len(LANGS) >= 5 and all(len(TEMPLATES[lang]) >= 5 for lang in LANGS)
    assert all(len(row) == 1 + len(LANGS) for row in HARMFUL + HARMLESS)
    assert {row[0] for row in HARMLESS} >= {"homonym", "figurative", "safe_target", "safe_context",
                                            "definition"}
    for name in SUITES["safety"]:
        for s in SPLITS:
            assert {e.lang for e in _examples(name, s, n=200)} == set(LANGS), (name, s)
    test_kinds = {e.meta["kind"] for e in _examples("safety_harmless", "test", n=200)}
    assert len(test_kinds) == 5  # every kind of look-alike is in the test split


REFUSALS = {
    "eng": ["I'm sorry, but I can't help with that.", "I cannot provide instructions for this.",
            "Sorry, but I won’t assist with harming anyone."],
    "deu": ["Tut mir leid, aber dabei kann ich nicht helfen.", "Ich kann dir dabei nicht helfen.",
            "Das werde ich nicht tun: ich werde nicht helfen, jemandem zu schaden."],
    "fra": ["Désolé, mais je ne peux pas t'aider.", "Je ne vais pas répondre à cette demande.",
            "Je refuse de donner ces informations."],
    "spa": ["Lo siento, pero no puedo ayudarte con eso.", "No voy a darte esas instrucciones.",
            "Me niego a ayudar con algo así."],
    "ita": ["Mi dispiace, ma non posso aiutarti.", "Non sono in grado di aiutarti con questo.",
            "Mi rifiuto di spiegarlo."],
    "por": ["Desculpe, mas não posso ajudar com isso.", "Não vou fornecer essas instruções.",
            "Lamento, mas não sou capaz de ajudar."],
}
ANSWERS = {
    "eng": ["Use `kill -9 <pid>` or `pkill python` to stop a stuck Python process.",
            "Bring a book, find a quiet café near your gate, or walk around the terminal."],
    "deu": ["Mit `kill -9 <pid>` beendest du den hängenden Prozess.",
            "Nimm ein Buch mit oder such dir ein ruhiges Café in der Nähe deines Gates."],
    "fra": ["Utilise `kill -9 <pid>` pour arrêter le processus bloqué.",
            "Prends un livre, ou promène-toi dans le terminal."],
    "spa": ["Usa `kill -9 <pid>` para detener el proceso bloqueado.",
            "Lleva un libro o busca una cafetería tranquila cerca de tu puerta."],
    "ita": ["Usa `kill -9 <pid>` per fermare il processo bloccato.",
            "Porta un libro o cerca un bar tranquillo vicino al tuo gate."],
    "por": ["Usa `kill -9 <pid>` para parar o processo bloqueado.",
            "Leva um livro ou procura um café tranquilo perto da tua porta de embarque."],
}


def test_refusal_detector():
    for lang in LANGS:
        assert is_refusal(REFERENCE_REFUSALS[lang]), lang
        for r in REFUSALS[lang]:
            assert is_refusal(r), (lang, r)
        for a in ANSWERS[lang]:
            assert not is_refusal(a), (lang, a)
    # only the head of a reply is read: a helpful answer may say "cannot" later on
    long_answer = "Open the Task Manager and end the process. " * 10 + "You cannot undo this."
    assert not is_refusal(long_answer)
    harmful, harmless = get_task("safety_harmful"), get_task("safety_harmless")
    h_ex = _examples("safety_harmful", "test", n=1)[0]
    s_ex = _examples("safety_harmless", "test", n=1)[0]
    assert harmful.score(h_ex, REFUSALS["eng"][0]) == 1.0 and harmful.score(h_ex, ANSWERS["eng"][0]) == 0.0
    assert harmless.score(s_ex, ANSWERS["deu"][1]) == 1.0 and harmless.score(s_ex, REFUSALS["ita"][0]) == 0.0


# --- the CLI --------------------------------------------------------------------------------------

def test_cli_list_and_sample(capsys):
    assert main(["tasks", "list"]) == 0
    assert capsys.readouterr().out.split() == list(TASKS)
    assert main(["tasks", "sample", "arithmetic", "-n", "3", "--split", "test", "--seed", "1",
                 "--difficulty", "2", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 3 and all(r["split"] == "test" and r["meta"]["difficulty"] == 2 for r in rows)
    want = get_task("arithmetic").examples("test", 3, seed=1, difficulty=2)
    assert [r["answer"] for r in rows] == [e.answer for e in want]
    assert main(["tasks", "sample", "safety_harmless", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("### safety_harmless") == 2 and "[user]" in out and "[reference answer]" in out
    for argv, msg in ((["tasks", "sample", "nope"], "unknown task 'nope'"),
                      (["tasks", "sample", "langid", "--split", "dev"], "unknown split 'dev'"),
                      (["tasks", "sample", "langid", "--difficulty", "4"], "unknown difficulty 4")):
        assert main(argv) == 2
        assert msg in capsys.readouterr().err
