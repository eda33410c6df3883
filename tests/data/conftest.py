"""Fixtures for the data tests: the official tokenizer and a small prepared shard folder."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def tok():
    from llama4.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def mixed_corpus(tmp_path_factory):
    """A folder with a text file, a JSONL file, a gzipped JSONL file and a Parquet file."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from llama4.data.corpus import iter_corpus

    docs = [d.text for d in iter_corpus("train", langs=("eng", "rus", "cmn", "arb"))][::8]
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(docs[0], encoding="utf-8")
    (d / "b.jsonl").write_text("".join(json.dumps({"text": t, "lang": "x"}) + "\n" for t in docs[1:40]))
    with gzip.open(d / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in docs[40:80]))
    pq.write_table(pa.table({"text": docs[80:], "lang": ["y"] * len(docs[80:])}), d / "d.parquet",
                   row_group_size=7)  # fmt: skip
    return d, docs


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, tok, mixed_corpus):
    from llama4.data.shards import tokenize_files

    out = tmp_path_factory.mktemp("shards")
    tokenize_files([mixed_corpus[0]], tok, out, workers=1, progress=False)
    return out
