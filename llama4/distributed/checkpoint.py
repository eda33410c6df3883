"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), and DCP <-> HF layout.

    save(path, model, optimizer, loader=..., extra={...})   # every rank writes its own shards
    extra = load(path, model, optimizer, loader=...)         # any world size, any layout

A checkpoint is one DCP folder. Its keys:

    model.<fqn>          the model's parameters under the plain model's names (FSDP/TP/EP
                         wrappers removed by get_state_dict), as global (unsharded) shapes
    optim.<...>          the optimizer state, keyed by parameter name (so it reshards too)
    buffers.<fqn>        the MoE selection biases (non-persistent in the model, trained state here)
    loader               the data-loader position (JSON), in global-batch units
    rng.rank<r>          each rank's RNG states (torch, CUDA, numpy, python)
    model_args, extra    the ModelArgs (JSON; makes the folder convertible on its own) and the
                         caller's JSON-able extras (step, config...)

DCP stores every tensor with its global shape and each rank reads the slices its new layout
needs, so a run saved on 2 ranks with FSDP2 x EP resumes on 1 rank, on 4, or under TP. The loader
position is saved as "global batches consumed"; a resume with the same global batch
(per-rank batch x data ranks) continues exactly where the old run stopped.

The folder is written under a temporary name and renamed into place by rank 0 once every rank
has finished, so a crash mid-save never leaves a folder that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from llama4.model import ModelArgs, MoE, Transformer

METADATA = ".metadata"  # what DCP writes last: a folder without it is not a checkpoint


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _plain_model(model) -> Transformer:
    """The Transformer itself (FSDP2 keeps the class; torch.compile wraps it)."""
    while not isinstance(model, Transformer) and hasattr(model, "_orig_mod"):
        model = model._orig_mod
    return model


def _moe_buffers(model) -> dict[str, MoE]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def rng_state() -> bytes:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return pickle.dumps(state)


def set_rng_state(blob: bytes) -> None:
    state = pickle.loads(blob)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def loader_state(loader) -> str:
    """The loader's position as JSON, with the global batch made explicit."""
    s = loader.state_dict()
    return json.dumps({**s, "global_batch": s["batch_size"] * s["world_size"]})


def restore_loader(loader, saved: str) -> None:
    """Put ``loader`` where the saved one was. Different data-parallel sizes are fine as long as
    the global batch (per-rank batch x data ranks) is the same: the global sequence of windows
    is then identical and each rank picks its slice of it."""
    s = json.loads(saved)
    mine = loader.state_dict()
    global_batch = mine["batch_size"] * mine["world_size"]
    if s["global_batch"] != global_batch:
        raise ValueError(f"loader: the checkpoint's global batch is {s['global_batch']} sequences "
                         f"({s['batch_size']} x {s['world_size']} ranks), this run's is {global_batch} "
                         f"({mine['batch_size']} x {mine['world_size']}); resuming would change the data")
    s = {k: v for k, v in s.items() if k != "global_batch"}
    s.update(batch_size=mine["batch_size"], world_size=mine["world_size"])
    loader.load_state_dict(s)


# --------------------------------------------------------------------------------------------
# save / load

def save(path, model, optimizer=None, *, loader=None, extra: dict | None = None,
         before_rename: Callable[[Path], None] | None = None) -> Path:
    """Collective: every rank calls it with its own shards. Returns the checkpoint folder.

    ``before_rename(tmp_dir)`` runs on rank 0 once every shard is written, before the folder
    is renamed into place (to add files that must appear atomically with it)."""
    path = Path(path)
    plain = _plain_model(model)
    if optimizer is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
    else:
        model_sd, optim_sd = get_model_state_dict(model), None
    state: dict = {"model": model_sd, "model_args": json.dumps(plain.args.to_dict()),
                   "extra": json.dumps(extra or {}), f"rng.rank{_rank()}": rng_state()}
    if optim_sd is not None:
        state["optim"] = optim_sd
    buffers = {f"{name}.expert_bias": m.expert_bias for name, m in _moe_buffers(model).items()}
    if buffers:
        state["buffers"] = buffers
    if loader is not None:
        state["loader"] = loader_state(loader)

    tmp = path.parent / f".tmp-{path.name}-{_shared_token()}"
    if _rank() == 0:
        tmp.mkdir(parents=True, exist_ok=True)
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))  # ends with a collective: every rank has written
    if _rank() == 0:
        if before_rename is not None:
            before_rename(tmp)
        if path.exists():
            old = path.parent / f".tmp-old-{path.name}-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    _barrier()
    return path


def _shared_token() -> str:
    """A random name every rank agrees on."""
    token = [uuid.uuid4().hex[:8]]
    if dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return token[0]


def saved_keys(path) -> set[str]:
    """The flattened keys a DCP folder holds (``model.layers.0...``, ``loader``, ...)."""
    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)


def load(path, model, optimizer=None, *, loader=None, strict_rng: bool = False) -> dict:
    """Collective: fill ``model`` (and ``optimizer``, ``loader``, this rank's RNG) from the
    checkpoint at ``path``, whatever layout and world size wrote it. Returns the saved extras.

    A checkpoint without optimizer state (e.g. one converted from HF) leaves the optimizer
    untouched. A rank the old run did not have keeps its RNG (or raises with ``strict_rng``)."""
    path = Path(path)
    if not (path / METADATA).is_file():
        raise FileNotFoundError(f"{path}: not a DCP checkpoint (no {METADATA})")
    keys = saved_keys(path)
    has_optim = any(k.startswith("optim.") for k in keys)
    if optimizer is not None and has_optim:
        model_sd, optim_sd = get_state_dict(model, optimizer)
    else:
        model_sd, optim_sd = get_model_state_dict(model), None
    state: dict = {"model": model_sd, "extra": ""}
    if optim_sd is not None:
        state["optim"] = optim_sd
    buffers = {f"{name}.expert_bias": m.expert_bias for name, m in _moe_buffers(model).items()}
    if buffers and any(k.startswith("buffers.") for k in keys):
        state["buffers"] = buffers
    if loader is not None:
        if "loader" not in keys:
            raise ValueError(f"{path}: holds no data-loader state")
        state["loader"] = ""
    rng_key = f"rng.rank{_rank()}"
    if rng_key in keys:
        state[rng_key] = b""
    elif strict_rng:
        raise ValueError(f"{path}: no RNG state for rank {_rank()}")
    dcp.load(state, checkpoint_id=str(path))
    if optim_sd is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_model_state_dict(model, state["model"])
    if "buffers" in state:
        for name, m in _moe_buffers(model).items():
            m.expert_bias = state["buffers"][f"{name}.expert_bias"].to(m.expert_bias.device)
    if loader is not None:
        restore_loader(loader, state["loader"])
    if rng_key in state:
        set_rng_state(state[rng_key])
    return json.loads(state["extra"] or "{}")


# --------------------------------------------------------------------------------------------
# DCP <-> HF layout (offline, one process, no process group)

@contextlib.contextmanager
def _offline():
    """DCP in one process without a process group is intended here: no warning about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_full_model(path, dtype: torch.dtype | None = None) -> Transformer:
    """The whole model of a DCP checkpoint in this process (CPU), e.g. to export it."""
    with _offline():
        return _load_full_model(path, dtype)


def _load_full_model(path, dtype):
    path = Path(path)
    if not (path / METADATA).is_file():
        raise FileNotFoundError(f"{path}: not a DCP checkpoint (no {METADATA})")
    meta = {"model_args": ""}
    dcp.load(meta, checkpoint_id=str(path), no_dist=True)
    args = ModelArgs.from_dict(json.loads(meta["model_args"]))
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}  # DCP reads into these tensors in place
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.init_buffers("cpu")
    if any(k.startswith("buffers.") for k in saved_keys(path)):
        buffers = {f"{name}.expert_bias": m.expert_bias for name, m in _moe_buffers(model).items()}
        dcp.load({"buffers": buffers}, checkpoint_id=str(path), no_dist=True)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def dcp_to_hf(dcp_path, hf_path, dtype: torch.dtype | str | None = None, max_shard_size="5GB") -> Path:
    """Write the model of a DCP checkpoint as a Hugging Face Llama4ForCausalLM folder (readable
    by `llama4.load` and by transformers)."""
    from llama4.checkpoint import save as save_hf

    return save_hf(load_full_model(dcp_path), hf_path, max_shard_size=max_shard_size, dtype=dtype)


def hf_to_dcp(hf_path, dcp_path, dtype: torch.dtype | str | None = None) -> Path:
    """Write a Hugging Face (or Meta) checkpoint as a model-only DCP folder, which `load` reads
    into any parallel layout (the optimizer then starts fresh)."""
    from llama4.checkpoint import load as load_hf

    model = load_hf(hf_path, dtype=dtype)
    dcp_path = Path(dcp_path)
    tmp = dcp_path.parent / f".tmp-{dcp_path.name}-{uuid.uuid4().hex[:8]}"
    state = {"model": model.state_dict(), "model_args": json.dumps(model.args.to_dict()), "extra": "{}"}
    try:
        with _offline():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=True)
        if dcp_path.exists():
            shutil.rmtree(dcp_path)
        os.replace(tmp, dcp_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dcp_path
