"""Forward+backward tokens/s: our Transformer vs transformers' Llama4ForCausalLM, same weights.

    .venv/bin/python benchmarks/bench_train_step.py [--threads 1] [--seq 512] [--batch 4]

Both models run in this process on identical weights (ours saved with ``llama4.save`` and read by
``from_pretrained``), under the same thread settings, alternating so machine load hits both alike.
HF runs every expert on every token; we run only the selected ones.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import llama4
from llama4.model import ModelArgs, Transformer, count_params

# name -> MoE interleave step. Scout-like: MoE in every layer. Maverick-like: every 2nd layer.
SHAPES = {"scout-like": 1, "maverick-like": 2}


def make_args(step: int) -> ModelArgs:
    return ModelArgs(vocab_size=8192, dim=256, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=32,
                     n_experts=16, top_k=1, expert_dim=512, dense_dim=1024, interleave_moe_layer_step=step,
                     nope_layer_interval=4, attention_chunk_size=128, floor_scale=8192.0)


def executed_flops_ratio(args: ModelArgs) -> float:
    """Matmul FLOPs per token HF executes (all experts) over ours (top-k), attention excluded."""
    c = count_params(args)
    n_moe = sum(args.is_moe_layer(i) for i in range(args.n_layers))
    per_expert = 3 * args.dim * args.expert_dim
    dense_all = c["active"] + n_moe * (args.n_experts - args.top_k) * per_expert
    return dense_all / c["active"]


def time_step(model, tokens, hf: bool) -> float:
    t = time.perf_counter()
    logits = model(tokens).logits if hf else model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten()).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def bench(name: str, args: ModelArgs, batch: int, seq: int, reps: int) -> dict:
    from transformers import Llama4ForCausalLM

    torch.manual_seed(0)
    ours = Transformer(args)
    ours.init_weights()
    with tempfile.TemporaryDirectory() as d:
        llama4.save(ours, d)
        hf = Llama4ForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="sdpa")
    tokens = torch.randint(0, args.vocab_size, (batch, seq))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    t_ours, t_hf = [], []
    time_step(ours, tokens, False), time_step(hf, tokens, True)  # warm-up
    for _ in range(reps):
        t_ours.append(time_step(ours, tokens, False))
        t_hf.append(time_step(hf, tokens, True))
    to, th = min(t_ours), min(t_hf)
    n = batch * seq
    return dict(shape=name, ours=n / to, hf=n / th, ratio=th / to, flops=executed_flops_ratio(args), diff=diff)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, batch {a.batch} x seq {a.seq}, fp32")
    rows = [bench(name, make_args(step), a.batch, a.seq, a.reps) for name, step in SHAPES.items()]
    print("\n| shape | ours tok/s | HF tok/s | speed-up | HF/ours expert FLOPs | logits max diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['ours']:.0f} | {r['hf']:.0f} | **{r['ratio']:.2f}x** | {r['flops']:.1f}x "
              f"| {r['diff']:.1e} |")


if __name__ == "__main__":
    main()
