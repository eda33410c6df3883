"""Same math as one process: 2 CPU processes (gloo) train 5 steps under FSDP2, EP=2, TP=2 and
FSDP2 x EP, and their losses and final parameters match a single-process run on the same global
batch (float32; measured: losses within 4.8e-7, parameters within 3.2e-6, as the README states).
One spawn runs all layouts (process start-up dominates on 2 cores)."""

from __future__ import annotations

import pytest
import torch

from dist_harness import (GLOBAL_BATCH, batches, dump, initial_state, load, make_optimizer, reference_run, spawn,
                          step, tiny_args)

LAYOUTS = {
    "fsdp2": dict(dp=2),
    "ep2": dict(dp=1, ep=2),  # experts split, everything else replicated (HSDP with shard size 1)
    "tp2": dict(tp=2),
    "fsdp2_x_ep2": dict(dp=2, ep=2),
    "fsdp2_ac": dict(dp=2, activation_checkpoint=True),  # recomputation changes memory, not math
    "fsdp2_bf16_params": dict(dp=2, param_dtype="bfloat16"),  # mixed precision: close, not equal
}
# bounds a 10x regression of the README's figures would break
LOSS_TOL = 4e-6
TOL = 1e-5  # parameters


def _worker(rank, world_size, args, state, data, out_dir):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    from llama4.distributed import ParallelConfig, init_parallel
    from llama4.distributed.expert_parallel import ExpertParallelExperts
    from llama4.distributed.parallelize import clip_grad_norm_, materialize, parallelize
    from llama4.model import Transformer

    results = {}
    for name, layout in LAYOUTS.items():
        try:
            dims = init_parallel(ParallelConfig(**layout), torch.device("cpu"))
            with torch.device("meta"):
                model = Transformer(args)
            parallelize(model, dims)
            materialize(model, dims, full_state=state)
            opt = make_optimizer(model)
            b = GLOBAL_BATCH // dims.data_size
            lo = dims.data_rank * b
            losses = []
            for tokens in data:
                loss = step(model, opt, tokens[lo:lo + b], clip_grad_norm_)
                losses.append(dims.all_reduce_data(loss).item() / dims.data_size)
            local = {}  # what this rank actually holds: proves the layout was applied
            for k, p in model.named_parameters():
                local[k] = tuple(p.to_local().shape) if isinstance(p, DTensor) else tuple(p.shape)
            experts = isinstance(model.layers[1].feed_forward.experts, ExpertParallelExperts)
            saved = _saved_bytes(model, data[0][lo:lo + b, :-1])
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            dtypes = {str(p.dtype) for p in model.parameters()}
            results[name] = dict(losses=losses, local=local, experts=experts, dtypes=dtypes, saved=saved,
                                 params={k: v.float() for k, v in full.items()} if rank == 0 else None)
        except Exception as e:  # recorded, so the tests report it; the ranks may now be out of step,
            import traceback  # so the remaining layouts are skipped

            results[name] = dict(error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            break
    dump(results, out_dir / f"rank{rank}.pkl")


def _saved_bytes(model, tokens) -> int:
    """Bytes this rank's blocks save for backward in one forward: storages counted once, the
    weights (whatever FSDP / TP made of them while the block runs) left out."""
    from torch.distributed.tensor import DTensor

    def ptr(t):
        local = t.to_local() if isinstance(t, DTensor) else t
        try:
            st = local.untyped_storage()
            return st.data_ptr(), st.nbytes()
        except RuntimeError:  # a functional collective's result still in flight: its own buffer
            return id(local), local.numel() * local.element_size()

    seen, weights, total, on = set(), set(), [0], [False]

    def enter(block, *_):  # runs after FSDP's pre-forward hook: the gathered weights are in place
        on[0] = True
        weights.clear()  # only this block's: a freed gather buffer's address may hold activations now
        weights.update(ptr(p)[0] for p in block.parameters())

    def pack(t):
        key, nbytes = ptr(t)
        if on[0] and key not in weights and key not in seen:
            seen.add(key)
            total[0] += nbytes
        return t

    hooks = [b.register_forward_pre_hook(enter) for b in model.layers]
    hooks.append(model.norm.register_forward_pre_hook(lambda *a: on.__setitem__(0, False)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens)
    for h in hooks:
        h.remove()
    return total[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    args = tiny_args()
    state = initial_state(args)
    data = batches(args)
    out = tmp_path_factory.mktemp("dist")
    spawn(_worker, 2, args, state, data, out)
    ref_losses, ref_params = reference_run(args, state, data)
    return dict(ref_losses=ref_losses, ref_params=ref_params, init=state, ranks=[load(out / f"rank{r}.pkl") for r in range(2)])


def _result(runs, name):
    for r in runs["ranks"]:
        assert name in r, f"{name} did not run: an earlier layout failed ({[v.get('error') for v in r.values()]})"
    res = [r[name] for r in runs["ranks"]]
    for r in res:
        assert "error" not in r, r.get("error")
    return res


@pytest.mark.parametrize("name", ["fsdp2", "ep2", "tp2", "fsdp2_x_ep2", "fsdp2_ac"])
def test_layout_matches_single_process(runs, name):
    r0, r1 = _result(runs, name)
    ref = runs["ref_losses"]
    assert r0["losses"] == r1["losses"]  # every rank reports the same global loss
    loss_diff = max(abs(got - want) for got, want in zip(r0["losses"], ref))
    worst = max((r0["params"][k] - v).abs().max().item() for k, v in runs["ref_params"].items())
    print(f"{name}: loss {loss_diff:.2g}, parameters {worst:.2g}")
    assert loss_diff <= LOSS_TOL, (name, r0["losses"], ref)
    moved = max((runs["init"][k] - v).abs().max().item() for k, v in runs["ref_params"].items())
    assert moved > 100 * TOL  # the weights really trained, so agreement is not between constants
    assert set(r0["params"]) == set(runs["ref_params"])
    assert worst <= TOL, f"{name}: max parameter difference {worst:.3g} after 5 steps"


def test_layouts_really_split_the_weights(runs):
    E, D, F = 4, 64, 64
    wq_full = (4 * 16, 64)
    fsdp, ep, tp, both = (_result(runs, n)[0] for n in ("fsdp2", "ep2", "tp2", "fsdp2_x_ep2"))
    # FSDP2: dim 0 of every weight halved
    assert fsdp["local"]["layers.0.attention.wq.weight"] == (wq_full[0] // 2, wq_full[1])
    assert fsdp["local"]["layers.1.feed_forward.experts.w1"] == (E // 2, D, F)
    assert not fsdp["experts"]
    # EP=2 alone: experts split over the ep ranks, attention whole on each
    assert ep["experts"]
    assert ep["local"]["layers.1.feed_forward.experts.w1"] == (E // 2, D, F)
    assert ep["local"]["layers.0.attention.wq.weight"] == wq_full
    # TP=2: q column-split (heads), o row-split, shared expert split; router replicated
    assert tp["local"]["layers.0.attention.wq.weight"] == (wq_full[0] // 2, 64)
    assert tp["local"]["layers.0.attention.wo.weight"] == (64, wq_full[0] // 2)
    assert tp["local"]["layers.1.feed_forward.shared_expert.w2.weight"] == (64, F // 2)
    assert tp["local"]["layers.0.feed_forward.w1.weight"] == (128 // 2, 64)
    assert tp["local"]["layers.1.feed_forward.router.weight"] == (E, 64)
    # FSDP2 x EP: experts split by EP (edp = 1), attention sharded by FSDP
    assert both["local"]["layers.1.feed_forward.experts.w1"] == (E // 2, D, F)
    assert both["local"]["layers.0.attention.wq.weight"] == (wq_full[0] // 2, wq_full[1])


def test_bf16_mixed_precision_trains_close_to_fp32(runs):
    r0, _ = _result(runs, "fsdp2_bf16_params")
    ref = runs["ref_losses"]
    diffs = [abs(a - b) for a, b in zip(r0["losses"], ref)]
    assert max(diffs) < 0.05, diffs  # bf16 compute: close to the fp32 run
    assert max(diffs) > TOL, diffs  # and really computing in bf16 (not silently fp32)
    assert r0["dtypes"] == {"torch.float32"}  # the sharded master weights stay fp32


def test_planned_shards_match_the_ranks(runs):
    """`llama4 plan`'s parameters per GPU are what each rank really holds under each layout."""
    from math import prod

    from llama4.distributed.plan import Layout, train_memory

    plans = {"fsdp2": Layout(dp=2), "ep2": Layout(dp=1, dp_replicate=2, ep=2), "tp2": Layout(tp=2),
             "fsdp2_x_ep2": Layout(dp=2, ep=2)}
    for name, layout in plans.items():
        planned = train_memory(tiny_args(), layout, seq=32).params
        for r in _result(runs, name):
            held = sum(prod(shape) for shape in r["local"].values())
            assert held == planned, (name, held, planned)


def test_planned_activations_match_each_rank(runs):
    """What each rank's blocks save for backward under FSDP2 / EP / TP vs `activation_bytes`
    (fp32, tokens of the rank's micro-batch; under EP a rank runs the rows routed to its experts,
    which averages to its own token count)."""
    from llama4.distributed.plan import activation_bytes

    tokens = {"fsdp2": 2, "ep2": 2, "tp2": 4, "fsdp2_x_ep2": 2}  # sequences per rank
    for name, seqs in tokens.items():
        tp, ep = (2 if name == "tp2" else 1), (2 if "ep" in name else 1)
        planned = activation_bytes(tiny_args(), seqs * 32, 4, tp=tp, ep=ep).layers
        got = [r["saved"] for r in _result(runs, name)]
        tol = 0.05 if ep > 1 else 0.03  # EP: each rank's share of the routed rows varies a little
        assert abs(sum(got) / 2 - planned) <= tol * planned, (name, got, planned)
    ac = _result(runs, "fsdp2_ac")[0]["saved"]
    assert ac < 0.25 * _result(runs, "fsdp2")[0]["saved"]  # checkpointed blocks keep only their inputs
