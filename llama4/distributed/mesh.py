"""The parallel layout (`ParallelConfig`) and the device meshes it becomes (`ParallelDims`).

Ranks are laid out row-major over ``(dp_replicate, dp, tp)``: tensor-parallel peers are adjacent
ranks (one host's fast links), data-parallel ranks are the outer dimensions. Expert parallelism
borrows its ranks from the data-parallel ones (torchtitan's choice): the ``D = dp_replicate * dp``
data ranks are regrouped as ``(edp, ep)`` with ``edp = D / ep``, experts are split ``ep`` ways and
each expert shard is FSDP-sharded over its ``edp`` peers. So on 2 ranks:

    dp=2                FSDP2: every parameter sharded 2 ways, batch split 2 ways
    dp=1 (replicate=2)  plain data parallel (HSDP with shard size 1): gradients all-reduced
    dp=1, ep=2          experts split 2 ways, the rest replicated, batch split 2 ways
    dp=2, ep=2          FSDP2 x EP: experts split 2 ways, the rest FSDP-sharded
    tp=2                attention / FFN / shared expert column+row split, same batch on both

The device is chosen, not assumed: CUDA with NCCL when the process sees a GPU, CPU with gloo
otherwise; everything downstream takes ``dims.device``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ParallelConfig:
    """How a run uses its ranks. -1 means "whatever the world size leaves"."""

    dp: int = -1  # FSDP2 shard degree (parameters, gradients, optimizer states split this many ways)
    dp_replicate: int = -1  # replicated data-parallel degree (HSDP's outer dimension)
    ep: int = 1  # expert parallel degree; divides dp_replicate * dp
    tp: int = 1  # tensor parallel degree (attention, dense FFN, shared expert)
    param_dtype: str = "float32"  # FSDP2 mixed precision: dtype of the gathered compute weights
    reduce_dtype: str = "float32"  # dtype gradients are reduced in
    activation_checkpoint: bool = False  # recompute each block in backward
    reshard_after_forward: bool = True  # ZeRO-3 (True) or keep the gathered weights until backward (ZeRO-2)

    def resolve(self, world_size: int) -> "ParallelConfig":
        """The same layout with every -1 filled in for ``world_size`` ranks; raises ValueError
        naming the field when the degrees do not multiply to the world size."""
        for name in ("ep", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"ParallelConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("dp", "dp_replicate"):
            v = getattr(self, name)
            if v == 0 or v < -1:
                raise ValueError(f"ParallelConfig.{name} must be >= 1 or -1 (fill), got {v}")
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"ParallelConfig.{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")
        if world_size % self.tp:
            raise ValueError(f"ParallelConfig.tp={self.tp} does not divide the world size {world_size}")
        data = world_size // self.tp
        dp, rep = self.dp, self.dp_replicate
        if dp == -1 and rep == -1:
            dp, rep = data, 1
        elif dp == -1:
            if data % rep:
                raise ValueError(f"ParallelConfig.dp_replicate={rep} does not divide world/tp = {data}")
            dp = data // rep
        elif rep == -1:
            if data % dp:
                raise ValueError(f"ParallelConfig.dp={dp} does not divide world/tp = {data}")
            rep = data // dp
        if rep * dp * self.tp != world_size:
            raise ValueError(f"ParallelConfig: dp_replicate={rep} x dp={dp} x tp={self.tp} = "
                             f"{rep * dp * self.tp} ranks, but the world size is {world_size}")
        if (rep * dp) % self.ep:
            raise ValueError(f"ParallelConfig.ep={self.ep} must divide the data-parallel degree "
                             f"dp_replicate x dp = {rep * dp} (experts borrow data-parallel ranks)")
        return ParallelConfig(dp=dp, dp_replicate=rep, ep=self.ep, tp=self.tp, param_dtype=self.param_dtype,
                              reduce_dtype=self.reduce_dtype, activation_checkpoint=self.activation_checkpoint,
                              reshard_after_forward=self.reshard_after_forward)

    @property
    def data_degree(self) -> int:
        """How many different batch shards a step sees (resolved configs only)."""
        return self.dp_replicate * self.dp

    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp * self.tp

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[getattr(self, name)]

    def describe(self) -> str:
        return (f"dp_replicate={self.dp_replicate} dp={self.dp} ep={self.ep} tp={self.tp} "
                f"param_dtype={self.param_dtype} reduce_dtype={self.reduce_dtype}"
                f"{' activation_checkpoint' if self.activation_checkpoint else ''}")


def pick_device() -> tuple[torch.device, str]:
    """(device, backend) for this process: its GPU with NCCL when CUDA is visible, else CPU with gloo."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local), "cuda:nccl,cpu:gloo"  # gloo too, for CPU-side objects (DCP metadata)
    return torch.device("cpu"), "gloo"


@dataclass
class ParallelDims:
    """A resolved `ParallelConfig` on live process groups: the meshes and this rank's coordinates."""

    cfg: ParallelConfig
    device: torch.device
    world: DeviceMesh  # ("dp_replicate", "dp", "tp")
    experts: DeviceMesh  # ("edp", "ep", "tp"): the same ranks, data dims regrouped for experts
    data_pg: dist.ProcessGroup | None = None  # the data-parallel ranks flattened; None when there is one

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def is_main(self) -> bool:
        return dist.get_rank() == 0

    @property
    def dp_mesh(self) -> DeviceMesh:
        """2-D (dp_replicate, dp): FSDP2 replicates over the first and shards over the second."""
        return self.world["dp_replicate", "dp"]

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.world["tp"]

    @property
    def ep_mesh(self) -> DeviceMesh:
        return self.experts["ep"]

    @property
    def edp_mesh(self) -> DeviceMesh:
        return self.experts["edp"]

    @property
    def data_rank(self) -> int:
        """Which batch shard this rank reads (TP peers read the same one)."""
        return dist.get_rank() // self.cfg.tp

    @property
    def data_size(self) -> int:
        return self.cfg.data_degree

    def all_reduce_data(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Sum (or ``op``) a statistic over the data-parallel ranks, in place; returns it."""
        if self.cfg.data_degree > 1:
            dist.all_reduce(t, op=op, group=self.data_pg)
        return t


def init_parallel(cfg: ParallelConfig, device: torch.device | None = None) -> ParallelDims:
    """Join (or start) the process group torchrun describes and build the meshes for ``cfg``.

    Reads the usual env (RANK, WORLD_SIZE, MASTER_ADDR, ...); a single process with none of it
    becomes a world of one."""
    if device is None:
        device, backend = pick_device()
    else:
        backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    cfg = cfg.resolve(dist.get_world_size())
    world = init_device_mesh(device.type, (cfg.dp_replicate, cfg.dp, cfg.tp),
                             mesh_dim_names=("dp_replicate", "dp", "tp"))
    experts = init_device_mesh(device.type, (cfg.data_degree // cfg.ep, cfg.ep, cfg.tp),
                               mesh_dim_names=("edp", "ep", "tp"))
    data_pg = world["dp_replicate", "dp"]._flatten("data").get_group() if cfg.data_degree > 1 else None
    return ParallelDims(cfg, device, world, experts, data_pg)


def destroy_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
