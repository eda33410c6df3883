"""The training loop under torchrun: what `llama4.train.train` needs from this room, per rank.

    torchrun --nproc_per_node 2 -m llama4 train --recipe debug --out runs/d2 --dp 2 --ep 2

`train_distributed` joins the process group, builds the meshes, and runs the ordinary loop with

* ``parallelize``: TP / EP / FSDP2 applied to the model the loop built (`parallelize.parallelize`),
  plus a forward hook on every MoE that sums its expert loads over the data-parallel ranks, so
  the balance loss and the bias update see the global batch, as one process would;
* a `Runtime` whose ``rank`` / ``world_size`` are the *data-parallel* coordinates (TP peers read
  the same batch), ``global_rank`` picks the one process that logs and writes files, and
  ``dist`` is a `DistributedRun`: gradient clipping across meshes, loss averaging, DCP
  checkpoints, data preparation by rank 0 first, and the full model gathered for the export.

A checkpoint folder is ``checkpoints/step_NNNNNNNN/``: the DCP shards (model, optimizer,
loader, RNG, MoE biases; see `checkpoint.py`) plus the loop's own ``state.pt`` (step, token
count, metric accumulators) and ``meta.json``, renamed into place together. It resumes on any
world size and layout with the same global batch (``--set batch_size=`` per data rank).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from llama4.distributed import checkpoint as dcp_ckpt
from llama4.distributed.mesh import ParallelConfig, init_parallel, pick_device
from llama4.distributed.parallelize import clip_grad_norm_, parallelize
from llama4.model import MoE, Transformer


class DistributedRun:
    def __init__(self, cfg: ParallelConfig, device: torch.device | None = None):
        self.dims = init_parallel(cfg, device)
        self.cfg = self.dims.cfg

    # ---- the seams ----------------------------------------------------------------------------
    def runtime(self):
        from llama4.train.run import Runtime

        d = self.dims
        return Runtime(d.device, rank=d.data_rank, world_size=d.data_size, global_rank=d.rank, dist=self)

    def parallelize(self, model: Transformer, _train_cfg=None) -> Transformer:
        for m in model.modules():
            if isinstance(m, MoE):
                m.register_forward_hook(self._sum_loads)
        return parallelize(model, self.dims)

    def _sum_loads(self, moe: MoE, _inputs, _output) -> None:
        if moe.record_router_stats and moe.tokens_per_expert is not None:
            self.dims.all_reduce_data(moe.tokens_per_expert)

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the body (e.g. trains the tokenizer, writes shards); the others run it
        after, when they find the files ready."""
        if not self.dims.is_main:
            dist.barrier()
        try:
            yield
        finally:
            if self.dims.is_main:
                dist.barrier()

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(params, max_norm)

    def mean(self, *values: float) -> tuple[float, ...]:
        """The mean over the data-parallel ranks of each per-rank number (losses for the log)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.dims.device)
        self.dims.all_reduce_data(t)
        return tuple((t / self.dims.data_size).tolist())

    def save_checkpoint(self, ckpt_dir: Path, step: int, model, optimizer, loader, state: dict, meta: dict,
                        keep: int) -> Path:
        from llama4.train import checkpointing as ckpt

        ckpt_dir = Path(ckpt_dir)
        if self.dims.is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)

        def add_loop_state(tmp: Path) -> None:  # rank 0, every shard written, before the rename
            torch.save(state, tmp / ckpt.STATE)
            (tmp / ckpt.META).write_text(json.dumps({**meta, "step": step, "data_parallel": self.dims.data_size,
                                                     "layout": self.cfg.describe()}, indent=1) + "\n")

        path = dcp_ckpt.save(ckpt_dir / f"step_{step:08d}", model, optimizer, loader=loader,
                             extra={"step": step}, before_rename=add_loop_state)
        if self.dims.is_main:
            for _, old in ckpt.list_checkpoints(ckpt_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return path

    def per_rank_config(self, saved, meta: dict):
        """The saved run's config as this world would spell it: ``batch_size`` is per data rank,
        so a checkpoint of D ranks x b sequences reads as b * D / D' here when that divides."""
        was = int(meta.get("data_parallel", 1))
        now = self.dims.data_size
        if was != now and (saved.batch_size * was) % now == 0:
            return saved.replace(batch_size=saved.batch_size * was // now)
        return saved

    def load_checkpoint(self, path: Path, model, optimizer, loader) -> None:
        """Model, optimizer, loader position, this rank's RNG and the MoE biases, from any layout."""
        dcp_ckpt.load(path, model, optimizer, loader=loader)

    def full_model(self, model) -> Transformer | None:
        """Collective: the whole trained model as a plain Transformer on rank 0's device (None on
        the other ranks), with the MoE selection biases, for the final evaluation and export."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.dims.is_main:
            return None
        with torch.device("meta"):
            plain = Transformer(model.args)
        plain.load_state_dict(full, assign=True)
        plain.init_buffers("cpu")
        biases = {n: m.expert_bias for n, m in model.named_modules() if isinstance(m, MoE)}
        for n, m in plain.named_modules():
            if isinstance(m, MoE):
                m.expert_bias = biases[n].detach().to("cpu").clone()
                m.record_router_stats = False
        return plain.to(self.dims.device)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def distributed_run(cfg, parallel: ParallelConfig | None = None) -> DistributedRun:
    """The `DistributedRun` that `llama4 train` under torchrun builds for ``cfg`` on this process."""
    from llama4.train.run import pick_autocast

    parallel = parallel or ParallelConfig()
    if cfg.device == "auto":
        device, _ = pick_device()
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    _, compute = pick_autocast(cfg, device)
    # FSDP2 mixed precision follows the loop's compute dtype. Activation checkpointing is the
    # loop's to apply (cfg.activation_checkpointing, with the same `parallelize.apply_ac`), before
    # this room's hook, so the layout leaves it off.
    parallel = dataclasses.replace(parallel, param_dtype="bfloat16" if compute == "bfloat16" else "float32",
                                   activation_checkpoint=False)
    return DistributedRun(parallel, device)


def train_distributed(cfg, out, resume: bool = False, parallel: ParallelConfig | None = None) -> dict:
    """`llama4.train.train` on this process's share of a torchrun job (any world size, 1 included)."""
    from llama4.train.trainer import train

    run = distributed_run(cfg, parallel)
    try:
        if run.dims.is_main:
            print(f"distributed: {dist.get_world_size()} ranks on {run.dims.device.type} ({dist.get_backend()}), "
                  f"{run.cfg.describe()}", flush=True)
        return train(cfg, out, resume=resume, parallelize=run.parallelize, runtime=run.runtime())
    finally:
        run.close()
