"""Shared by tests/distributed: launch N CPU processes (gloo) and a tiny model + train step that
runs the same way in one process and in N."""

from __future__ import annotations

import os
import pickle
import socket
import sys
import traceback

import torch
import torch.nn.functional as F

from llama4.model import ModelArgs, Transformer

# Tiny but complete: dense + MoE layers, a NoPE layer, chunked attention, QK-norm, GQA.
TINY = dict(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4, top_k=1,
            expert_dim=64, dense_dim=128, interleave_moe_layer_step=2, nope_layer_interval=4,
            attention_chunk_size=16, floor_scale=16.0, max_seq_len=4096)
GLOBAL_BATCH, SEQ, STEPS, LR, CLIP = 4, 32, 5, 1e-3, 1.0


def tiny_args(**changes) -> ModelArgs:
    return ModelArgs(**{**TINY, **changes})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batches(args: ModelArgs, steps: int = STEPS, seed: int = 1) -> list[torch.Tensor]:
    """Global batches (B, T+1) of token ids: inputs are [:, :-1], targets [:, 1:]. Each row counts
    up from a random start with a random stride of 1..3 (mod vocab), so a few steps visibly learn."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        start = torch.randint(0, args.vocab_size, (GLOBAL_BATCH, 1), generator=g)
        stride = torch.randint(1, 4, (GLOBAL_BATCH, 1), generator=g)
        out.append((start + stride * torch.arange(SEQ + 1)) % args.vocab_size)
    return out


def initial_state(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    m = Transformer(args)
    m.init_weights()
    return {k: v.clone() for k, v in m.state_dict().items()}


def make_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))


def step(model, opt, tokens, clip_fn) -> torch.Tensor:
    """One training step on ``tokens`` (b, T+1); returns the (local) mean loss, detached."""
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    clip_fn(model.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def reference_run(args: ModelArgs, state: dict, data: list[torch.Tensor]) -> tuple[list[float], dict]:
    """The single-process run every layout must reproduce."""
    torch.set_flush_denormal(True)
    model = Transformer(args)
    model.load_state_dict(state)
    model.init_buffers()
    opt = make_optimizer(model)
    losses = [step(model, opt, t, torch.nn.utils.clip_grad_norm_).item() for t in data]
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def spawn(fn, nprocs: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` fresh processes on CPU with gloo; an
    exception in any of them fails the caller with that rank's traceback."""
    import torch.multiprocessing as mp

    port = free_port()
    mp.start_processes(_entry, args=(fn, nprocs, port, args), nprocs=nprocs, join=True, start_method="spawn")


def _entry(rank, fn, world_size, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    import datetime

    import torch.distributed as dist

    # A short timeout: a rank that fails leaves its peers waiting in a collective.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # leave together: no rank tears gloo down under a peer's last collective
    except Exception:
        traceback.print_exc()
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Reached on success only. Skip interpreter finalization: gloo's worker threads can abort the
    # process there after all the work is done (SIGABRT, "terminate called without an active
    # exception"; pytorch/pytorch#179291), seen twice on fresh installs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def dump(obj, path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def synthetic_shards(out_dir, vocab: int, n_tokens: int = 8192, seed: int = 0):
    """A prepared-data folder (the format llama4.data writes) of counting sequences below
    ``vocab``, so PackedLoader and its resumable state run without a tokenizer."""
    import json
    from pathlib import Path

    import numpy as np

    from llama4.data.shards import FORMAT, MANIFEST

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    docs, pos = [], 0
    tokens = np.empty(n_tokens, dtype=np.uint32)
    while pos < n_tokens:
        n = min(int(rng.integers(20, 80)), n_tokens - pos)
        start, stride = int(rng.integers(0, vocab)), int(rng.integers(1, 4))
        tokens[pos:pos + n] = (start + stride * np.arange(n)) % vocab
        docs.append(pos)
        pos += n
    tokens.tofile(out / "train-x.tokens.bin")
    np.asarray(docs + [n_tokens], dtype=np.uint64).tofile(out / "train-x.docs.bin")
    shard = {"name": "train-x", "split": "train", "lang": "x", "source": {}, "n_tokens": n_tokens,
             "n_docs": len(docs), "text_bytes": 0}
    manifest = {"format": FORMAT, "dtype": "uint32",
                "tokenizer": {"path": None, "n_words": vocab, "bos_id": 0, "eos_id": 1}, "shards": [shard]}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def loader_step(model, opt, batch, clip_fn) -> torch.Tensor:
    logits = model(batch.inputs)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten())
    loss.backward()
    clip_fn(model.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
