"""Tokenizer throughput against Meta's llama-models tokenizer, and data-loader time per step.

    python benchmarks/bench_tokenizer.py [--mb 4] [--hf] [--repeat 3]

Text: the embedded multilingual corpus (all 447 languages, the same bytes for every engine).
Every engine's ids are checked against Meta's before its speed is printed. Single-call numbers
run on one thread; ``encode_batch`` uses the number of threads printed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=4.0, help="MB of corpus text to encode")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="threads for encode_batch")
    ap.add_argument("--hf", action="store_true", help="also time a tokenizer.json (tokenizers lib)")
    ap.add_argument("--no-loader", action="store_true")
    a = ap.parse_args()

    import torch
    from llama_models.llama4.tokenizer import Tokenizer as MetaTokenizer

    from llama4.data.corpus import load_documents
    from llama4.tokenizer import load_tokenizer

    docs, size = [], 0
    for d in load_documents()[::2] + load_documents()[1::2]:  # interleave help pages and UDHR
        docs.append(d.text)
        size += len(d.text.encode("utf-8"))
        if size >= a.mb * 1e6:
            break
    mb = size / 1e6
    print(f"cpu count {os.cpu_count()}, torch threads {torch.get_num_threads()}, "
          f"encode_batch threads {a.threads}; text {mb:.2f} MB in {len(docs)} documents")  # fmt: skip

    ours = load_tokenizer()
    meta = MetaTokenizer(ours.path)
    want = [meta.encode(t, bos=False, eos=False) for t in docs]
    n_tok = sum(map(len, want))
    print(f"tokens {n_tok:,} ({size / n_tok:.2f} bytes/token)")

    rows = []
    t = _best(lambda: [meta.encode(x, bos=False, eos=False) for x in docs], a.repeat)
    rows.append(("llama-models Tokenizer.encode", t))
    assert [ours.encode(x) for x in docs] == want
    rows.append(("llama4 Tokenizer.encode", _best(lambda: [ours.encode(x) for x in docs], a.repeat)))
    assert ours.encode_batch(docs, num_threads=a.threads) == want
    t = _best(lambda: ours.encode_batch(docs, num_threads=a.threads), a.repeat)
    rows.append((f"llama4 Tokenizer.encode_batch ({a.threads} threads)", t))

    if a.hf:
        from transformers.convert_slow_tokenizer import TikTokenConverter

        from llama4.tokenizer import SPECIAL_TOKEN_NAMES, SPLIT_PATTERN

        with tempfile.TemporaryDirectory() as tmp:
            conv = TikTokenConverter(vocab_file=str(ours.path), pattern=SPLIT_PATTERN,
                                     extra_special_tokens=list(SPECIAL_TOKEN_NAMES))  # fmt: skip
            conv.converted().save(os.path.join(tmp, "tokenizer.json"))
            hf = load_tokenizer(tmp)
            assert [hf.encode(x) for x in docs] == want
            rows.append(("llama4 (tokenizer.json) encode", _best(lambda: [hf.encode(x) for x in docs], a.repeat)))
            t = _best(lambda: hf.encode_batch(docs), a.repeat)
            rows.append(("llama4 (tokenizer.json) encode_batch (rayon)", t))

    base = rows[0][1]
    print(f"\n| engine | MB/s | vs llama-models |\n|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {mb / t:.2f} | {base / t:.2f}x |")

    if a.no_loader:
        return
    from llama4.data import PackedLoader, prepare_embedded_corpus

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        m = prepare_embedded_corpus(ours, tmp, workers=2, progress=False)
        dt = time.perf_counter() - t0
        text_mb = sum(s["text_bytes"] for s in m["shards"]) / 1e6
        n = sum(s["n_tokens"] for s in m["shards"])
        print(f"\nprepare embedded corpus (`llama4 data prepare`): {text_mb:.1f} MB -> {n:,} tokens "
              f"in {dt:.1f}s ({text_mb / dt:.2f} MB/s end to end)")  # fmt: skip
        print("\n| batch x seq_len | loader ms/step | tokens/s the loader can feed |\n|---|---|---|")
        for bsz, seq in [(8, 512), (32, 2048), (64, 4096)]:
            loader = PackedLoader(tmp, bsz, seq, seed=0)
            loader.next_batch()
            steps = 50
            t0 = time.perf_counter()
            for _ in range(steps):
                loader.next_batch()
            per = (time.perf_counter() - t0) / steps
            print(f"| {bsz} x {seq} | {per * 1e3:.3f} | {bsz * seq / per / 1e6:.1f}M |")


if __name__ == "__main__":
    main()
