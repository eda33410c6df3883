"""One-shot check of llama4.distributed on a CUDA machine (one GPU: world size 1, NCCL).

    python benchmarks/gpu_distributed_check.py [--out report.json]

1. nccl: a 1-rank process group on the GPU (the same code path as the CPU/gloo tests: the device
   is chosen by `pick_device`), FSDP2 (fp32) for 5 steps vs a plain single-GPU run from the same
   weights; DCP save + load round trip.
2. plan vs measured: peak `torch.cuda.max_memory_allocated` of a training step of a mid-size
   MoE model under FSDP2 bf16 mixed precision, with and without activation checkpointing, vs
   `llama4.distributed.plan.train_memory` for the same layout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, when run as a script
RESULTS: dict = {}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(model, opt, tokens, clip):
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    clip(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def check_nccl():
    from llama4.distributed import ParallelConfig, init_parallel
    from llama4.distributed import checkpoint as ckpt
    from llama4.distributed.parallelize import clip_grad_norm_, materialize, parallelize
    from llama4.model import ModelArgs, Transformer

    args = ModelArgs(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, n_experts=4,
                     expert_dim=128, dense_dim=256, interleave_moe_layer_step=2, attention_chunk_size=32,
                     floor_scale=32.0)
    torch.manual_seed(0)
    ref = Transformer(args)
    ref.init_weights()
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of this script
    ref = ref.to(dev)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 512, (4, 65), generator=g).to(dev) for _ in range(5)]
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    want = [_step(ref, opt, t, torch.nn.utils.clip_grad_norm_).item() for t in data]

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dims = init_parallel(ParallelConfig(dp=1))
    with torch.device("meta"):
        model = Transformer(args)
    parallelize(model, dims)
    materialize(model, dims, full_state=state)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    got = [_step(model, opt, t, clip_grad_norm_).item() for t in data]
    with tempfile.TemporaryDirectory() as d:
        ckpt.save(f"{d}/c", model, opt, extra={"step": 5})
        with torch.device("meta"):
            again = Transformer(args)
        parallelize(again, dims)
        materialize(again, dims)
        opt2 = torch.optim.AdamW(again.parameters(), lr=1e-3)
        extra = ckpt.load(f"{d}/c", again, opt2)
        same = all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(model.parameters(), again.parameters()))
    import torch.distributed as dist

    backend = dist.get_backend()
    dist.destroy_process_group()
    return {"device": str(dims.device), "backend": str(backend), "losses_fsdp": got, "losses_plain": want,
            "max_loss_diff": max(abs(a - b) for a, b in zip(got, want)), "dcp_roundtrip_equal": same,
            "dcp_extra": extra}


def check_plan(ac: bool):
    from llama4.distributed import ParallelConfig, init_parallel
    from llama4.distributed.parallelize import clip_grad_norm_, materialize, parallelize
    from llama4.distributed.plan import Layout, train_memory
    from llama4.model import ModelArgs, Transformer

    args = ModelArgs(vocab_size=32768, dim=1024, n_layers=8, n_heads=16, n_kv_heads=4, head_dim=64, n_experts=16,
                     top_k=1, expert_dim=1024, dense_dim=4096, interleave_moe_layer_step=1, attention_chunk_size=512,
                     floor_scale=1024.0)
    B, T = 4, 2048
    cuda = torch.cuda.is_available()
    if not cuda:  # dry run on CPU: a small shape, no memory statistics
        args, B, T = args.replace(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, vocab_size=512,
                                  expert_dim=128, attention_chunk_size=64), 2, 128
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dims = init_parallel(ParallelConfig(dp=1, param_dtype="bfloat16", activation_checkpoint=ac))
    with torch.device("meta"):
        model = Transformer(args)
    parallelize(model, dims)
    materialize(model, dims)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, args.vocab_size, (B, T + 1), device=dims.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    _step(model, opt, tokens, clip_grad_norm_)  # optimizer states exist from here on
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    _step(model, opt, tokens, clip_grad_norm_)
    sync()
    dt = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    plan = train_memory(args, Layout(dp=1, activation_checkpoint=ac), seq=T, micro_batch=B, compute_bytes=2)
    import torch.distributed as dist

    dist.destroy_process_group()
    del model, opt
    GiB = 2 ** 30
    return {"measured_peak_GiB": peak / GiB, "planned_peak_GiB": plan.peak / GiB,
            "ratio_planned_over_measured": plan.peak / peak,
            "planned": {"weights": plan.weights / GiB, "grads": plan.grads / GiB, "optimizer": plan.optimizer / GiB,
                        "fsdp_buffers": plan.fsdp_buffers / GiB, "activations_peak": plan.activations.peak / GiB},
            "step_s": dt, "tokens_per_s": B * T / dt}


def check_cli():
    """`torchrun --nproc_per_node 1 -m llama4 train --recipe debug --dp 1` on the GPU (bf16 autocast +
    FSDP2 bf16 mixed precision, NCCL), then a resume on the same layout."""
    import subprocess

    with tempfile.TemporaryDirectory() as d:
        base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master-port", str(_port()),
                "-m", "llama4", "train", "--recipe", "debug", "--out", d, "--no-progress", "--dp", "1",
                "--checkpoint-every", "3", "--set", "sample_tokens=0", "--set", "plots=false"]
        t = time.perf_counter()
        r = subprocess.run(base + ["--max-steps", "6"], capture_output=True, text=True)
        dt = time.perf_counter() - t
        if r.returncode:
            return {"error": r.stderr[-3000:]}
        rows = [json.loads(x) for x in open(f"{d}/metrics.jsonl")]
        losses = [x["loss"] for x in rows if "loss" in x]
        r2 = subprocess.run(base + ["--max-steps", "8", "--resume"], capture_output=True, text=True)
        rows2 = [json.loads(x) for x in open(f"{d}/metrics.jsonl")]
        head = [line for line in r.stdout.splitlines() if line.startswith("distributed:")]
        return {"banner": head, "losses": losses, "wall_s": dt, "resume_rc": r2.returncode,
                "after_resume": [x["loss"] for x in rows2 if "loss" in x][6:],
                "resume_err": r2.stderr[-1500:] if r2.returncode else ""}


CHECKS = {"cli_torchrun_cuda": check_cli, "nccl_world1_fsdp_vs_plain": check_nccl, "plan_vs_measured_no_ac": lambda: check_plan(False),
          "plan_vs_measured_ac": lambda: check_plan(True)}


def main():
    import subprocess

    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # one check, in a fresh process
    p.add_argument("--only", default=",".join(CHECKS))
    a = p.parse_args()
    if a.one:
        print("RESULT " + json.dumps(CHECKS[a.one](), default=str), flush=True)
        return
    name0 = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (dry run)"
    print(f"torch {torch.__version__}, {name0}", flush=True)
    for name in a.only.split(","):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
        line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
        RESULTS[name] = json.loads(line[-1][7:]) if line else {"error": (r.stderr or r.stdout)[-3000:]}
        print(f"[{name}] ({time.perf_counter() - t:.1f}s) {json.dumps(RESULTS[name], default=str)}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


if __name__ == "__main__":
    main()
