"""Continuous batching: requests join and leave between decode steps and each still gets exactly
the tokens it would get alone; long prompts are prefilled piece by piece without stalling the
running batch."""

from __future__ import annotations

import random

import pytest
import torch

from llama4.infer.detok import TextStream, split_utf8
from llama4.infer.engine import Engine, EngineConfig, wait_all
from llama4.infer.generation import full_forward_greedy
from llama4.infer.sampling import SamplingParams
from llama4.model import ModelArgs, Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    args = ModelArgs(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4,
                     top_k=1, expert_dim=32, dense_dim=96, interleave_moe_layer_step=2, nope_layer_interval=2,
                     attention_chunk_size=8, floor_scale=4.0, max_seq_len=256)
    torch.manual_seed(0)
    m = Transformer(args)
    m.init_weights(std=0.4)  # O(1)-ish logits: no near-ties to flip
    return m.eval()


def rand_prompts(n, seed, lo=1, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_engine_thread_serves_more_requests_than_rows(model):
    ps = rand_prompts(11, seed=0)
    lens = [5 + (i * 7) % 13 for i in range(len(ps))]
    refs = [full_forward_greedy(model, p, n) for p, n in zip(ps, lens)]
    eng = Engine(model, EngineConfig(max_batch=4, prefill_chunk=16, initial_capacity=8)).start()
    try:
        reqs = [eng.submit(p, n) for p, n in zip(ps, lens)]
        assert wait_all(reqs, timeout=120)
    finally:
        eng.shutdown()
    assert [r.output for r in reqs] == refs
    assert all(r.finish_reason == "length" for r in reqs)
    assert eng.stats["max_running"] == 4
    # batched: far fewer decode steps than tokens
    assert eng.stats["decode_steps"] < sum(lens) / 2


def test_requests_join_and_leave_between_steps(model):
    eng = Engine(model, EngineConfig(max_batch=3, prefill_chunk=4))
    a, b, c = rand_prompts(3, seed=1, lo=6, hi=12)
    ra = eng.submit(a, 30)
    for _ in range(6):
        eng.step()
    assert ra.state == "running" and 0 < len(ra.output) < 30
    rb = eng.submit(b, 5)  # joins while a is mid-generation
    eng.step()
    assert eng.running == 2
    n_a = len(ra.output)
    while not rb.finished:
        eng.step()
    assert len(ra.output) > n_a  # a kept decoding while b was prefilled and ran
    assert rb.finish_reason == "length" and eng.running == 1  # b left; a still running
    rc = eng.submit(c, 4)  # reuses b's row
    while not (ra.finished and rc.finished):
        eng.step()
    assert ra.output == full_forward_greedy(model, a, 30)
    assert rb.output == full_forward_greedy(model, b, 5)
    assert rc.output == full_forward_greedy(model, c, 4)


@pytest.mark.slow
def test_compiled_engine_equals_eager(model):
    """compile=True (static cache, compiled decode steps that skip the full guards once warm):
    requests joining and leaving still get exactly the eager tokens."""
    import copy

    ps = rand_prompts(6, seed=7)
    lens = [4 + (i * 5) % 11 for i in range(len(ps))]
    refs = [full_forward_greedy(model, p, n) for p, n in zip(ps, lens)]
    eng = Engine(copy.deepcopy(model), EngineConfig(max_batch=2, prefill_chunk=16, compile=True))
    reqs = [eng.submit(p, n) for p, n in zip(ps, lens)]
    while not all(r.finished for r in reqs):
        eng.step()
    assert [r.output for r in reqs] == refs


def test_long_prompt_prefill_does_not_stall_decoding(model):
    eng = Engine(model, EngineConfig(max_batch=2, prefill_chunk=8))
    short, long_ = rand_prompts(1, seed=2, lo=3, hi=3)[0], rand_prompts(1, seed=3, lo=100, hi=100)[0]
    rs = eng.submit(short, 30)
    eng.step()
    rl = eng.submit(long_, 3)
    got = []
    while rl.state != "running" and not rl.finished:
        eng.step()
        got.append(len(rs.output))
    assert len(got) >= 100 // 8  # one piece per step
    assert got == sorted(got) and got[-1] - got[0] >= len(got) - 1  # a token per step meanwhile
    while not (rs.finished and rl.finished):
        eng.step()
    assert rl.output == full_forward_greedy(model, long_, 3)
    assert rs.output == full_forward_greedy(model, short, 30)


def test_stop_ids_abort_and_errors(model):
    eng = Engine(model, EngineConfig(max_batch=2, max_context=64))
    p = rand_prompts(1, seed=4)[0][:10]
    full = full_forward_greedy(model, p, 10)
    r = eng.submit(p, 10, stop_ids=[full[3]])
    events = []
    r2 = eng.submit(p, 10, sink=lambda req, ids, fin: events.append((list(ids), fin)))
    eng.step()
    eng.abort(r2)
    while not (r.finished and r2.finished):
        eng.step()
    assert r.output == full[:full.index(full[3]) + 1] and r.finish_reason == "stop"
    assert r2.finish_reason == "abort" and events[-1][1] is True
    assert eng.running == 0
    with pytest.raises(ValueError, match="context limit"):
        eng.submit(p, 60)
    with pytest.raises(ValueError, match="max_tokens"):
        eng.submit(p, 0)
    with pytest.raises(ValueError, match="token ids"):
        eng.submit([300], 3)


def test_sampled_requests_with_seed_do_not_depend_on_batch(model):
    ps = rand_prompts(3, seed=5)
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=7)
    outs = []
    for batch in (3, 1):
        eng = Engine(model, EngineConfig(max_batch=batch)).start()
        try:
            reqs = [eng.submit(p, 8, params) for p in ps]
            assert wait_all(reqs, timeout=60)
        finally:
            eng.shutdown()
        outs.append([r.output for r in reqs])
    assert outs[0] == outs[1]


class ByteTok:
    """Stand-in tokenizer: token i is byte i."""

    def decode_bytes(self, ids):
        return bytes(ids)


def test_text_stream_utf8_and_stop_strings():
    assert split_utf8("é".encode()[:1]) == (b"", b"\xc3")
    assert split_utf8(b"ab" + "€".encode()[:2]) == (b"ab", "€".encode()[:2])
    data = list("héllo € world STOP here".encode())
    ts = TextStream(ByteTok(), stop=["STOP", "zzz"])
    out = "".join(ts.push([t]) for t in data) + ts.flush()
    assert out == "héllo € world " and ts.stopped
    ts = TextStream(ByteTok(), stop=["world"])
    released = [ts.push([t]) for t in list("hello wor".encode())]
    assert "".join(released) == "hello"  # " wor" is held back: it may start "world"
    assert ts.push(list(b"ld!")) == " " and ts.stopped and ts.text == "hello "
    ts = TextStream(ByteTok(), skip_ids=[0])
    assert ts.push([104, 0, 105]) == "hi"
