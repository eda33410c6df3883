"""Corrupt, truncated or wrong-format tokenizer files fail loudly, naming the problem."""

from __future__ import annotations

import base64

import pytest

from llama4.tokenizer import Tokenizer, TokenizerFileError, load_tokenizer
from llama4.tokenizer.files import read_tiktoken_bpe, write_tiktoken_bpe


def _bytes_vocab(extra=()):
    ranks = {bytes([b]): b for b in range(256)}
    for i, t in enumerate(extra):
        ranks[t] = 256 + i
    return ranks


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00binary", "not a tiktoken BPE file"),
        (b"QQ== 0\nQg== 1 extra\n", "expected '<base64 token> <rank>'"),
        (b"!!notbase64 0\n", "bad base64"),
        (b"QQ== zero\n", "bad base64 token or integer rank"),
        (b"QQ== 0\nQQ== 1\n", "duplicate token"),
        (b"QQ== 0\nQg== 5\n", "ranks are not exactly"),
        (b"QQ== 0\nQg== 1\n", "single-byte tokens are missing"),
    ],
)
def test_corrupt_tiktoken_files(tmp_path, content, message):
    p = tmp_path / "tokenizer.model"
    p.write_bytes(content)
    with pytest.raises(TokenizerFileError, match=message):
        Tokenizer(p)


def test_truncated_official_file(tmp_path, tok):
    raw = tok.path.read_bytes()
    p = tmp_path / "tokenizer.model"
    p.write_bytes(raw[: len(raw) // 2])  # cut mid-line
    with pytest.raises(TokenizerFileError, match=r"tokenizer.model:\d+: expected"):  # the line
        load_tokenizer(p)


def test_missing_paths(tmp_path):
    with pytest.raises(TokenizerFileError, match="not found"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(TokenizerFileError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)


def test_write_read_roundtrip_is_atomic(tmp_path):
    ranks = _bytes_vocab([b"ab", b"abc"])
    p = tmp_path / "t.model"
    write_tiktoken_bpe(p, ranks)
    assert read_tiktoken_bpe(p) == ranks
    assert [f.name for f in tmp_path.iterdir()] == ["t.model"]  # no temp file left
    line = p.read_text().splitlines()[-1]
    assert line == f"{base64.b64encode(b'abc').decode()} 257"
    t = Tokenizer(p)
    assert t.n_words == 258 + 2048 and t.encode("abc") == [257]
