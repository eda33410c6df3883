"""DCP checkpoints: a 2-process FSDP2 x EP run saves (model, optimizer, loader, RNG, MoE biases)
after 3 steps and trains 2 more; resuming that checkpoint on 1 process (a different world size)
and on 2 processes under TP=2 reproduces those 2 steps. The checkpoint converts to the HF layout
(read back by llama4.load and by transformers) and back to DCP."""

from __future__ import annotations

import json

import pytest
import torch

from oracles import require

from dist_harness import (GLOBAL_BATCH, SEQ, dump, initial_state, load, loader_step, make_optimizer, spawn,
                          synthetic_shards, tiny_args)

TOL = 1e-5
BIAS = [0.0, 0.3, -0.2, 0.1]  # a non-zero MoE selection bias, which only the checkpoint carries


def _setup(layout, args, data_dir, state=None):
    from llama4.data.loader import PackedLoader
    from llama4.distributed import ParallelConfig, init_parallel
    from llama4.distributed.parallelize import materialize, parallelize
    from llama4.model import Transformer

    dims = init_parallel(ParallelConfig(**layout), torch.device("cpu"))
    with torch.device("meta"):
        model = Transformer(args)
    parallelize(model, dims)
    materialize(model, dims, full_state=state)
    loader = PackedLoader(data_dir, batch_size=GLOBAL_BATCH // dims.data_size, seq_len=SEQ, seed=0,
                          rank=dims.data_rank, world_size=dims.data_size)
    return dims, model, make_optimizer(model), loader


def _full(model):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _train(dims, model, opt, loader, n):
    from llama4.distributed.parallelize import clip_grad_norm_

    out = []
    for _ in range(n):
        loss = loader_step(model, opt, loader.next_batch(), clip_grad_norm_)
        out.append(dims.all_reduce_data(loss).item() / dims.data_size)
    return out


def _save_worker(rank, world_size, args, state, data_dir, out):
    from llama4.distributed import checkpoint as ckpt
    from llama4.distributed.expert_parallel import ExpertParallelExperts

    dims, model, opt, loader = _setup(dict(dp=2, ep=2), args, data_dir, state)
    assert isinstance(model.layers[1].feed_forward.experts, ExpertParallelExperts)
    before = _train(dims, model, opt, loader, 3)
    model.layers[1].feed_forward.expert_bias.copy_(torch.tensor(BIAS))
    torch.manual_seed(100 + rank)
    ckpt.save(out / "ckpt", model, opt, loader=loader, extra={"step": 3})
    rng_next = torch.rand(3)
    saved = _full(model)
    after = _train(dims, model, opt, loader, 2)
    dump(dict(before=before, after=after, rng_next=rng_next, saved=saved if rank == 0 else None,
              final=_full(model)), out / f"save{rank}.pkl")


def _resume_worker(rank, world_size, layout, args, data_dir, out, tag):
    from llama4.distributed import checkpoint as ckpt

    dims, model, opt, loader = _setup(layout, args, data_dir)  # random init: everything must come from disk
    torch.manual_seed(999)
    extra = ckpt.load(out / "ckpt", model, opt, loader=loader)
    rng_next = torch.rand(3)
    bias = model.layers[1].feed_forward.expert_bias.clone()
    after = _train(dims, model, opt, loader, 2)
    final = _full(model)
    # the HF checkpoint converted back to DCP: model only, into this layout
    _, model2, opt2, _ = _setup(layout, args, data_dir)
    ckpt.load(out / "from_hf", model2, opt2)
    dump(dict(extra=extra, rng_next=rng_next, bias=bias, after=after, final=final, from_hf=_full(model2)),
         out / f"{tag}{rank}.pkl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from llama4.distributed import checkpoint as ckpt

    args = tiny_args()
    out = tmp_path_factory.mktemp("dcp")
    data_dir = synthetic_shards(out / "data", args.vocab_size)
    spawn(_save_worker, 2, args, initial_state(args), data_dir, out)
    ckpt.dcp_to_hf(out / "ckpt", out / "hf")
    ckpt.hf_to_dcp(out / "hf", out / "from_hf")
    spawn(_resume_worker, 1, dict(dp=1), args, data_dir, out, "one")
    spawn(_resume_worker, 2, dict(tp=2), args, data_dir, out, "tp")
    return dict(out=out, args=args, save=[load(out / f"save{r}.pkl") for r in range(2)],
                one=[load(out / "one0.pkl")], tp=[load(out / f"tp{r}.pkl") for r in range(2)])


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_checkpoint_is_sharded_and_complete(runs):
    from llama4.distributed.checkpoint import saved_keys

    out = runs["out"]
    files = sorted(p.name for p in (out / "ckpt").iterdir())
    assert ".metadata" in files and sum(f.endswith(".distcp") for f in files) == 2  # one file per rank
    keys = saved_keys(out / "ckpt")
    assert "model.layers.1.feed_forward.experts.w1" in keys  # the model's own names, not wrappers'
    assert any(k.startswith("optim.state.layers.1.feed_forward.experts.w1") for k in keys)
    assert {"loader", "rng.rank0", "rng.rank1", "buffers.layers.1.feed_forward.expert_bias"} <= keys
    assert not any(p.name.startswith(".tmp-") for p in out.iterdir())  # no temporary left behind


@pytest.mark.parametrize("tag", ["one", "tp"])
def test_resume_at_another_layout_continues_the_run(runs, tag):
    saved = runs["save"][0]
    for r, res in enumerate(runs[tag]):
        assert res["extra"] == {"step": 3}
        assert torch.equal(res["bias"], torch.tensor(BIAS))
        assert torch.equal(res["rng_next"], runs["save"][r]["rng_next"])  # rank r's RNG came back
        assert all(abs(a - b) <= TOL for a, b in zip(res["after"], saved["after"])), (res["after"], saved["after"])
    assert _max_diff(runs[tag][0]["final"], saved["final"]) <= TOL  # full weights gather on rank 0
    # the run kept training after the save, so matching it is not matching the saved weights
    assert _max_diff(saved["final"], saved["saved"]) > 100 * TOL


def test_dcp_to_hf_reads_back_in_llama4_and_transformers(runs):
    import llama4

    transformers = require("transformers")
    out, saved = runs["out"], runs["save"][0]["saved"]
    ours = llama4.load(out / "hf")
    assert _max_diff(ours.state_dict(), saved) == 0.0
    hf = transformers.Llama4ForCausalLM.from_pretrained(out / "hf", torch_dtype=torch.float32).eval()
    tokens = torch.randint(0, runs["args"].vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(tokens)
        got = hf(tokens).logits
    # (the MoE selection bias is training state, absent from HF layouts: inference routes unbiased)
    assert (got - want).abs().max().item() < 1e-4
    cfg = json.loads((out / "hf" / "config.json").read_text())
    assert cfg["num_local_experts"] == runs["args"].n_experts


def test_hf_back_to_dcp_loads_into_any_layout(runs):
    from llama4.distributed.checkpoint import load_full_model

    saved = runs["save"][0]["saved"]
    assert _max_diff(load_full_model(runs["out"] / "from_hf").state_dict(), saved) == 0.0
    for tag in ("one", "tp"):
        assert _max_diff(runs[tag][0]["from_hf"], saved) == 0.0


def test_loader_refuses_a_different_global_batch(runs, tmp_path):
    from llama4.data.loader import PackedLoader
    from llama4.distributed.checkpoint import loader_state, restore_loader

    data = runs["out"] / "data"
    a0, a1 = (PackedLoader(data, batch_size=2, seq_len=SEQ, rank=r, world_size=2) for r in range(2))
    a0.next_batch(), a1.next_batch()
    s = loader_state(a0)
    b = PackedLoader(data, batch_size=4, seq_len=SEQ, world_size=1)
    restore_loader(b, s)
    # one rank now reads exactly what the two ranks would have read next
    assert torch.equal(b.next_batch().inputs, torch.cat([a0.next_batch().inputs, a1.next_batch().inputs]))
    c = PackedLoader(data, batch_size=2, seq_len=SEQ, world_size=1)
    with pytest.raises(ValueError, match="global batch"):
        restore_loader(c, s)
