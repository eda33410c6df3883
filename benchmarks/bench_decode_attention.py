"""Decode attention: one query per row over a grouped-KV cache, torch's ``enable_gqa`` SDPA against
ours (``llama4.model.attention.one_query_attention``: a KV head's query heads attend as its rows).

    .venv/bin/python benchmarks/bench_decode_attention.py [--threads 1] [--reps 7]

The benchmark shape's attention (8 query heads on 2 KV heads, head_dim 32), eager, at batch 1 and
8, over 576 keys (a 512-token prompt plus 64, no mask: the dynamic cache) and 1024 keys with a
mask (the static cache a compiled step reads); microseconds per call, best of ``--reps``, the two
alternating; outputs checked equal.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from bench_quant import cpu_name  # noqa: E402

from llama4.model.attention import one_query_attention  # noqa: E402


def per_call(fn, n: int = 300) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# {cpu_name()}; threads {torch.get_num_threads()}; torch {torch.__version__}\n")
    print("| batch | keys | mask | enable_gqa us | one_query_attention us | speed-up |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for B, S, masked in ((1, 576, False), (1, 1024, True), (8, 576, False), (8, 1024, True)):
        q = torch.randn(B, 8, 1, 32, generator=g)
        k, v = torch.randn(B, 2, S, 32, generator=g), torch.randn(B, 2, S, 32, generator=g)
        mask = (torch.arange(S) <= S - 64).view(1, 1, 1, S).expand(B, 1, 1, S) if masked else None
        cands = {"gqa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                 "ours": lambda: one_query_attention(q, k, v, mask)}
        torch.testing.assert_close(cands["ours"](), cands["gqa"](), rtol=1e-5, atol=1e-5)
        best = dict.fromkeys(cands, float("inf"))
        for _ in range(a.reps):  # alternate: a shared machine only adds time
            for name, f in cands.items():
                best[name] = min(best[name], per_call(f))
        print(f"| {B} | {S} | {'yes' if masked else 'no'} | {best['gqa'] * 1e6:.1f} | {best['ours'] * 1e6:.1f} | "
              f"{best['gqa'] / best['ours']:.2f}x |")


if __name__ == "__main__":
    main()
