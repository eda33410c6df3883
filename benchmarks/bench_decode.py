"""Decode and prefill against Hugging Face transformers, same HF checkpoint, same thread settings.

    .venv/bin/python benchmarks/bench_decode.py [--threads 1] [--new 64] [--compile]
                                                [--prefill 2048 8192 32768]

The checkpoint is the issue's 23M-parameter shape (hidden 256, 8 layers, 8 experts top-1, MoE
every 2nd layer, vocab 8192, chunk 256), written once with ``llama4.save`` and read by both
``llama4.load`` and ``Llama4ForCausalLM.from_pretrained``.

* decode: greedy tokens/s at batch 1 and 8 after a 512-token prompt, measured as
  (time of generate(N+1) - time of generate(1)) so prefill cancels; ours and HF alternate in one
  process and the best of ``--reps`` counts. Tokens are checked equal to HF's.
* roofline: the bytes one decode step must read (the weights its tokens touch + their KV at that
  context) over this machine's measured single-thread read bandwidth, per batch size: a batch-8
  step reads more experts and 8 rows of KV, so its roofline is not 8x batch 1's.
* prefill: time and peak RSS of generate(max_new_tokens=1) on 2k/8k/32k-token prompts, each in
  a fresh child process (peak RSS is per process), ours and HF alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import llama4
from llama4.model import ModelArgs, count_params, kv_bytes_per_token

PROMPT = 512


def bench_args() -> ModelArgs:
    return ModelArgs(vocab_size=8192, dim=256, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=32, n_experts=8,
                     top_k=1, expert_dim=512, dense_dim=1024, interleave_moe_layer_step=2, nope_layer_interval=4,
                     attention_chunk_size=256, floor_scale=8192.0, max_seq_len=65536)


def setup_threads(n: int) -> str:
    torch.set_num_threads(n)
    torch.set_flush_denormal(True)
    return (f"threads={torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
            f"torch {torch.__version__}")


def read_bandwidth() -> float:
    """Best single-thread read bandwidth over a 1 GiB float32 tensor (GB/s)."""
    x = torch.ones(1 << 28)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.nbytes / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def decode_step_bytes(args: ModelArgs, context: int, batch: int = 1, dtype_bytes: int = 4) -> int:
    """What one decode step over ``batch`` rows must read: every weight the step touches
    (embedding: one row per token; MoE: router, shared expert and the routed experts chosen by at
    least one token, expected E * (1 - (1 - k/E)^batch) of E under uniform routing) plus the KV
    each row attends to."""
    c = count_params(args)
    E, k = args.n_experts, args.top_k
    routed = (c["total"] - c["active"]) * E // (E - k) if E > k else 0  # all routed expert weights
    weights = c["active"] - (args.vocab_size - batch) * args.dim - routed * k // max(E, 1)
    weights += round(routed * (1 - (1 - k / E) ** batch)) if E else 0
    kv = kv_bytes_per_token(args, dtype_bytes)
    per_slot = kv["all_layers"] // args.n_layers
    n_global = kv["global_layers"] // per_slot
    kv_read = kv["global_layers"] * context + per_slot * (args.n_layers - n_global) * min(
        context, args.attention_chunk_size or context)
    return weights * dtype_bytes + batch * kv_read


# --- decode ------------------------------------------------------------------------------------

def bench_decode(ckpt: str, args: ModelArgs, n_new: int, reps: int, compile: bool) -> list[dict]:
    from transformers import Llama4ForCausalLM

    ours = llama4.load(ckpt).eval()
    hf = Llama4ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    hf.generation_config.eos_token_id = None  # exactly the requested number of tokens
    hf.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, args.vocab_size, (8, PROMPT), generator=g)

    def hf_gen(B, n):
        with torch.no_grad():
            out = hf.generate(prompt[:B], max_new_tokens=n, do_sample=False,
                              attention_mask=torch.ones(B, PROMPT, dtype=torch.long))
        return out[:, PROMPT:].tolist()

    impls = {"HF transformers": hf_gen,
             "ours (eager)": lambda B, n: llama4.generate(ours, prompt[:B].tolist(), n)}
    if compile:
        impls["ours (torch.compile)"] = lambda B, n: llama4.generate(ours, prompt[:B].tolist(), n, compile=True)
    rows = []
    for B in (1, 8):
        best = {k: float("inf") for k in impls}
        tokens = {}
        for name, fn in impls.items():  # warm-up (and compile)
            fn(B, 2)
        for _ in range(reps):
            for name, fn in impls.items():
                t1 = _timed(lambda: fn(B, 1))
                t = time.perf_counter()
                tokens[name] = fn(B, n_new + 1)
                tn = time.perf_counter() - t
                best[name] = min(best[name], tn - t1)
        for name in impls:
            same = tokens[name] == tokens["HF transformers"]
            rows.append(dict(batch=B, impl=name, tok_s=B * n_new / best[name], same_as_hf=same))
    return rows


# --- prefill (child processes) -----------------------------------------------------------------

def peak_rss_gib() -> float:
    """This process's peak RSS (VmHWM: per address space, so unlike ru_maxrss it does not inherit
    the parent's peak across fork + exec)."""
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kb / 2**20


def child_prefill(ckpt: str, impl: str, length: int) -> dict:
    rss_before = peak_rss_gib()
    if impl == "hf":
        from transformers import Llama4ForCausalLM

        model = Llama4ForCausalLM.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
    else:
        model = llama4.load(ckpt).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 8192, (1, length), generator=g)
    rss_loaded = peak_rss_gib()
    t = time.perf_counter()
    if impl == "hf":
        with torch.no_grad():
            tok = model.generate(prompt, max_new_tokens=1, do_sample=False,
                                 attention_mask=torch.ones_like(prompt))[0, -1].item()
    else:
        tok = llama4.generate(model, prompt[0].tolist(), 1)[0]
    dt = time.perf_counter() - t
    return dict(impl=impl, length=length, seconds=dt, peak_gib=peak_rss_gib(), loaded_gib=rss_loaded,
                start_gib=rss_before, token=tok)


def bench_prefill(ckpt: str, lengths: list[int], threads: int) -> list[dict]:
    rows = []
    for length in lengths:
        for impl in ("ours", "hf"):
            out = subprocess.run([sys.executable, __file__, "--child", impl, "--length", str(length),
                                  "--ckpt", ckpt, "--threads", str(threads)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"  prefill {impl:4s} {length:6d}: {r['seconds']:7.2f} s, peak RSS {r['peak_gib']:.2f} GiB "
                  f"(after loading {r['loaded_gib']:.2f} GiB)", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time ours with a torch.compile'd decode step")
    p.add_argument("--prefill", type=int, nargs="*", default=[2048, 8192, 32768])
    p.add_argument("--child", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    a = p.parse_args()
    settings = setup_threads(a.threads)
    if a.child:
        print(json.dumps(child_prefill(a.ckpt, a.child, a.length)))
        return

    args = bench_args()
    c = count_params(args)
    print(f"{settings}, load avg {os.getloadavg()}, float32")
    print(f"model: {c['total'] / 1e6:.1f}M params ({c['active'] / 1e6:.1f}M active), hidden {args.dim}, "
          f"{args.n_layers} layers, {args.n_experts} experts top-{args.top_k}, MoE every "
          f"{args.interleave_moe_layer_step}nd layer, vocab {args.vocab_size}, chunk {args.attention_chunk_size}")
    bw = read_bandwidth()
    ctx = PROMPT + a.new // 2
    print(f"read bandwidth {bw:.1f} GB/s (1 thread)")
    roof = {}
    for B in (1, 8):
        step_bytes = decode_step_bytes(args, ctx, B)
        roof[B] = B * bw * 1e9 / step_bytes
        print(f"a batch-{B} decode step reads {step_bytes / 1e6:.1f} MB at context {ctx} "
              f"-> roofline {roof[B]:.0f} tokens/s")
    with tempfile.TemporaryDirectory() as ckpt:
        torch.manual_seed(0)
        model = llama4.Transformer(args)
        model.init_weights()
        llama4.save(model, ckpt)
        del model
        rows = bench_decode(ckpt, args, a.new, a.reps, a.compile)
        hf1 = next(r["tok_s"] for r in rows if r["batch"] == 1 and r["impl"].startswith("HF"))
        print(f"\ndecode after a {PROMPT}-token prompt, {a.new} new tokens, greedy ({settings})\n")
        print("| batch | implementation | tokens/s | vs HF batch 1 | vs our batch 1 | % of roofline | "
              "tokens == HF |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            own1 = next(x["tok_s"] for x in rows if x["batch"] == 1 and x["impl"] == r["impl"])
            roof_s = f"{100 * r['tok_s'] / roof[r['batch']]:.0f}%"
            print(f"| {r['batch']} | {r['impl']} | {r['tok_s']:.0f} | {r['tok_s'] / hf1:.2f}x | "
                  f"{r['tok_s'] / own1:.2f}x | {roof_s} | {r['same_as_hf']} |")
        for r in rows:
            if r["batch"] == 1 and not r["impl"].startswith("HF"):
                print(f"batch 8 at 4x {r['impl']} batch 1 = {4 * r['tok_s']:.0f} tokens/s = "
                      f"{100 * 4 * r['tok_s'] / roof[8]:.0f}% of the batch-8 roofline")
        if a.prefill:
            print(f"\nprefill (generate with max_new_tokens=1), each run in a fresh process ({settings})")
            pre = bench_prefill(ckpt, a.prefill, a.threads)
            print("\n| prompt | ours | HF | speed-up | ours peak RSS | HF peak RSS | memory ratio | same token |")
            print("|---|---|---|---|---|---|---|---|")
            for length in a.prefill:
                o = next(r for r in pre if r["impl"] == "ours" and r["length"] == length)
                h = next(r for r in pre if r["impl"] == "hf" and r["length"] == length)
                print(f"| {length:,} | {o['seconds']:.2f} s | {h['seconds']:.2f} s | {h['seconds'] / o['seconds']:.1f}x | "
                      f"{o['peak_gib']:.2f} GiB | {h['peak_gib']:.2f} GiB | {o['peak_gib'] / h['peak_gib']:.2f} | "
                      f"{o['token'] == h['token']} |")
    print(f"\nload avg at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
