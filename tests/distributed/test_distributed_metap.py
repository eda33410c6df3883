"""MetaP under the parallel layouts: its per-layer AdamW groups (built from module structure, so
they must survive FSDP2/TP/EP wrapping) and its forward multipliers train the same in 2 CPU
processes as in one (float32, 5 steps, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from dist_harness import GLOBAL_BATCH, LR, batches, dump, load, spawn, step, tiny_args

LAYOUTS = {"fsdp2": dict(dp=2), "tp2": dict(tp=2), "fsdp2_x_ep2": dict(dp=2, ep=2)}
TOL = 1e-5


def _plan(args):
    from llama4.metap import BaseShape, MetaP, MetaPConfig

    base = BaseShape(dim=32, n_layers=2, attn_dim=32, head_dim=16, dense_dim=64, expert_dim=32, n_experts=4)
    return MetaP(MetaPConfig(base=base, output_mult=2.0, embed_lr_mult=2.0), args)


def _optimizer(model, plan):
    from llama4.train.optim import set_lr

    opt = torch.optim.AdamW(plan.param_groups(model, 0.1, 1e-8), lr=LR, betas=(0.9, 0.95))
    set_lr(opt, LR)  # each group gets LR x its MetaP multiplier
    return opt


def _worker(rank, world_size, args, state, data, out_dir):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from llama4.distributed import ParallelConfig, init_parallel
    from llama4.distributed.parallelize import clip_grad_norm_, materialize, parallelize
    from llama4.model import Transformer

    plan = _plan(args)
    results = {}
    for name, layout in LAYOUTS.items():
        dims = init_parallel(ParallelConfig(**layout), torch.device("cpu"))
        with torch.device("meta"):
            model = Transformer(plan.model_args())
        parallelize(model, dims)
        materialize(model, dims, full_state=state)
        opt = _optimizer(model, plan)
        b = GLOBAL_BATCH // dims.data_size
        lo = dims.data_rank * b
        losses = [dims.all_reduce_data(step(model, opt, t[lo:lo + b], clip_grad_norm_)).item() / dims.data_size
                  for t in data]
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        results[name] = dict(losses=losses, groups=len(opt.param_groups),
                             params={k: v.float() for k, v in full.items()} if rank == 0 else None)
    dump(results, out_dir / f"rank{rank}.pkl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from llama4.model import Transformer

    args = tiny_args()
    plan = _plan(args)
    margs = plan.model_args()
    assert margs.residual_mult == 0.5 and margs.logit_mult == 1.0  # depth 4 vs 2; 2.0 / (64 / 32)
    torch.manual_seed(0)
    ref = Transformer(margs)
    plan.init_weights(ref)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    data = batches(args)
    out = tmp_path_factory.mktemp("dist_metap")
    spawn(_worker, 2, args, state, data, out)
    torch.set_flush_denormal(True)
    opt = _optimizer(ref, plan)
    ref_losses = [step(ref, opt, t, torch.nn.utils.clip_grad_norm_).item() for t in data]
    return dict(ref_losses=ref_losses, ref_params=ref.state_dict(), init=state, n_groups=len(opt.param_groups),
                ranks=[load(out / f"rank{r}.pkl") for r in range(2)])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_metap_layout_matches_single_process(runs, name):
    r0, r1 = (r[name] for r in runs["ranks"])
    assert r0["groups"] == r1["groups"] == runs["n_groups"] > 2  # MetaP's groups, not the standard two
    for got, want in zip(r0["losses"], runs["ref_losses"]):
        assert abs(got - want) <= TOL, (name, r0["losses"], runs["ref_losses"])
    worst = max((r0["params"][k] - v).abs().max().item() for k, v in runs["ref_params"].items())
    moved = max((runs["init"][k] - v).abs().max().item() for k, v in runs["ref_params"].items())
    assert moved > 100 * TOL and worst <= TOL, (name, worst)
