"""Step time of the debug recipe's model: 1 process vs N processes (FSDP2, EP, TP, FSDP2 x EP),
same global batch, and the share of each step spent in collectives (torch.profiler).

    .venv/bin/python benchmarks/bench_distributed.py [--nproc 2] [--steps 8] [--batch 16] [--seq 64]

Every run is a fresh set of processes (torch.multiprocessing spawn) on the chosen device: CPU with
gloo here, one GPU per rank with NCCL where there are enough GPUs. Each rank runs 1 intra-op
thread (OMP_NUM_THREADS=1, as torchrun sets), so N processes use N cores. Times are medians of
``--steps`` timed steps after 2 warm-up steps; the profiled step is separate. Collective time is
the profiler's self time of the c10d/gloo/nccl ops, split by kind; on gloo they run on the CPU and
include the wait for the slowest rank, and "wait" is time blocked in ``wait_tensor`` on the async
functional collectives (TP's all-reduces, EP's all-to-alls), i.e. mostly rank skew.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

# name -> ParallelConfig fields (-1: all ranks); "fsdp_1rank" is FSDP2 on one process: the
# wrapper's own cost (hooks, DTensor dispatch) without a second rank competing for the cores.
LAYOUTS = {"single": None, "fsdp_1rank": dict(dp=1), "fsdp": dict(dp=-1), "ep": dict(dp=1, ep=-1),
           "tp": dict(tp=-1), "fsdp_x_ep": dict(dp=-1, ep=-1)}
KINDS = {"wait": ("wait_tensor",), "all_gather": ("allgather", "all_gather"), "reduce_scatter": ("reduce_scatter", "reducescatter"),
         "all_to_all": ("alltoall", "all_to_all"), "all_reduce": ("allreduce", "all_reduce"),
         "broadcast": ("broadcast",)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _comm_kind(name: str) -> str | None:
    n = name.lower()
    if not any(k in n for k in ("c10d", "gloo", "nccl", "record_param_comms")):
        return None
    for kind, keys in KINDS.items():
        if any(k in n for k in keys):
            return kind
    return "other"


def _run(rank, world, port, layout, opts, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    import warnings

    warnings.filterwarnings("ignore", message="DTensor random operators")  # random init is fine here
    from torch.profiler import ProfilerActivity, profile

    from llama4.distributed import ParallelConfig, init_parallel
    from llama4.distributed.parallelize import clip_grad_norm_, materialize, parallelize
    from llama4.model import Transformer
    from llama4.recipes import get_recipe

    args = get_recipe("debug").model
    torch.manual_seed(0)
    if layout is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = Transformer(args).to(device)
        model.init_weights()
        data_rank, data_size, clip, sync = 0, 1, torch.nn.utils.clip_grad_norm_, lambda: None
    else:
        cfg = {k: (world if v == -1 else v) for k, v in layout.items()}
        if cfg.get("tp", 1) > 1:
            cfg.setdefault("dp", 1)
        dims = init_parallel(ParallelConfig(**cfg))
        device = dims.device
        with torch.device("meta"):
            model = Transformer(args)
        parallelize(model, dims)
        materialize(model, dims)
        data_rank, data_size, clip = dims.data_rank, dims.data_size, clip_grad_norm_
        sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    b = opt_batch = opts["batch"] // data_size
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (opts["batch"], opts["seq"] + 1), generator=g)
    mine = tokens[data_rank * b:(data_rank + 1) * b].to(device)

    def step():
        logits = model(mine[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), mine[:, 1:].flatten()).backward()
        clip(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(opts["steps"]):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        sync()
    comm, total = {}, 0.0
    for ev in prof.key_averages():
        kind = _comm_kind(ev.key)
        if kind:
            t = (ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total) / 2e6  # s per step
            comm[kind] = comm.get(kind, 0.0) + t
            if os.environ.get("BENCH_DEBUG") and rank == 0:
                print(f"  {ev.key}: {t * 1e3:.2f} ms/step ({ev.count // 2} calls)")
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"median_s": statistics.median(times), "times": times, "comm_s": comm,
                       "tokens": opts["batch"] * opts["seq"], "per_rank_batch": opt_batch,
                       "device": str(device)}, f)
    if layout is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


def bench(name, nproc, opts) -> dict:
    import torch.multiprocessing as mp

    layout = LAYOUTS[name]
    world = 1 if layout is None or name.endswith("_1rank") else nproc
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        mp.start_processes(_run, args=(world, _free_port(), layout, opts, out), nprocs=world, join=True,
                           start_method="spawn")
        with open(out) as f:
            return json.load(f)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    a = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    if torch.cuda.is_available() and torch.cuda.device_count() < a.nproc:
        print(f"{torch.cuda.device_count()} GPU(s) for {a.nproc} ranks: NCCL needs one GPU per rank", file=sys.stderr)
        return 2
    opts = dict(steps=a.steps, batch=a.batch, seq=a.seq)
    print(f"debug recipe model, global batch {a.batch} x {a.seq} tokens, {a.nproc} processes, "
          f"1 thread per process, torch {torch.__version__}, cores {os.cpu_count()}")
    print(f"{'layout':<10} {'ranks':>5} {'step ms':>8} {'vs single':>9} {'tokens/s':>9}  collectives per step (ms; share)")
    base = None
    for name in a.layouts.split(","):
        r = bench(name, a.nproc, opts)
        ms = r["median_s"] * 1e3
        base = base or ms
        comm = r["comm_s"]
        tot = sum(comm.values())
        parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in sorted(comm.items(), key=lambda kv: -kv[1]))
        share = f"{tot * 1e3:.1f} ms = {100 * tot / r['median_s']:.0f}% ({parts})" if comm else "-"
        ranks = 1 if LAYOUTS[name] is None or name.endswith("_1rank") else a.nproc
        print(f"{name:<10} {ranks:>5} {ms:8.1f} {base / ms:8.2f}x "
              f"{r['tokens'] / r['median_s']:9.0f}  {share}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
