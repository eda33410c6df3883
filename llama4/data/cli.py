"""``llama4 data ...``: argument parsing only; the work is in :mod:`llama4.data.shards`."""

from __future__ import annotations

import argparse
import time


def _prepare(a: argparse.Namespace) -> int:
    from llama4.data.shards import prepare_embedded_corpus, tokenize_files
    from llama4.tokenizer import load_tokenizer

    tok = load_tokenizer(a.tokenizer)
    t0 = time.perf_counter()
    if a.corpus:
        m = tokenize_files(a.corpus, tok, a.out, text_key=a.text_key, workers=a.workers)
    else:
        m = prepare_embedded_corpus(tok, a.out, a.val_fraction, workers=a.workers)
    dt = time.perf_counter() - t0
    for split in ("train", "val"):
        shards = [s for s in m["shards"] if s["split"] == split]
        if shards:
            n = sum(s["n_tokens"] for s in shards)
            b = sum(s["text_bytes"] for s in shards)
            print(f"{split}: {len(shards)} shards, {n:,} tokens, {b / 1e6:.1f} MB text")
    print(f"wrote {a.out}/manifest.json in {dt:.1f}s")
    return 0


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser("data", help="tokenize corpora into training shards")
    sub = p.add_subparsers(dest="data_command", required=True)
    t = sub.add_parser("prepare", help="tokenize a corpus into uint32 shards + manifest.json")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--tokenizer", default=None, help="tokenizer file/folder (default: Llama 4's)")
    t.add_argument("--corpus", nargs="*", default=None,
                   help="text/JSONL/Parquet files or folders (default: the embedded corpus, "
                   "split per language into train/val)")  # fmt: skip
    t.add_argument("--text-key", default="text", help="JSONL field / Parquet column of the text")
    t.add_argument("--val-fraction", type=float, default=0.05)
    t.add_argument("--workers", type=int, default=2, help="tokenizer processes")
    t.set_defaults(func=_prepare)
