"""Training tokens/s and MFU of our training step, and the step-time ratio vs transformers.

    .venv/bin/python benchmarks/bench_train_mfu.py [--threads 1] [--reps 3] [--shapes default,scout-like,...]

One training step = forward, cross-entropy (+ our MoE balance and z-losses), backward, gradient
clipping, AdamW: what ``llama4 train`` runs per step. HF's ``Llama4ForCausalLM`` gets the same
config and weights (ours saved with ``llama4.save``, read by ``from_pretrained``) and the same
step (CE, clip, AdamW); both run in this process under the same thread settings, alternating, so
machine load hits both alike; each time is the best of ``--reps``.

MFU = model FLOPs/token (``llama4/train/flops.py``: 6 x active matmul weights + attention) x
tokens/s / the best fp32 matmul rate measured here with the same threads. HF's MFU uses the same
model FLOPs, although it executes every expert on every token.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import llama4
from llama4.model import ModelArgs, Transformer, count_params
from llama4.recipes import get_recipe
from llama4.train import losses
from llama4.train.flops import train_flops_per_token


def shapes() -> dict[str, tuple[ModelArgs, int, int]]:
    """name -> (model args, batch, seq). ``default`` is the README recipe's model and batch."""
    d = get_recipe("default")
    s = get_recipe("scout-like")
    return {
        "default": (d.model, d.batch_size, d.seq_len),
        "scout-like (16 experts, MoE every layer, hidden 512)": (s.model, s.batch_size, s.seq_len),
        "dense, hidden 512": (s.model.replace(n_experts=0, dense_dim=2 * s.model.expert_dim), s.batch_size,
                              s.seq_len),
    }


def matmul_peak(threads: int, n: int = 2048, reps: int = 5) -> float:
    """Best fp32 GEMM rate (FLOP/s) over square products of size 1024 and ``n``."""
    best = 0.0
    for size in (1024, n):
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * size ** 3 / (time.perf_counter() - t))
    return best


def make_step(model, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    moe = [] if hf else losses.moe_layers(model)
    if not hf:
        losses.record_router_stats(model)

    def step(x, y):
        t = time.perf_counter()
        logits = model(x).logits if hf else model(x)
        loss = losses.cross_entropy(logits, y)
        if moe:
            bal, z, _ = losses.router_losses(moe)
            loss = loss + 0.01 * bal + 1e-3 * z
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    return step


def bench(name: str, args: ModelArgs, batch: int, seq: int, reps: int, peak: float, with_hf: bool) -> dict:
    torch.manual_seed(0)
    ours = Transformer(args)
    ours.init_weights()
    hf = None
    if with_hf:
        from transformers import Llama4ForCausalLM

        with tempfile.TemporaryDirectory() as d:
            llama4.save(ours, d)
            hf = Llama4ForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="sdpa")
        hf.train()
    tokens = torch.randint(0, args.vocab_size, (batch, seq + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    step_ours = make_step(ours, False)
    step_hf = make_step(hf, True) if hf is not None else None
    step_ours(x, y)  # warm-up
    if step_hf:
        step_hf(x, y)
    t_ours, t_hf = [], []
    for _ in range(reps):
        t_ours.append(step_ours(x, y))
        if step_hf:
            t_hf.append(step_hf(x, y))
    n = batch * seq
    flops = train_flops_per_token(args, seq)["total"]
    to = min(t_ours)
    row = dict(shape=name, active=count_params(args)["active"], flops=flops, ours_tps=n / to,
               ours_mfu=flops * n / to / peak)
    if t_hf:
        th = min(t_hf)
        row.update(hf_tps=n / th, hf_mfu=flops * n / th / peak, ratio=th / to)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="skip transformers (ours only)")
    p.add_argument("--shapes", default=None, help="comma-separated prefixes of the shape names to run")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    peak = matmul_peak(a.threads)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, fp32; "
          f"measured matmul peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    rows = []
    for name, (args, batch, seq) in shapes().items():
        if a.shapes and not any(name.startswith(s) for s in a.shapes.split(",")):
            continue
        rows.append(bench(name, args, batch, seq, a.reps, peak, not a.no_hf))
        r = rows[-1]
        print(f"  {name}: ours {r['ours_tps']:.0f} tok/s" + (f", HF {r['hf_tps']:.0f} tok/s" if "hf_tps" in r else ""),
              flush=True)
    print("\n| shape | active params | model GFLOP/token | ours tok/s | ours MFU | HF tok/s | HF MFU | step-time ratio HF/ours |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        hf = (f"{r['hf_tps']:.0f} | {100 * r['hf_mfu']:.1f}% | **{r['ratio']:.2f}x**" if "hf_tps" in r
              else "- | - | -")
        print(f"| {r['shape']} | {r['active'] / 1e6:.2f}M | {r['flops'] / 1e9:.3f} | {r['ours_tps']:.0f} | "
              f"{100 * r['ours_mfu']:.1f}% | {hf} |")


if __name__ == "__main__":
    main()
