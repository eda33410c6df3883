"""Tokenizing corpora into uint32 shards: content, parallel == serial, no partial shards."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llama4.data.readers import CorpusError, iter_texts
from llama4.data.shards import read_manifest, shard_paths, tokenize_files


def test_shards_hold_the_documents(prepared, mixed_corpus, tok):
    m = read_manifest(prepared)
    assert m["dtype"] == "uint32" and m["tokenizer"]["n_words"] == tok.n_words
    assert [s["name"] for s in m["shards"]] == [f"train-{i:05d}" for i in range(4)]
    texts = list(iter_texts([mixed_corpus[0]]))
    got = []
    for s in m["shards"]:
        tok_path, doc_path = shard_paths(prepared, s["name"])
        ids = np.fromfile(tok_path, dtype=np.uint32)
        starts = np.fromfile(doc_path, dtype=np.uint64)
        assert len(ids) == s["n_tokens"] and len(starts) == s["n_docs"] + 1
        for a, b in zip(starts[:-1], starts[1:]):
            doc = ids[a:b].tolist()
            assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id
            got.append(doc)
    assert got == [tok.encode(t, bos=True, eos=True) for t in texts]


def test_parallel_equals_serial(tmp_path, mixed_corpus, tok, prepared):
    tokenize_files([mixed_corpus[0]], tok, tmp_path, workers=2, min_parallel_bytes=0)
    for s in read_manifest(prepared)["shards"]:
        for a, b in zip(shard_paths(prepared, s["name"]), shard_paths(tmp_path, s["name"])):
            assert a.read_bytes() == b.read_bytes()


def test_bad_file_leaves_nothing_behind(tmp_path, mixed_corpus, tok):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.txt", "b.jsonl", "c.jsonl.gz"):
        (src / name).write_bytes((mixed_corpus[0] / name).read_bytes())
    (src / "z_bad.txt").write_bytes(b"ok \xff\xfe broken")
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "stale"}))  # from an older run
    for workers in (1, 2):
        with pytest.raises(CorpusError, match=r"z_bad.txt: not valid UTF-8"):
            tokenize_files([src], tok, out, workers=workers, progress=False, min_parallel_bytes=0)
        assert list(out.iterdir()) == []  # no shard, no temp file, no stale manifest


def test_empty_corpus(tmp_path, tok):
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.txt").write_text("")
    (src / "blank.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(CorpusError, match="the corpus is empty"):
        tokenize_files([src], tok, tmp_path / "out", workers=1, progress=False)
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(CorpusError, match="no manifest.json"):
        read_manifest(tmp_path / "out")
