"""Training our own small byte-level BPE: format, special-token layout, chat format, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama4.cli import main as cli_main
from llama4.data.corpus import iter_corpus
from llama4.tokenizer import SPECIAL_TOKEN_NAMES, Tokenizer
from llama4.tokenizer.bpe import MIN_VOCAB_SIZE, train_bpe, train_tokenizer_file
from llama4.tokenizer.chat_format import encode_dialog_prompt

VOCAB = 4096  # 2048 learned + 2048 special: small enough to train in about a second


@pytest.fixture(scope="module")
def sample_texts():
    docs = list(iter_corpus("train", langs=("eng", "deu", "rus", "jpn", "arb", "heb", "tha")))
    return [d.text for d in docs[::6]]


@pytest.fixture(scope="module")
def small(tmp_path_factory, sample_texts):
    out = tmp_path_factory.mktemp("bpe") / "small.model"
    return train_tokenizer_file(sample_texts, VOCAB, out)


def test_layout_and_roundtrip(small, sample_texts, multilingual):
    assert small.n_words == VOCAB
    n_base = VOCAB - len(SPECIAL_TOKEN_NAMES)
    assert small.bos_id == n_base and small.special_tokens["<|eot|>"] == n_base + 8
    assert list(small.special_tokens) == list(SPECIAL_TOKEN_NAMES)
    for t in sample_texts[:20] + [multilingual]:
        ids = small.encode(t)
        assert small.decode(ids) == t
        assert max(ids) < n_base  # ordinary text never yields a special id
    text = "\n".join(sample_texts)
    # It learned something: well under one token per byte on its own training text.
    assert len(small.encode(text)) < 0.5 * len(text.encode("utf-8"))


def test_file_is_tiktoken_format_and_meta_reads_it(small, multilingual, meta_chat_format):
    """Meta's own Tokenizer and ChatFormat accept our file and give the same ids."""
    from llama_models.datatypes import RawMessage
    from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer

    meta = MetaTokenizer(Path(small.path))
    assert meta.special_tokens == small.special_tokens and meta.n_words == small.n_words
    assert small.encode(multilingual, True, True) == meta.encode(multilingual, bos=True, eos=True)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Привет!"}]
    want = meta_chat_format.ChatFormat(meta).encode_dialog_prompt(
        [RawMessage(role=m["role"], content=m["content"]) for m in msgs]
    ).tokens
    assert encode_dialog_prompt(small, msgs) == want


def test_ranks_are_merge_order(sample_texts):
    ranks = train_bpe(sample_texts[:30], 2048 + 400)
    by_rank = sorted(ranks, key=ranks.get)
    assert by_rank[:256] == [bytes([b]) for b in range(256)]
    assert sorted(ranks.values()) == list(range(400))
    # Every learned token is the concatenation of two tokens of lower rank.
    for tok_bytes in by_rank[256:]:
        r = ranks[tok_bytes]
        assert any(
            ranks.get(tok_bytes[:k], r) < r and ranks.get(tok_bytes[k:], r) < r
            for k in range(1, len(tok_bytes))
        )


def test_cli_train(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    lines = [d.text for d in iter_corpus("train", langs=("fra", "ell"))][::10]
    import json

    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines), encoding="utf-8")
    out = tmp_path / "tok.model"
    rc = cli_main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "3072", "--out", str(out)])
    assert rc == 0 and "3072" in capsys.readouterr().out
    t = Tokenizer(out)
    assert t.n_words == 3072 and t.decode(t.encode(lines[0])) == lines[0]


def test_vocab_too_small(tmp_path, capsys):
    with pytest.raises(ValueError, match="too small"):
        train_bpe(["some text"], 2048)
    assert MIN_VOCAB_SIZE == 2048 + 256 + 1
    rc = cli_main(["tokenizer", "train", "--vocab-size", "3000", "--out", str(tmp_path / "x.model"),
                   "--corpus", str(tmp_path)])  # fmt: skip
    assert rc == 2 and "no corpus files" in capsys.readouterr().err
    rc = cli_main(["tokenizer", "train", "--vocab-size", "1000", "--out", str(tmp_path / "x.model")])
    assert rc == 2 and "too small" in capsys.readouterr().err
    assert not (tmp_path / "x.model").exists()


def test_empty_or_tiny_corpus(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train_bpe(["", ""], 4096)
    with pytest.raises(ValueError, match="too small for vocab size"):
        train_tokenizer_file(["tiny text"], 8192, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()
