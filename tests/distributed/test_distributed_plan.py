"""`llama4 plan` arithmetic against measured memory on debug-size models.

* activations: the bytes each block really saves for backward (autograd's saved-tensor hooks,
  storages counted once, parameters excluded) vs `layer_activation_bytes`, per layer, fp32 and bf16;
* a whole training step: torch's MemTracker (every tensor allocation, by category) peak vs the
  planned peak, with and without activation checkpointing;
* sharding: what each of 2 ranks holds under FSDP2, EP, TP (tests/distributed/test_distributed_parallel.py
  records it) vs the planned parameters per GPU — see test_planned_shards_match_the_ranks there.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from llama4.distributed.plan import (Layout, activation_bytes, kv_cache_bytes, layer_activation_bytes, parse_gpus,
                                     parse_tokens, serve_memory, split_params, train_memory)
from llama4.model import Transformer, count_params, flavor

DEBUG = flavor("debug")
# Maverick-like switches: no QK-norm, top-2, every layer MoE, dense FFN nowhere
VARIANT = DEBUG.replace(use_qk_norm=False, top_k=2, interleave_moe_layer_step=1)


def _model(args, dtype):
    torch.manual_seed(0)
    m = Transformer(args)
    m.init_weights()
    return m.to(dtype)


def saved_bytes_per_layer(model, tokens) -> list[int]:
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    per = [0] * len(model.layers)
    seen: set[int] = set()
    cur = [None]

    def pack(t):
        st = t.untyped_storage()
        if cur[0] is not None and st.data_ptr() not in params and st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            per[cur[0]] += st.nbytes()
        return t

    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: cur.__setitem__(0, i))
             for i, layer in enumerate(model.layers)]
    hooks.append(model.norm.register_forward_pre_hook(lambda *a: cur.__setitem__(0, None)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens)
    for h in hooks:
        h.remove()
    return per


@pytest.mark.parametrize("args", [DEBUG, VARIANT], ids=["debug", "variant"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_activation_formula_matches_saved_tensors(args, dtype):
    B, T = 2, 128  # two chunks of 64 in the RoPE layers
    model = _model(args, dtype)
    tokens = torch.randint(0, args.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    measured = saved_bytes_per_layer(model, tokens)
    a = torch.finfo(dtype).bits // 8
    for i, got in enumerate(measured):
        want = layer_activation_bytes(args, i, a) * B * T
        assert abs(got - want) <= 0.02 * want, (i, got, want)


def _memtracker_peak(args, B, T, ac: bool) -> float:
    from torch.distributed._tools.mem_tracker import MemTracker

    from llama4.distributed.parallelize import apply_ac

    model = _model(args, torch.float32)
    if ac:
        apply_ac(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, args.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))

    def step():
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # optimizer states exist from here on, as in any step after the first
    mt = MemTracker()
    mt.track_external(model, opt)
    with mt:
        step()
    return mt.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


@pytest.mark.parametrize("ac", [False, True], ids=["no_ac", "ac"])
def test_planned_peak_matches_memtracker(ac):
    B, T = 2, 256
    measured = _memtracker_peak(DEBUG, B, T, ac)
    plan = train_memory(DEBUG, Layout(activation_checkpoint=ac), seq=T, micro_batch=B, compute_bytes=4, fsdp=False)
    assert abs(plan.peak - measured) <= 0.05 * measured, (plan.peak, measured)


def test_activation_checkpointing_saves_what_the_plan_says():
    B, T = 2, 256
    off, on = (_memtracker_peak(DEBUG, B, T, ac) for ac in (False, True))
    p_off, p_on = (activation_bytes(DEBUG, B * T, 4, ac=ac).peak for ac in (False, True))
    assert abs((off - on) - (p_off - p_on)) <= 0.05 * (p_off - p_on)


def test_parameter_split_matches_the_model_group_by_group():
    """The planner's formula against the parameters of the model itself (built on the meta device),
    grouped by how the layouts split them; VARIANT has attention biases and no dense layer."""
    for args in (DEBUG, VARIANT.replace(attention_bias=True), flavor("scout"), flavor("maverick")):
        with torch.device("meta"):
            model = Transformer(args)
        got = {"tp_split": 0, "replicated": 0, "experts": 0}
        for name, p in model.named_parameters():
            if ".experts." in name:
                got["experts"] += p.numel()
            elif ".attention.w" in name or (".feed_forward." in name and ".router." not in name):
                got["tp_split"] += p.numel()  # q/k/v/o, dense FFN, shared expert
            else:
                got["replicated"] += p.numel()  # embedding, head, norms, router
        split = split_params(args)
        assert {k: getattr(split, k) for k in got} == got
        assert split.total == count_params(args)["total"]


def test_scout_numbers_match_llama4_md():
    scout = flavor("scout")
    kv = kv_cache_bytes(scout, 10_485_760)
    assert abs(kv["global"] / 2**30 - 480) < 0.5  # "48 KiB/token -> 480 GiB for 10 485 760 tokens"
    assert abs(kv["naive"] / 1e12 - 2.06) < 0.01  # "naive full cache 2.06 TB"
    assert abs(kv["local"] / 1e9 - 1.2) < 0.05  # "+ 1.2 GB for the local layers"
    assert abs(split_params(scout).total * 2 / 1e9 - 215.5) < 1  # bf16 weights (text decoder)
    one = serve_memory(scout, 8, 10_485_760)
    assert one.tp == 8 and one.cp == 1 and one.kv > 60 * 2**30  # 10M on one 8-GPU host: KV alone > 60 GiB/GPU


def test_fsdp_divides_static_memory_by_the_data_ranks():
    args = flavor("scout")
    one, eight = (train_memory(args, Layout(dp=d), 8192) for d in (1, 8))
    assert abs(one.weights / eight.weights - 8) < 1e-9
    ep = train_memory(args, Layout(dp=8, ep=8), 8192)
    assert ep.weights == eight.weights and ep.fsdp_buffers < eight.fsdp_buffers  # EP: gathers E/8 experts


def test_parsers():
    assert parse_gpus("8x80GB") == (8, 80 * 2**30)
    assert parse_tokens("10M") == 10_485_760 and parse_tokens("128k") == 131072 and parse_tokens("8192") == 8192
    with pytest.raises(ValueError):
        parse_gpus("eight")


def test_cli_plan_prints_layouts_and_context():
    out = subprocess.run([sys.executable, "-m", "llama4", "plan", "--flavor", "scout", "--gpus", "32x80GB",
                          "--seq", "8192", "--context", "10M"], capture_output=True, text=True, check=True).stdout
    assert "dp32 ep16" in out and "yes" in out  # Scout trains on 32 H100s
    assert "KV 481.1 GiB" in out and "fewest GPUs of this size that hold it: 16" in out
