"""A 256k-token prompt on the debug flavor: chunked prefill, then keep decoding.

    .venv/bin/python benchmarks/bench_prefill_long.py [--tokens 262144] [--piece 2048] [--new 32]

Prefill runs in pieces, so memory is weights + KV + O(piece): the chunked (RoPE) layers keep one
chunk, the global (NoPE) layers the whole history, and no (T x T) mask or score matrix ever
exists. Prints the time, the KV bytes, the peak RSS and the decode speed at that context, plus
what a naive cache (every layer keeps everything) would hold.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from llama4.infer import KVCache, Sampler
from llama4.model import Transformer, count_params, flavor, kv_bytes_per_token


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=262144)
    p.add_argument("--piece", type=int, default=2048)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    args = flavor("debug")
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load avg {os.getloadavg()}")
    print(f"debug flavor: {count_params(args)['total'] / 1e6:.1f}M params, {args.n_layers} layers "
          f"(NoPE {[i for i in range(args.n_layers) if args.is_nope_layer(i)]}), chunk {args.attention_chunk_size}, "
          f"float32, prompt {a.tokens} tokens in pieces of {a.piece}")
    torch.manual_seed(0)
    model = Transformer(args)
    model.init_weights()
    model.eval()
    prompt = torch.randint(0, args.vocab_size, (1, a.tokens))
    rss0 = rss_gib()
    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, a.tokens + a.new)
        t0 = time.perf_counter()
        last = t0
        logits = None
        for s in range(0, a.tokens, a.piece):
            logits = cache.prefill(model, prompt[:, s:s + a.piece], 0, piece=a.piece)
            if time.perf_counter() - last > 30:
                last = time.perf_counter()
                print(f"  {s + a.piece:7d} tokens  {last - t0:7.1f}s  rss {rss_gib():.2f} GiB", flush=True)
        t_prefill = time.perf_counter() - t0
        cache.set_decoding(0, True)
        sampler = Sampler(1)
        tok = sampler(logits)
        out = [tok]
        t1 = time.perf_counter()
        for _ in range(a.new - 1):
            tok = sampler(cache.decode(model, tok.view(1, 1)))
            out.append(tok)
        ids = torch.cat(out).tolist()
        t_decode = time.perf_counter() - t1
    with open("/proc/self/status") as f:  # VmHWM: this address space's peak (ru_maxrss survives exec)
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    kv = cache.nbytes()
    per_tok = kv_bytes_per_token(args, dtype_bytes=4)
    naive = per_tok["all_layers"] * (a.tokens + a.new)
    print(f"\n| prompt tokens | prefill | prefill tok/s | decode ms/token at this context | KV held | "
          f"naive KV (all layers) | peak RSS (weights {sum(p.numel() for p in model.parameters()) * 4 / 2**20:.0f} MiB, "
          f"start {rss0:.2f} GiB) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {a.tokens:,} | {t_prefill:.1f} s | {a.tokens / t_prefill:.0f} | {t_decode / (a.new - 1) * 1e3:.1f} | "
          f"{kv / 2**20:.0f} MiB | {naive / 2**20:.0f} MiB | {peak:.2f} GiB |")
    print(f"decoded {len(ids)} tokens after the prompt: {ids[:8]} ...")


if __name__ == "__main__":
    main()
