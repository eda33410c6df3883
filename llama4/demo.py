"""The README's main job until training lands: a tour of what the package does today.

Builds the debug flavor on the meta device, materialises it, reports parameter counts for every
flavor, round-trips the weights through the Hugging Face layout and greedily decodes a few tokens.
"""

from __future__ import annotations

import json
import pathlib
import time

import torch

import llama4
from llama4.model import FLAVORS, Transformer, count_params, flavor


def run_demo(out_dir: str = "runs/demo", seed: int = 0) -> int:
    torch.manual_seed(seed)
    print("parameter counts (meta device, nothing allocated):")
    for name in FLAVORS:
        c = count_params(flavor(name))
        print(f"  {name:9s} total {c['total'] / 1e9:9.3f}B   active {c['active'] / 1e9:8.3f}B")

    args = flavor("debug")
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights()
    model.eval()
    moe_layers = [i for i in range(args.n_layers) if args.is_moe_layer(i)]
    nope_layers = [i for i in range(args.n_layers) if args.is_nope_layer(i)]
    print(f"debug model: {args.n_layers} layers (MoE {moe_layers}, NoPE {nope_layers}), "
          f"{args.n_experts} experts top-{args.top_k} + shared, chunk {args.attention_chunk_size}")

    out = pathlib.Path(out_dir)
    t = time.perf_counter()
    llama4.save(model, out)
    loaded = llama4.load(out)
    print(f"saved + reloaded HF checkpoint at {out} in {time.perf_counter() - t:.2f}s: "
          f"{sorted(p.name for p in out.iterdir())}")

    prompt = torch.randint(0, args.vocab_size, (1, 3 * args.attention_chunk_size))
    diff = (model(prompt) - loaded(prompt)).abs().max().item()
    print(f"logits after the round trip, max abs diff: {diff:.1e}")
    t = time.perf_counter()
    tokens = llama4.generate(loaded, prompt[0].tolist(), max_new_tokens=8)  # greedy, KV cache
    print(f"greedy continuation of a {prompt.shape[1]}-token prompt: {tokens} "
          f"({time.perf_counter() - t:.2f}s)")
    print(json.dumps({"debug_params": count_params(args), "roundtrip_max_abs_diff": diff}))
    return 0 if diff == 0.0 else 1
