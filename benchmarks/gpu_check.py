"""One-shot check of the CUDA path: fp32 parity with the CPU, bf16 grouped-GEMM experts vs the
reference loop, SDPA backends on folded chunks, torch.compile, and fwd+bwd throughput vs HF.

    python benchmarks/gpu_check.py            # needs a CUDA device; prints a report
"""

from __future__ import annotations

import json
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

import llama4
from llama4.model import ModelArgs, Transformer
from llama4.model.attention import chunked_causal_attention
from llama4.model.moe import MoE, _grouped_mm_ok

RESULTS: dict = {}


def section(name):
    def wrap(fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                RESULTS[name] = fn(*a, **kw)
            except Exception as e:  # report and go on: one failure must not hide the rest
                RESULTS[name] = {"error": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
            print(f"[{name}] ({time.perf_counter() - t:.1f}s) {RESULTS[name]}", flush=True)
        return run
    return wrap


def shape(step=1) -> ModelArgs:
    # Scout-like, scaled down to fit a quick check: MoE every layer, 16 experts top-1 + shared.
    return ModelArgs(vocab_size=32768, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=64,
                     n_experts=16, top_k=1, expert_dim=1024, dense_dim=4096, interleave_moe_layer_step=step,
                     nope_layer_interval=4, attention_chunk_size=512, floor_scale=1024.0)


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


@section("fp32_cuda_vs_cpu")
def fp32_parity():
    torch.manual_seed(0)
    m = Transformer(shape())
    m.init_weights(std=0.05)
    tok = torch.randint(0, 32768, (2, 1300))
    with torch.no_grad():
        cpu = m(tok)
        gpu = m.cuda()(tok.cuda()).cpu()
    return {"max_abs": (cpu - gpu).abs().max().item(), "logit_std": cpu.std().item()}


@section("bf16_grouped_vs_loop")
def bf16_grouped():
    torch.manual_seed(0)
    moe = MoE(shape()).cuda().to(torch.bfloat16)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=1024 ** -0.5)
    x = torch.randn(4, 2048, 1024, device="cuda", dtype=torch.bfloat16)
    grouped_ok = _grouped_mm_ok(x, moe.experts.w1)
    moe.impl = "grouped"
    y = moe(x)
    y.float().square().mean().backward()
    moe.impl = "loop"
    y_ref = moe(x)
    rel = ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item()
    t_g = timed(lambda: setattr(moe, "impl", "grouped") or moe(x))
    t_l = timed(lambda: setattr(moe, "impl", "loop") or moe(x))
    return {"grouped_mm_used": grouped_ok, "rel_err_vs_loop": rel, "grouped_ms": t_g * 1e3, "loop_ms": t_l * 1e3}


@section("sdpa_folded_chunks")
def sdpa():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 16, 8192, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, 4, 8192, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    out = {}
    ref = chunked_causal_attention(q, k, v, 512)
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(be):
                t = timed(lambda: chunked_causal_attention(q, k, v, 512).sum().backward())
                o = chunked_causal_attention(q, k, v, 512)
            out[name] = {"fwd_bwd_ms": t * 1e3, "max_abs_vs_default": (o - ref).abs().max().item()}
        except Exception as e:
            out[name] = f"{type(e).__name__}: {str(e)[:120]}"
    with torch.no_grad():
        t_full = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        t_chunk = timed(lambda: chunked_causal_attention(q, k, v, 512))
    out["fwd_ms_full_causal"], out["fwd_ms_chunked_512"] = t_full * 1e3, t_chunk * 1e3
    return out


def step_fn(model, tok, hf=False):
    def f():
        logits = model(tok).logits if hf else model(tok)
        F.cross_entropy(logits.flatten(0, 1).float(), tok.flatten()).backward()
        model.zero_grad(set_to_none=True)
    return f


@section("throughput_bf16_vs_hf")
def throughput():
    from transformers import Llama4ForCausalLM

    out = {}
    for name, step in (("scout-like", 1), ("maverick-like", 2)):
        torch.manual_seed(0)
        args = shape(step)
        m = Transformer(args)
        m.init_weights()
        with tempfile.TemporaryDirectory() as d:
            llama4.save(m, d)
            hf = Llama4ForCausalLM.from_pretrained(d, torch_dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
        m = m.cuda().to(torch.bfloat16)
        tok = torch.randint(0, args.vocab_size, (4, 2048), device="cuda")
        with torch.no_grad():
            a, b = m(tok).float(), hf(tok).logits.float()
        t_ours = timed(step_fn(m, tok), 5)
        t_hf = timed(step_fn(hf, tok, hf=True), 3)
        compiled = torch.compile(m)
        t0 = time.perf_counter()
        step_fn(compiled, tok)()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        t_comp = timed(step_fn(compiled, tok), 5)
        with torch.no_grad():
            c = compiled(tok).float()
        n = tok.numel()
        out[name] = {"ours_tok_s": n / t_ours, "ours_compiled_tok_s": n / t_comp, "hf_tok_s": n / t_hf,
                     "speedup_vs_hf": t_hf / t_ours, "compiled_speedup": t_ours / t_comp,
                     "compile_s": compile_s, "bf16_logits_maxdiff_vs_hf": (a - b).abs().max().item(),
                     "compiled_vs_eager_maxdiff": (c - a).abs().max().item(), "logit_std": a.std().item(),
                     "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
        del m, hf, compiled
        torch.cuda.empty_cache()
    return out


def main():
    assert torch.cuda.is_available(), "needs a CUDA device"
    RESULTS["env"] = {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                      "grouped_mm": hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")}
    print(RESULTS["env"], flush=True)
    fp32_parity()
    bf16_grouped()
    sdpa()
    throughput()
    print(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
