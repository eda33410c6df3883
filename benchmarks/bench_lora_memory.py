"""Memory of one training step: full fine-tuning vs LoRA (llama4.posttrain.lora).

For each model size and mode, a fresh subprocess builds the model, (applies LoRA,) runs one
AdamW step (llama4.train.optim.param_groups) on a random batch, and reports: trainable
parameters, gradient and AdamW-state bytes (counted from the tensors), and the peak resident set
size of the step above the RSS measured once the model exists (ru_maxrss minus that baseline),
each also with activation checkpointing (``apply_ac``), which matters for LoRA here: the adapted
weights W + delta are materialised in the forward and kept for backward unless recomputed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lora_memory.py [--rank 8] [--sizes debug,wide]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

SIZES = {
    # the `debug` flavor as is, and a wider one where the weights dominate the process
    "debug": {},
    "wide": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=2, head_dim=64, n_experts=16, expert_dim=1024,
                 dense_dim=2048),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE")


def one(size: str, rank: int, ac: bool, batch: int, seq: int) -> dict:
    import dataclasses
    import resource
    import time

    import torch
    import torch.nn.functional as F

    from llama4.model import Transformer, flavor
    from llama4.posttrain.lora import apply_lora
    from llama4.train.optim import param_groups

    torch.manual_seed(0)
    args = dataclasses.replace(flavor("debug"), **SIZES[size])
    model = Transformer(args)
    model.init_weights()
    model.init_buffers()
    if rank:
        apply_lora(model, rank, targets=("attention", "experts", "shared", "dense"))
    if ac:
        from llama4.distributed.parallelize import apply_ac

        apply_ac(model)
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-4)
    x = torch.randint(0, args.vocab_size, (batch, seq + 1))
    base = _rss_bytes()
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    opt.step()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return {
        "size": size, "mode": (f"lora r={rank}" if rank else "full") + (" +AC" if ac else ""),
        "params": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in trainable),
        "grad_bytes": sum(p.grad.numel() * p.grad.element_size() for p in trainable if p.grad is not None),
        "optim_bytes": sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                           if torch.is_tensor(t) and t.dim() > 0),
        "step_peak_rss": max(0, peak - base), "step_s": dt,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--sizes", default="debug,wide")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: size,rank,ac
    a = ap.parse_args()
    if a.one:
        size, rank, ac = a.one.split(",")
        print(json.dumps(one(size, int(rank), ac == "1", a.batch, a.seq)))
        return
    rows = []
    for size in a.sizes.split(","):
        for rank, ac in ((0, 0), (a.rank, 0), (0, 1), (a.rank, 1)):
            out = subprocess.run([sys.executable, __file__, "--one", f"{size},{rank},{ac}", "--batch", str(a.batch),
                                  "--seq", str(a.seq)], check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    mib = 1 << 20
    print(f"batch {a.batch} x seq {a.seq}, fp32, AdamW, LoRA on all targets (attention, experts, shared, dense); "
          f"+AC: activation checkpointing per block; threads {__import__('torch').get_num_threads()}")
    print(f"{'size':6} {'mode':13} {'params':>11} {'trainable':>11} {'grads MiB':>10} {'AdamW MiB':>10} "
          f"{'step peak RSS MiB':>18} {'step s':>7}")
    for r in rows:
        print(f"{r['size']:6} {r['mode']:13} {r['params']:>11,} {r['trainable']:>11,} {r['grad_bytes'] / mib:>10.1f} "
              f"{r['optim_bytes'] / mib:>10.1f} {r['step_peak_rss'] / mib:>18.1f} {r['step_s']:>7.2f}")


if __name__ == "__main__":
    main()
