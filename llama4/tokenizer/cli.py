"""``llama4 tokenizer ...``: argument parsing only; the work is in :mod:`llama4.tokenizer.bpe`."""

from __future__ import annotations

import argparse
import time


def _train(a: argparse.Namespace) -> int:
    from llama4.data.corpus import iter_corpus
    from llama4.data.readers import iter_texts
    from llama4.tokenizer.bpe import train_tokenizer_file

    if a.corpus:
        texts = iter_texts(a.corpus, a.text_key)
        source = ", ".join(a.corpus)
    else:
        texts = (d.text for d in iter_corpus("train"))
        source = "embedded corpus (train split)"
    t0 = time.perf_counter()
    tok = train_tokenizer_file(texts, a.vocab_size, a.out, a.min_frequency, show_progress=True)
    n_base = tok.n_words - len(tok.special_tokens)
    print(
        f"wrote {a.out}: {n_base} learned tokens + {len(tok.special_tokens)} special = "
        f"{tok.n_words} (bos={tok.bos_id}, eot={tok.eot_id}) from {source} "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    if not a.corpus:
        val = "".join(d.text for d in iter_corpus("val"))
        n = len(tok.encode(val))
        print(f"held-out text: {len(val.encode('utf-8')) / n:.2f} bytes/token over {n} tokens")
    return 0


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train our own byte-level BPE tokenizer")
    sub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = sub.add_parser(
        "train",
        help="learn a byte-level BPE with Llama 4's split pattern and special tokens",
        description="Writes a tiktoken-format file; the 2048 Llama 4 special tokens follow the "
        "learned vocabulary, so --vocab-size is the model's full vocabulary.",
    )
    t.add_argument(
        "--corpus",
        nargs="*",
        default=None,
        help="text/JSONL/Parquet files or folders (default: the embedded corpus)",
    )
    t.add_argument("--vocab-size", type=int, required=True, help="total ids incl. 2048 specials")
    t.add_argument("--out", required=True, help="output tokenizer file (tiktoken format)")
    t.add_argument("--min-frequency", type=int, default=2, help="least count for a merge")
    t.add_argument("--text-key", default="text", help="JSONL field / Parquet column of the text")
    t.set_defaults(func=_train)
