"""Inference on an accelerator: correctness checks, then decode/prefill against HF on the device.

    python benchmarks/bench_infer_device.py [--device cuda] [--skip-hf] [--compile]

Checks (float32): incremental decode == full forward at every step (tiny chunk, tiny floor_scale:
chunk crossings and temperature steps; prefill pieces use the non-CPU log-sum-exp path); greedy
tokens on the device == on the CPU; 32 decode + sampling steps raise nothing under
``torch.cuda.set_sync_debug_mode("error")`` (no host-device synchronisation). Then the 23M
benchmark shape: decode tokens/s at batch 1 and 8 (float32 and bfloat16) and a 32k prefill with
peak device memory, ours vs transformers on the same checkpoint. ``--compile`` adds our
torch.compile'd decode step (``generate(compile=True)``) and checks its tokens against eager.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import llama4
from llama4.infer import KVCache, Sampler, SamplingParams, generate
from llama4.model import ModelArgs, Transformer

from bench_decode import bench_args  # benchmarks/ is on sys.path when run as a script

TINY = dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4, top_k=1,
            expert_dim=32, dense_dim=96, interleave_moe_layer_step=2, nope_layer_interval=2,
            attention_chunk_size=8, floor_scale=4.0, max_seq_len=4096)


def o1(m: Transformer) -> Transformer:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "tok_emb" in n else p.shape[1] ** -0.5))
    return m.eval()


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def checks(dev) -> None:
    cpu = o1(Transformer(ModelArgs(**TINY)))
    m = o1(Transformer(ModelArgs(**TINY))).to(dev)
    seq = torch.randint(0, 256, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(seq.to(dev))[0]
        worst = 0.0
        for piece, pre in ((3, 13), (16, 30), (1, 1)):
            c = KVCache.for_model(m, 1, 8)
            lg = c.prefill(m, seq[:, :pre].to(dev), 0, piece=piece)
            c.set_decoding(0, True)
            worst = max(worst, (lg[0] - ref[pre - 1]).abs().max().item())
            for t in range(pre, 60):
                lg = c.decode(m, seq[:, t:t + 1].to(dev))
                worst = max(worst, (lg[0] - ref[t]).abs().max().item())
    print(f"[check] incremental decode vs full forward on {dev}: max |diff| {worst:.2e} "
          f"(logit scale {ref.abs().max().item():.1f}) -> {'OK' if worst <= 1e-4 else 'FAIL'}")
    ps = [seq[0, :5].tolist(), seq[0, :17].tolist()]
    a, b = generate(m, ps, 24), generate(cpu, ps, 24)
    print(f"[check] greedy tokens on {dev} == on cpu: {a == b}")
    if dev.type == "cuda":
        c = KVCache.for_model(m, 2, 64)
        sampler = Sampler(2, dev)
        sampler.set_row(0, SamplingParams(temperature=0.8, top_p=0.9, seed=1))
        sampler.set_row(1, SamplingParams())
        with torch.no_grad():
            for r in range(2):
                c.prefill(m, torch.tensor([ps[r]], device=dev), r)
                c.set_decoding(r, True)
            tok = torch.zeros(2, dtype=torch.long, device=dev)
            from llama4.infer.step import DecodeStep

            step = DecodeStep(m)
            tok = sampler(c.decode(step, tok.view(2, 1)))  # first step builds the per-row tensors
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(32):
                    tok = sampler(c.decode(step, tok.view(2, 1)))
                ok = "OK: no synchronising call"
            except RuntimeError as e:
                ok = f"FAIL: {e}"
            finally:
                torch.cuda.set_sync_debug_mode(0)
        print(f"[check] 32 decode+sample steps under set_sync_debug_mode('error'): {ok}")


def bench(dev, skip_hf: bool, compile: bool) -> None:
    from transformers import Llama4ForCausalLM

    args = bench_args()  # the 23M benchmark shape
    torch.manual_seed(0)
    src = Transformer(args)
    src.init_weights()
    with tempfile.TemporaryDirectory() as d:
        llama4.save(src, d)
        models = {"ours fp32": llama4.load(d, device=dev).eval(),
                  "ours bf16": llama4.load(d, dtype=torch.bfloat16, device=dev).eval()}
        if not skip_hf:
            hf = Llama4ForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa").to(dev).eval()
            hf.generation_config.eos_token_id = None
            hf.generation_config.pad_token_id = 0
    prompt = torch.randint(0, 8192, (8, 512), generator=torch.Generator().manual_seed(0))
    n = 64

    def run(name, B, k):
        if name.startswith("HF"):
            x = prompt[:B].to(dev)
            with torch.no_grad():
                return hf.generate(x, max_new_tokens=k, do_sample=False, attention_mask=torch.ones_like(x))
        return generate(models[name.removesuffix(" compiled")], prompt[:B].tolist(), k,
                        compile=name.endswith("compiled"))

    names = list(models) + [f"{m} compiled" for m in models if compile] + ([] if skip_hf else ["HF fp32"])
    print("\n| batch | implementation | decode tokens/s | tokens == eager |")
    print("|---|---|---|---|")
    for B in (1, 8):
        for name in names:
            run(name, B, 2)
            sync(dev)
            t = time.perf_counter()
            run(name, B, 1)
            sync(dev)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            out = run(name, B, n + 1)
            sync(dev)
            tn = time.perf_counter() - t
            same = out == run(name.removesuffix(" compiled"), B, n + 1) if name.endswith("compiled") else ""
            print(f"| {B} | {name} | {B * n / (tn - t1):.0f} | {same} |", flush=True)
    if dev.type != "cuda":
        return
    print("\n| prefill 32k | seconds | peak device memory |")
    print("|---|---|---|")
    long = torch.randint(0, 8192, (1, 32768), generator=torch.Generator().manual_seed(2))
    for name in ["ours fp32"] + ([] if skip_hf else ["HF fp32"]):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        if name.startswith("HF"):
            with torch.no_grad():
                hf.generate(long.to(dev), max_new_tokens=1, do_sample=False)
        else:
            generate(models[name], long[0].tolist(), 1)
        sync(dev)
        print(f"| {name} | {time.perf_counter() - t:.2f} | {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode step")
    a = p.parse_args()
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device {dev} ({name}), torch {torch.__version__}")
    checks(dev)
    bench(dev, a.skip_hf, a.compile)


if __name__ == "__main__":
    main()
