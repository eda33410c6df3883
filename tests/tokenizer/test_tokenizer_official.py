"""Our tokenizer against Meta's llama_models.llama4.tokenizer.Tokenizer, token for token."""

from __future__ import annotations

import pickle
import random

import pytest

from llama4.data.corpus import load_documents
from llama4.tokenizer import SPECIAL_TOKEN_NAMES, Tokenizer, load_tokenizer
from llama4.tokenizer.tokenizer import split_long_input


def meta_encode(meta_tok, text, bos=False, eos=False):
    return meta_tok.encode(text, bos=bos, eos=eos)


def test_smoke_and_ids(tok):
    # shared/LLAMA4.md: encode("Hello world", bos=True) -> [200000, 19873, 3817]
    assert tok.encode("Hello world", bos=True) == [200000, 19873, 3817]
    assert tok.n_words == 202048 and len(tok.special_tokens) == 2048
    assert (tok.bos_id, tok.eos_id, tok.eom_id, tok.eot_id, tok.pad_id) == (
        200000, 200001, 200007, 200008, 200018,
    )  # fmt: skip
    assert tok.stop_tokens == [200001, 200007, 200008]
    sp = tok.special_tokens
    assert (sp["<|header_start|>"], sp["<|header_end|>"]) == (200005, 200006)
    assert (sp["<|image_start|>"], sp["<|image_end|>"]) == (200080, 200081)
    assert (sp["<|tile_x_separator|>"], sp["<|tile_y_separator|>"]) == (200084, 200085)
    assert (sp["<|image|>"], sp["<|patch|>"]) == (200090, 200092)
    assert tok.thinking_start_id == 201142


def test_special_tokens_match_meta(tok, meta_tok):
    assert tok.special_tokens == meta_tok.special_tokens
    assert list(tok.special_tokens) == list(SPECIAL_TOKEN_NAMES)
    assert tok.n_words == meta_tok.n_words and tok.stop_tokens == meta_tok.stop_tokens


def test_multilingual_identical(tok, meta_tok, multilingual):
    for bos, eos in [(False, False), (True, False), (True, True)]:
        assert tok.encode(multilingual, bos, eos) == meta_encode(meta_tok, multilingual, bos, eos)
    ids = tok.encode(multilingual)
    assert tok.decode(ids) == multilingual == meta_tok.decode(ids)


def test_every_corpus_language_identical(tok, meta_tok):
    """The start of every document of the embedded corpus (447 languages, dozens of scripts)."""
    docs = load_documents()
    texts = [d.text[:1500] for d in docs[::3]] + [d.text[:1500] for d in docs if d.id.startswith("udhr/")]
    for t in texts:
        assert tok.encode(t) == meta_encode(meta_tok, t)
    assert tok.encode_batch(texts) == [meta_encode(meta_tok, t) for t in texts]


def test_special_tokens_never_injected_by_text(tok, meta_tok, multilingual):
    for name in SPECIAL_TOKEN_NAMES[:100] + ("<|patch|>", "<|reasoning_thinking_start|>"):
        ids = tok.encode(f"a {name} b")
        assert not any(tok.is_special(i) for i in ids), name
        assert ids == meta_encode(meta_tok, f"a {name} b")
        assert tok.decode(ids) == f"a {name} b"
    ids = tok.encode(multilingual)
    assert max(ids) < 200000


def test_random_strings_identical(tok, meta_tok):
    rng = random.Random(0)
    alphabet = list("ab Z9\n\t  .,'!?-_/\\\r") + ["é", "ß", "Ж", "λ", "ع", "ש", "क", "ก", "中", "한",
                                                 "😀", "\u200d", "\u00a0", "\u3000", "'s", "'LL"]  # fmt: skip
    for _ in range(300):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert tok.encode(s) == meta_encode(meta_tok, s), repr(s)


def test_long_inputs_identical(tok, meta_tok):
    """Meta cuts every 400k chars and after 25k-char runs; we must cut at the same places."""
    cases = [
        "x" * 25_000,
        "y" * 25_001,
        " " * 60_000 + "z",
        ("ab" * 20_000 + " " * 30_000) * 2 + "end",
        # a run crossing the 400k boundary, and words of ordinary text around it
        ("word " * 79_000) + "q" * 30_000 + " tail",
        "\n".join(["line of text with Ünïcödé"] * 20_000),  # 520k chars, no long runs
    ]
    for s in cases:
        assert tok.encode(s) == meta_encode(meta_tok, s), (len(s), s[:20])
    assert tok.encode_batch(cases[:3]) == [meta_encode(meta_tok, s) for s in cases[:3]]


def test_split_long_input_matches_meta_cuts(meta_tok):
    rng = random.Random(1)
    for _ in range(30):
        parts = []
        for _ in range(rng.randint(1, 6)):
            parts.append(rng.choice(["a", " ", "\n", "é"]) * rng.randint(1, 60_000))
        s = "".join(parts)
        ours = split_long_input(s)
        assert "".join(ours) == s
        meta = [
            p
            for i in range(0, len(s), 400_000)
            for p in meta_tok._split_whitespaces_or_nonwhitespaces(s[i : i + 400_000], 25_000)
        ]
        if len(s) <= 25_000:
            meta = [s]
        assert ours == meta


def test_decode_and_bytes(tok, meta_tok):
    ids = tok.encode("héllo 中文")
    assert tok.decode_bytes(ids) == "héllo 中文".encode()
    # A split multi-byte character decodes to U+FFFD, as Meta's tokenizer does.
    partial = tok.encode("😀")[:-1]
    assert tok.decode(partial) == meta_tok.decode(partial) == "\ufffd"
    assert tok.decode([tok.bos_id, tok.eot_id]) == "<|begin_of_text|><|eot|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.n_words])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]
    assert tok.encode("") == [] and tok.encode("", bos=True, eos=True) == [200000, 200001]


def test_load_by_folder_and_pickle(tok, tmp_path, multilingual):
    import shutil

    shutil.copy(tok.path, tmp_path / "tokenizer.model")
    t2 = load_tokenizer(tmp_path)
    assert t2.encode(multilingual) == tok.encode(multilingual)
    t3 = pickle.loads(pickle.dumps(tok))
    assert isinstance(t3, Tokenizer) and t3.encode("abc def") == tok.encode("abc def")


def test_streaming_decoder(tok, multilingual):
    from llama4.tokenizer.streaming import StreamingDecoder

    ids = tok.encode(multilingual)
    dec = StreamingDecoder(tok)
    deltas = [dec.push(i) for i in ids]
    assert "".join(deltas) + dec.flush() == multilingual
    assert not any("\ufffd" in d for d in deltas)  # no character is ever split
    for ch in ("😀", "𓀀"):  # one character over 2 and 4 tokens: nothing comes out until it is whole
        ids = tok.encode(ch)
        assert len(ids) > 1 and len(ch) == 1, ids
        dec = StreamingDecoder(tok)
        assert [dec.push(i) for i in ids] == [""] * (len(ids) - 1) + [ch] and dec.flush() == ""
