"""``llama4.generate``: greedy equals transformers' ``generate()`` on the same HF checkpoint;
batched prompts of different lengths equal each prompt alone; stop tokens, sampling, and no
device reads inside the decode loop."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from oracles import require

import llama4
from llama4.infer import generate, generate_stream
from llama4.infer.generation import full_forward_greedy

transformers = require("transformers")
from transformers import Llama4ForCausalLM, Llama4TextConfig  # noqa: E402

VOCAB = 512
# Chunk 8 and floor_scale 4: 40 new tokens cross 5+ chunk boundaries and ~10 temperature steps.
HF_CFG = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=16,
              num_key_value_heads=2, intermediate_size=32, intermediate_size_mlp=96, num_local_experts=4,
              num_experts_per_tok=1, interleave_moe_layer_step=2, use_qk_norm=True, no_rope_layer_interval=2,
              attention_chunk_size=8, floor_scale=4, max_position_embeddings=4096, rope_theta=10000.0,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)

pytestmark = pytest.mark.usefixtures("one_thread")


def redraw_(model, seed: int) -> None:
    """O(1)-scale weights: norms in [0.5, 1.5], embeddings N(0, 1), matrices N(0, 1/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1] if p.dim() == 3 else p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * ((2.0 if "router" in name else 1.0) / math.sqrt(fan_in)))


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tiny")
    torch.manual_seed(0)
    hf = Llama4ForCausalLM(Llama4TextConfig(**HF_CFG)).eval()
    redraw_(hf, seed=1)
    hf.save_pretrained(d)
    ours = llama4.load(d)
    return hf, ours


def prompts(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(hf, prompt, n):
    hf.generation_config.eos_token_id = None  # exactly n tokens
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


@pytest.mark.slow
def test_greedy_equals_transformers_generate(hf_and_ours):
    hf, ours = hf_and_ours
    ps = prompts([1, 5, 13, 22])
    want = [hf_greedy(hf, p, 40) for p in ps]
    alone = [llama4.generate(ours, p, 40) for p in ps]
    assert alone == want
    # the batch: prompts of different lengths decoded together, each as if alone
    assert llama4.generate(ours, ps, 40) == want
    # small prefill pieces (crossing chunk boundaries inside the prompt) change nothing
    assert generate(ours, ps, 40, prefill_chunk=3) == want


def test_generate_equals_uncached_greedy(hf_and_ours):
    _, ours = hf_and_ours
    for p in prompts([2, 9, 17], seed=7):
        assert generate(ours, p, 20, sync_every=5) == full_forward_greedy(ours, p, 20)


def test_stop_tokens_and_lengths(hf_and_ours):
    _, ours = hf_and_ours
    ps = prompts([4, 11], seed=5)
    full = generate(ours, ps, 30)
    stop = full[0][6]  # a token row 0 produces at step 7
    out = generate(ours, ps, 30, stop=[stop])
    k = full[0].index(stop)
    assert out[0] == full[0][:k + 1]  # ends with the stop token
    k1 = full[1].index(stop) + 1 if stop in full[1] else 30
    assert out[1] == full[1][:k1]
    assert generate(ours, ps[0], 0) == []
    assert generate(ours, ps[0], 1) == full[0][:1]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(ours, [1, VOCAB], 3)
    with pytest.raises(ValueError, match="empty"):
        generate(ours, [[1, 2], []], 3)


def test_stream_yields_every_sync(hf_and_ours):
    _, ours = hf_and_ours
    p = prompts([6])[0]
    chunks = [c[0] for c in generate_stream(ours, [p], 23, sync_every=5)]
    assert [len(c) for c in chunks] == [5, 5, 5, 5, 3]  # the first token rides with the first read
    assert sum(chunks, []) == generate(ours, p, 23)


def test_sampling(hf_and_ours):
    _, ours = hf_and_ours
    ps = prompts([3, 8, 15], seed=11)
    greedy = generate(ours, ps, 12)
    a = generate(ours, ps, 12, temperature=1.0, seed=123)
    assert a == generate(ours, ps, 12, temperature=1.0, seed=123)  # reproducible
    assert a != greedy
    # with a seed, each row's tokens do not depend on the other rows of the batch
    assert a == [generate(ours, p, 12, temperature=1.0, seed=123) for p in ps]
    # degenerate filters are greedy
    assert generate(ours, ps, 12, temperature=1.0, top_k=1, seed=1) == greedy
    assert generate(ours, ps, 12, temperature=0.7, top_p=1e-6, seed=1) == greedy
    # top-k restricts draws to the k most likely tokens
    out = generate(ours, ps[0], 1, temperature=5.0, top_k=3, seed=2)
    with torch.no_grad():
        top3 = ours(torch.tensor([ps[0]]))[0, -1].topk(3).indices.tolist()
    assert out[0] in top3
    with pytest.raises(ValueError, match="top_p"):
        generate(ours, ps[0], 2, temperature=1.0, top_p=0.0)


def test_no_device_reads_inside_the_decode_loop(hf_and_ours, monkeypatch):
    """Counts every way Python can pull a value off a tensor during generation: only the
    periodic token read-back (every sync_every steps) may happen."""
    _, ours = hf_and_ours
    p = prompts([7])[0]
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            reads.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    out = generate(ours, [p, p[:3]], 33, temperature=0.8, top_p=0.9, seed=0, sync_every=16)
    monkeypatch.undo()
    assert [len(o) for o in out] == [33, 33]
    assert reads == ["tolist"] * 3, reads  # steps 16, 32, 33: nothing else


def test_moe_gather_path_equals_grouped_and_loop():
    """The decode-sized MoE path ("gather": indexed expert weights) is the same function."""
    from llama4.model import ModelArgs, Transformer

    args = ModelArgs(vocab_size=128, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, n_experts=4,
                     top_k=2, expert_dim=24, dense_dim=48, interleave_moe_layer_step=1, attention_chunk_size=4)
    torch.manual_seed(0)
    m = Transformer(args)
    m.init_weights(std=0.5)
    x = torch.randint(0, 128, (3, 9))
    out = {}
    with torch.no_grad():
        for impl in ("grouped", "loop", "gather"):
            m.set_moe_impl(impl)
            out[impl] = m(x)
    assert (out["gather"] - out["grouped"]).abs().max() < 1e-5
    assert (out["gather"] - out["loop"]).abs().max() < 1e-5


@pytest.mark.slow
def test_compiled_decode_equals_eager(hf_and_ours):
    """torch.compile'd decode steps (static cache, gather MoE; on the CPU, matmuls of up to 4 rows
    as reductions over re-laid-out expert weights, more rows through BLAS) give the eager tokens,
    also when the batch changes between calls: each shape gets its own graph, and guard-light
    calls (``DecodeStep._run``) still pick the right one."""
    ours = copy.deepcopy(hf_and_ours[1])
    two, five = prompts([3, 12], seed=13), prompts([5, 9, 2, 7, 4], seed=14)
    eager_two, eager_five = generate(ours, two, 24), generate(ours, five, 10)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    assert generate(ours, two, 24, compile=True) == eager_two  # one graph: ~20-40 s to build
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters())  # same values
    assert generate(ours, five, 10, compile=True) == eager_five
    assert generate(ours, two, 24, compile=True) == eager_two
    with torch.no_grad():  # weights changed in place (a training step would): the graph sees them
        ours.output.weight.mul_(torch.linspace(0.2, 3.0, VOCAB).unsqueeze(1))
        ours.layers[1].feed_forward.experts.w1.mul_(-1.0)
    changed_two, changed_five = generate(ours, two, 24), generate(ours, five, 10)
    assert changed_two != eager_two and generate(ours, two, 24, compile=True) == changed_two
    assert changed_five != eager_five and generate(ours, five, 10, compile=True) == changed_five
