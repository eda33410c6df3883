"""Corpus readers: text, JSONL (plain and compressed) and Parquet; bad input is reported."""

from __future__ import annotations

import pytest

from llama4.data.readers import CorpusError, expand_inputs, iter_documents, iter_texts


def test_formats(mixed_corpus):
    d, docs = mixed_corpus
    files = expand_inputs([d])
    assert [f.name for f in files] == ["a.txt", "b.jsonl", "c.jsonl.gz", "d.parquet"]
    assert list(iter_texts([d])) == docs
    assert {x.lang for x in iter_documents(d / "b.jsonl")} == {"x"}
    assert {x.lang for x in iter_documents(d / "d.parquet")} == {"y"}


def test_not_utf8(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("line one\ncafé au lait".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"not valid UTF-8 \(byte 0xe9 at offset 12, line 2\)"):
        list(iter_documents(p))


def test_bad_jsonl_and_parquet(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(CorpusError, match=r"x.jsonl:2: expected an object with a string 'text'"):
        list(iter_documents(p))
    p.write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(CorpusError, match=r"x.jsonl:2: invalid JSON"):
        list(iter_documents(p))
    q = tmp_path / "y.parquet"
    q.write_bytes(b"PAR1 not really")
    with pytest.raises(CorpusError, match="not a readable Parquet"):
        list(iter_documents(q))
    z = tmp_path / "z.jsonl.xz"
    z.write_bytes(b"not xz")
    with pytest.raises(CorpusError, match="cannot decompress"):
        list(iter_documents(z))


def test_missing_empty_unsupported(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        expand_inputs([tmp_path / "nope"])
    with pytest.raises(CorpusError, match="no corpus files"):
        expand_inputs([tmp_path])
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    with pytest.raises(CorpusError, match="unsupported file type"):
        expand_inputs([tmp_path / "img.png"])
