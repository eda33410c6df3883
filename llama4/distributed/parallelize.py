"""Parallelism applied to the pure model from outside (torchtitan's approach).

    model = Transformer(args)                 # on the meta device for real sizes
    parallelize(model, dims)                  # TP plans, expert parallel, activation ckpt, FSDP2
    materialize(model, dims)                  # to_empty + init_weights (or a full state dict)

Order matters and is fixed here: tensor parallel first (turns the split weights into DTensors on
the tp mesh), then expert parallel (swaps each MoE's experts for `ExpertParallelExperts`), then
activation checkpointing (wraps blocks), then FSDP2 (shards what is left over the data ranks;
the experts over their own ``edp`` peers, with the gradient divided by the full data degree,
because an expert's gradient already sums the tokens of its ep peers).

Nothing here edits `llama4.model`: plans address modules by their names (``attention.wq``,
``feed_forward.w1``, ``feed_forward.shared_expert.w2``) and the attention's
``view(B, T, -1, head_dim)`` makes the local head count follow the split.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import Iterable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.checkpoint import checkpoint

from llama4.distributed.expert_parallel import ExpertParallelExperts
from llama4.distributed.mesh import ParallelDims
from llama4.model import FeedForward, MoE, Transformer


def check_divisible(args, cfg) -> None:
    """Raise ValueError naming the dimension a layout cannot split."""
    tp, ep = cfg.tp, cfg.ep
    checks = [("n_heads", args.n_heads, tp), ("n_kv_heads", args.n_kv_heads, tp)]
    if args.n_experts:
        checks += [("expert_dim", args.expert_dim, tp), ("n_experts", args.n_experts, ep)]
    if any(not args.is_moe_layer(i) for i in range(args.n_layers)):
        checks.append(("dense_dim", args.dense_dim, tp))
    for name, value, by in checks:
        if value % by:
            raise ValueError(f"ModelArgs.{name}={value} is not divisible by the parallel degree {by}")
    if ep > 1 and not args.n_experts:
        raise ValueError("expert parallel (ep > 1) needs a model with experts (n_experts > 0)")


def _ffn_plan(prefix: str) -> dict:
    return {f"{prefix}.w1": ColwiseParallel(), f"{prefix}.w3": ColwiseParallel(), f"{prefix}.w2": RowwiseParallel()}


def apply_tp(model: Transformer, tp_mesh) -> None:
    """Column-split q/k/v and the FFN up/gate projections, row-split o and down: one all-reduce
    after attention and one after each FFN; norms, router, experts and the embedding/head stay
    whole (replicated) on every tp rank."""
    for block in model.layers:
        plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel()}
        ffn = block.feed_forward
        if isinstance(ffn, MoE):
            plan.update(_ffn_plan("feed_forward.shared_expert"))
        elif isinstance(ffn, FeedForward):
            plan.update(_ffn_plan("feed_forward"))
        parallelize_module(block, tp_mesh, plan)


def apply_ep(model: Transformer, ep_mesh) -> None:
    for block in model.layers:
        ffn = block.feed_forward
        if isinstance(ffn, MoE):
            if ffn.impl != "grouped":
                raise ValueError(f"expert parallel needs MoE impl 'grouped', layer {block.layer_id} uses {ffn.impl!r}")
            ffn.experts = ExpertParallelExperts(ffn.experts, ep_mesh)


def apply_ac(model: Transformer) -> None:
    """Recompute each block's activations in backward (only the block inputs are kept).

    The project's one activation checkpointing: ``llama4 train --activation-checkpointing`` (one
    process or ``--dp N``) and ``ParallelConfig.activation_checkpoint`` both come here. The
    block's forward is wrapped on the instance rather than in a wrapper module, so parameter
    names stay the plain model's (state dicts, checkpoints, MetaP's name-keyed LR groups) and
    TP plans, FSDP2 and ``torch.compile`` see the block itself. The model has no random ops, so
    the RNG state is not stashed for the recomputation. Applying it twice changes nothing."""
    for block in model.layers:
        if isinstance(block.forward, functools.partial) and block.forward.func is checkpoint:
            continue
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False, preserve_rng_state=False)


def apply_fsdp(model: Transformer, dims: ParallelDims) -> None:
    cfg = dims.cfg
    mp = MixedPrecisionPolicy(param_dtype=cfg.dtype("param_dtype"), reduce_dtype=cfg.dtype("reduce_dtype"))
    common = dict(mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    for block in model.layers:
        ffn = block.feed_forward
        if isinstance(ffn, MoE) and isinstance(ffn.experts, ExpertParallelExperts):
            fully_shard(ffn.experts, mesh=dims.edp_mesh, **common)
            # The all-to-all backward already summed the ep peers' token gradients into each
            # expert; dividing by edp alone would count them ep times.
            ffn.experts.set_gradient_divide_factor(float(cfg.data_degree))
        fully_shard(block, mesh=dims.dp_mesh, **common)
    # The root group (embedding, final norm, head) is the last to run backward: no need to
    # reshard it after forward.
    fully_shard(model, mesh=dims.dp_mesh, mp_policy=mp, reshard_after_forward=False)


def parallelize(model: Transformer, dims: ParallelDims) -> Transformer:
    """Apply ``dims.cfg`` (TP, EP, activation checkpointing, FSDP2) to ``model`` in place.

    Works on a model on the meta device (then `materialize`) or on a materialised one, whose
    weights are kept: every rank must then hold the same ones (built from the same seed, as the
    training loop does); each keeps its shard."""
    cfg = dims.cfg
    check_divisible(model.args, cfg)
    if cfg.tp > 1:
        apply_tp(model, dims.tp_mesh)
    if cfg.ep > 1:
        apply_ep(model, dims.ep_mesh)
    if cfg.activation_checkpoint:
        apply_ac(model)
    apply_fsdp(model, dims)
    return model


def materialize(model: Transformer, dims: ParallelDims, full_state: dict | None = None,
                init_std: float = 0.02, init_stds: dict | None = None) -> Transformer:
    """Allocate a parallelized meta-device model on ``dims.device`` and fill it: from
    ``full_state`` (an unsharded state dict in our names, needed on rank 0 only: it is broadcast
    and each rank keeps its shard) or else with ``init_weights`` on the shards (``init_stds``: a
    parametrization's per-parameter table, e.g. MetaP's). The latter is the
    way for models too big for one device; its random values match a one-process init only where
    DTensor's RNG tracker runs (CUDA): on CPU each rank draws its shards from its own generator."""
    model.to_empty(device=dims.device)
    with torch.no_grad():
        if full_state is None:
            model.init_weights(init_std, stds=init_stds)
        else:
            model.init_buffers(dims.device)
            opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
            # a shallow copy: the broadcast swaps the dict's values for DTensors in place
            set_model_state_dict(model, dict(full_state) if dims.is_main else {}, options=opts)
    return model


# --------------------------------------------------------------------------------------------
# gradient clipping across meshes

@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` for a model whose gradients live on several meshes (the
    experts' (edp, ep) and the rest's (dp, tp)): the norm of each mesh's group is reduced over
    that group's mesh, then the groups are combined. Returns the total norm (a plain tensor)."""
    groups: dict[object, list[nn.Parameter]] = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            groups[p.grad.device_mesh if isinstance(p.grad, DTensor) else None].append(p)
    norms = []
    for ps in groups.values():
        n = torch.nn.utils.get_total_norm([p.grad for p in ps], norm_type, foreach=True)
        norms.append((n.full_tensor() if isinstance(n, DTensor) else n).float())
    if not norms:
        return torch.zeros(())
    stacked = torch.stack([n.to(norms[0].device) for n in norms])
    total = stacked.max() if math.isinf(norm_type) else stacked.pow(norm_type).sum().pow(1.0 / norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for ps in groups.values():  # scale the local shards in place: no DTensor/plain mixing, no host sync
        local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in ps]
        torch._foreach_mul_(local, coef.to(local[0].device))
    return total
