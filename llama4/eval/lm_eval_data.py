"""The data of our offline lm-eval tasks (``llama4/eval/lm_eval_tasks/*.jsonl``), generated from the
embedded corpus and ``llama4.tasks``, held out: only the tasks' *test* split is used.

    python -m llama4.eval.lm_eval_data            # (re)write the JSONL files beside the YAMLs
    python -m llama4.eval.lm_eval_data --check    # exit 1 if a shipped file is not what we generate

Generation is deterministic (string-seeded ``random.Random``); a test regenerates everything and
compares it with the shipped files, so a change to the corpus or to ``llama4.tasks`` that would
change the data fails until the files are regenerated.

* ``langid.jsonl``   which language is a passage in: 4 language names (multiple choice)
* ``udhr_article.jsonl``  the UDHR article number of a first sentence, in many languages: 4 numbers
* ``cloze.jsonl``    the true continuation of a passage among 4 continuations of the same language
* ``corpus_text.jsonl``   one held-out passage per main language (loglikelihood_rolling: bits per byte)
* ``verifiable.jsonl``  the verifiable tasks (``llama4.tasks``, suite ``tasks``) as Llama 4 chat
  prompts spelled out as text, scored by each task's own verifier (generate_until)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from functools import lru_cache
from pathlib import Path

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")
SPLIT = "test"
N_CHOICES = 4


def _rng(*key: object) -> random.Random:
    return random.Random("\x1f".join(["lm-eval"] + [str(k) for k in key]))


def _choices(rng: random.Random, right: str, pool: list[str]) -> tuple[list[str], int]:
    """``right`` and N_CHOICES-1 distinct others from ``pool``, shuffled; and the right one's index."""
    others = rng.sample(sorted(set(pool) - {right}), N_CHOICES - 1)
    options = [right] + others
    rng.shuffle(options)
    return options, options.index(right)


def langid_docs(per_lang: int = 8) -> list[dict]:
    from llama4.tasks.languages import KNOWN_LANGUAGES, language_name
    from llama4.tasks.sources import looks_like, text_units, window

    names = [language_name(c) for c in KNOWN_LANGUAGES]
    docs = []
    for lang in KNOWN_LANGUAGES:
        rng = _rng("langid", lang)
        try:
            units = text_units(lang, SPLIT)
        except ValueError:  # no held-out text in this language
            continue
        got, tries = 0, 0
        while got < per_lang and tries < 50 * per_lang:
            tries += 1
            passage = window(rng, rng.choice(units), 120)
            if len(passage) < 40 or not looks_like(passage, lang):
                continue
            choices, label = _choices(rng, language_name(lang), names)
            docs.append({"lang": lang, "query": f"Passage: {passage}\nQuestion: In which language is this "
                         "passage written?\nAnswer:", "choices": choices, "label": label})
            got += 1
    return docs


def udhr_article_docs(max_langs: int = 60) -> list[dict]:
    from llama4.tasks.languages import KNOWN_LANGUAGES, language_name
    from llama4.tasks.sources import articles_of
    from llama4.tasks.udhr import N_ARTICLES, first_sentence, udhr_articles

    arts = udhr_articles()
    numbers = [str(k) for k in range(1, N_ARTICLES + 1)]
    docs = []
    for lang in [c for c in KNOWN_LANGUAGES if c in arts][:max_langs]:
        rng = _rng("udhr_article", lang)
        for k in articles_of(SPLIT):
            sentence = first_sentence(arts[lang][k - 1])[:300]
            choices, label = _choices(rng, str(k), numbers)
            docs.append({"lang": lang, "query": f"Universal Declaration of Human Rights, in {language_name(lang)}:\n"
                         f"\"{sentence}\"\nThis is the beginning of article number", "choices": choices,
                         "label": label})
    return docs


def cloze_docs(per_lang: int = 12) -> list[dict]:
    """A passage cut in two: the context, and its true continuation among continuations cut from
    other passages of the same language (each begins with the space a spaced script puts there)."""
    from llama4.data.corpus import MAIN_LANGUAGES
    from llama4.tasks.sources import is_spaced, looks_like, text_units, window

    docs = []
    for lang in MAIN_LANGUAGES:
        rng = _rng("cloze", lang)
        units = text_units(lang, SPLIT)
        spaced = is_spaced(" ".join(units[:3]))
        size = 160 if spaced else 60

        def cut(passage: str) -> tuple[str, str] | None:
            if spaced:
                words = passage.split(" ")
                if len(words) < 8:
                    return None
                k = len(words) - max(3, len(words) // 4)
                return " ".join(words[:k]), " " + " ".join(words[k:])
            k = len(passage) - max(8, len(passage) // 4)
            return (passage[:k], passage[k:]) if len(passage) >= 24 else None

        pieces = []
        for _ in range(50 * per_lang):
            passage = window(rng, rng.choice(units), size)
            c = cut(passage) if looks_like(passage, lang) else None
            if c is not None and c not in pieces:
                pieces.append(c)
            if len(pieces) >= 4 * per_lang:
                break
        endings = [e for _, e in pieces]
        for context, ending in pieces[:per_lang]:
            choices, label = _choices(rng, ending, endings)
            docs.append({"lang": lang, "query": context, "choices": choices, "label": label})
    return docs


def corpus_text_docs(n_chars: int = 600) -> list[dict]:
    from llama4.data.corpus import MAIN_LANGUAGES
    from llama4.tasks.sources import text_units

    docs = []
    for lang in MAIN_LANGUAGES:
        text = " ".join(" ".join(u.split()) for u in text_units(lang, SPLIT))
        docs.append({"lang": lang, "text": text[:n_chars]})
    return docs


def chat_prompt_text(messages) -> str:
    """A dialog in the Llama 4 chat format, as text with the control tokens spelled out
    (``<|header_start|>user<|header_end|>...``); the harness's tokenizer reads the spellings as
    those tokens (``llama4.server.tokenize.encode_with_special_tokens``)."""
    from llama4.tokenizer.chat_format import encode_dialog_prompt

    tok = _official()
    return tok.decode(encode_dialog_prompt(tok, [dict(m) for m in messages]))


@lru_cache(maxsize=1)
def _official():
    from llama4.tokenizer import load_tokenizer

    return load_tokenizer()  # the official Llama 4 tokenizer: its control-token spellings


def verifiable_docs(per_task: int = 8) -> list[dict]:
    from llama4.tasks import SUITES, get_task

    docs = []
    for name in SUITES["tasks"]:
        for ex in get_task(name).examples(SPLIT, per_task, seed=0):
            docs.append({"lang": ex.lang, "task": ex.task, "prompt": chat_prompt_text(ex.messages),
                         "answer": ex.answer, "example": {"split": ex.split, "messages": list(ex.messages),
                                                          "meta": ex.meta}})
    return docs


FILES = {"langid.jsonl": langid_docs, "udhr_article.jsonl": udhr_article_docs, "cloze.jsonl": cloze_docs,
         "corpus_text.jsonl": corpus_text_docs, "verifiable.jsonl": verifiable_docs}


def render(docs: list[dict]) -> str:
    return "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)


def generate() -> dict[str, str]:
    """File name -> its JSONL text. Documents are shuffled (seeded), so that lm-eval's ``--limit N``,
    which takes the first N, still spans languages and tasks."""
    out = {}
    for name, fn in FILES.items():
        docs = fn()
        _rng("order", name).shuffle(docs)
        out[name] = render(docs)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama4.eval.lm_eval_data", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare with the shipped files instead of writing")
    a = p.parse_args(argv)
    from llama4.eval.common import write_text

    stale = []
    for name, text in generate().items():
        path = TASKS_DIR / name
        if a.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            write_text(path, text)
            print(f"wrote {path} ({text.count(chr(10))} documents)")
    if stale:
        print(f"out of date: {', '.join(stale)} (run: python -m llama4.eval.lm_eval_data)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
