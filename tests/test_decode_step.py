"""The CPU decode step's pieces (``llama4.infer.step``): few-row matmuls written as reductions,
and routed-expert weights re-laid out in memory, are the same functions as before."""

from __future__ import annotations

import pytest
import torch

import llama4
from llama4.infer.step import SMALL_ROWS, _small_bmm, _small_mm, relayout_experts_for_decode
from llama4.model import ModelArgs, Transformer


@pytest.mark.parametrize("rows", [1, 3, SMALL_ROWS])
def test_small_matmuls_are_matmuls(rows):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, 48, generator=g), torch.randn(40, 48, generator=g)  # nn.Linear weight
    torch.testing.assert_close(_small_mm(x, w.t()), x @ w.t())
    xb, wb = torch.randn(5, rows, 48, generator=g), torch.randn(5, 40, 48, generator=g)
    torch.testing.assert_close(_small_bmm(xb, wb.transpose(1, 2)), xb @ wb.transpose(1, 2))


def test_small_matmuls_leave_other_shapes_to_blas():
    x, w = torch.randn(SMALL_ROWS + 1, 8), torch.randn(6, 8)
    assert _small_mm(x, w.t()) is NotImplemented  # too many rows
    assert _small_mm(x[:1], w.t().contiguous()) is NotImplemented  # reduction dim not contiguous
    assert _small_bmm(x[None, :1], w.t().contiguous()[None]) is NotImplemented


def test_relayout_keeps_the_model_and_its_checkpoint(tmp_path):
    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, n_experts=4,
                     top_k=2, expert_dim=24, dense_dim=48, interleave_moe_layer_step=1, attention_chunk_size=4)
    torch.manual_seed(0)
    m = Transformer(args)
    m.init_weights(std=0.5)
    x = torch.randint(0, 64, (3, 9))
    with torch.no_grad():
        before = {impl: m.set_moe_impl(impl) or m(x) for impl in ("grouped", "loop", "gather")}
        params = {n: p for n, p in m.named_parameters()}
        relayout_experts_for_decode(m)
        w1 = m.layers[0].feed_forward.experts.w1
        assert w1.shape == (4, 32, 24) and w1.stride(-2) == 1  # [E, in, out] over [E, out, in] memory
        assert all(p is params[n] for n, p in m.named_parameters())  # the same Parameters
        for impl, ref in before.items():
            m.set_moe_impl(impl)
            torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)
    llama4.save(m, tmp_path)
    torch.testing.assert_close(llama4.load(tmp_path)(x), before["loop"], atol=1e-5, rtol=1e-5)


def test_guard_skipping_needs_a_static_cache_and_the_cache_needs_a_plan():
    """A compiled step skips Dynamo's guards once warm, which is only safe when nothing its graph
    specializes on can change under one signature: a dynamic cache's key count does, every step."""
    from llama4.infer import DecodeStep, KVCache

    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, n_experts=4,
                     top_k=1, expert_dim=24, dense_dim=48, interleave_moe_layer_step=2, attention_chunk_size=4)
    torch.manual_seed(0)
    m = Transformer(args).eval()
    m.init_weights(std=0.5)
    cache = KVCache.for_model(m, 1, 16)
    cache.prefill(m, torch.tensor([[1, 2, 3]]), 0)
    cache.set_decoding(0, True)
    with torch.no_grad(), pytest.raises(ValueError, match="static=True"):
        cache.decode(DecodeStep(m, compile=True), torch.tensor([[4]]))
    with torch.no_grad(), pytest.raises(RuntimeError, match="through KVCache.prefill or KVCache.decode"):
        m(torch.tensor([[4]]), positions=torch.tensor([3]), cache=cache)  # no write plan: refused


def test_compiled_step_runs_at_its_measured_thread_count_and_restores_torchs(monkeypatch):
    """Inductor bakes the thread count into its kernels, so the compiled CPU step picks one (1 or
    torch's, by a timed proxy), compiles and runs every call under it, and leaves torch's setting
    as it found it; its tokens are the eager ones either way."""
    from llama4.infer import step as step_mod

    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, n_experts=4,
                     top_k=1, expert_dim=24, dense_dim=48, interleave_moe_layer_step=2, attention_chunk_size=4)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert step_mod.decode_threads(Transformer(args)) == 1  # nothing to choose: no measurement
        torch.set_num_threads(2)
        t1, t2 = step_mod._proxy_times(2, 32, 48, 2)
        assert t1 > 0 and t2 > 0
        assert step_mod.decode_threads(Transformer(args), quiet=True) in (1, 2)
        for forced in (1, 2):
            monkeypatch.setattr(step_mod, "decode_threads", lambda model, quiet=False, n=forced: n)
            torch.manual_seed(0)
            m = Transformer(args).eval()
            m.init_weights(std=0.5)
            eager = llama4.generate(m, [1, 2, 3, 4, 5], max_new_tokens=6)
            seen = []  # threads when the whole-step graph is compiled and at each of its calls
            real = step_mod.DecodeStep._trace_whole

            def traced(self, *a):
                seen.append(torch.get_num_threads())
                graph = real(self, *a)
                return lambda args: seen.append(torch.get_num_threads()) or graph(args)

            monkeypatch.setattr(step_mod.DecodeStep, "_trace_whole", traced)
            assert llama4.generate(m, [1, 2, 3, 4, 5], max_new_tokens=6, compile=True) == eager
            monkeypatch.setattr(step_mod.DecodeStep, "_trace_whole", real)
            assert len(seen) == 6 and set(seen) == {forced}  # compiled once, 5 decode steps
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def test_eager_one_row_steps_run_at_their_measured_thread_count(monkeypatch):
    """Eager CPU decode picks a thread count for one-row steps (1 or torch's, timed on the model's
    own FFNs, once per model and count); steps of several rows and prefill keep torch's; torch's
    setting is restored after every step; the tokens do not depend on the pick."""
    from llama4.infer import step as step_mod

    args = ModelArgs(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, n_experts=4,
                     top_k=1, expert_dim=24, dense_dim=48, interleave_moe_layer_step=2, attention_chunk_size=4)
    torch.manual_seed(0)
    m = Transformer(args).eval()
    m.init_weights(std=0.5)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert step_mod.eager_decode_threads(m) == 1  # nothing to choose: no measurement
        assert m not in step_mod._eager_threads
        torch.set_num_threads(2)
        pick = step_mod.eager_decode_threads(m, quiet=True)
        assert pick in (1, 2) and step_mod._eager_threads[m] == {2: pick}
        outs = {}
        for forced in (1, 2):
            step_mod._eager_threads[m] = {2: forced}
            seen = []  # (rows, threads) at each model call
            real = type(m).forward

            def spy(self, tokens, *a, **k):
                seen.append((tokens.shape[0], torch.get_num_threads()))
                return real(self, tokens, *a, **k)

            monkeypatch.setattr(type(m), "forward", spy)
            outs[forced] = (llama4.generate(m, [1, 2, 3, 4, 5], max_new_tokens=6),
                            llama4.generate(m, [[1, 2, 3], [4, 5, 6, 7]], max_new_tokens=4))
            monkeypatch.setattr(type(m), "forward", real)
            assert torch.get_num_threads() == 2
            one_row = [t for rows, t in seen if rows == 1]
            assert one_row[0] == 2 and set(one_row[1:6]) == {forced}  # prefill, then 5 one-row steps
            assert {t for rows, t in seen if rows == 2} == {2}  # batch-2 steps keep torch's count
        assert outs[1] == outs[2]
    finally:
        torch.set_num_threads(saved)


def test_whole_step_graph_is_the_eager_step_and_reads_the_current_weights():
    """A compiled CPU step over a static cache runs the device side of KVCache.decode as one graph
    of flat tensors (DecodeStep.decode_whole): its logits, key/value writes and position updates
    are the eager step's, for rows of different lengths and a row that is not decoding; weights
    changed in place after compiling are the ones it reads; grad mode and a dynamic cache keep
    the other path."""
    from llama4.infer import DecodeStep, KVCache

    args = ModelArgs(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, n_experts=4,
                     top_k=1, expert_dim=24, dense_dim=48, interleave_moe_layer_step=2, attention_chunk_size=4,
                     nope_layer_interval=2, floor_scale=4.0, attn_scale=0.5)
    torch.manual_seed(0)
    m = Transformer(args).eval()
    m.init_weights(std=0.5)
    step = DecodeStep(m, compile=True)
    caches = {"eager": KVCache.for_model(m, 4, 24), "whole": KVCache.for_model(m, 4, 24, static=True)}
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (1, n), generator=g) for n in (3, 6, 5)]
    with torch.no_grad():
        for c in caches.values():
            for r, p in enumerate(prompts):  # rows 0-2; row 3 stays free (scratch writes)
                c.prefill(m, p, r)
                c.set_decoding(r, r != 1)  # row 1: prefilled, not decoding
        assert step.decode_whole(caches["eager"], torch.zeros(4, 1, dtype=torch.long)) is None  # dynamic
        with torch.enable_grad():
            assert step.decode_whole(caches["whole"], torch.zeros(4, 1, dtype=torch.long)) is None
        for t in range(9):
            if t == 5:
                m.output.weight.mul_(-1.5)  # in place, after the graph was compiled
            tok = torch.randint(0, 64, (4, 1), generator=g)
            ref = caches["eager"].decode(m, tok)
            got = caches["whole"].decode(step, tok)
            for r in (0, 2):
                torch.testing.assert_close(got[r], ref[r], atol=1e-4, rtol=1e-4)
    assert len(step._graphs) == 1  # one signature, compiled once
    e, w = caches["eager"], caches["whole"]
    assert torch.equal(e.pos, w.pos) and e.lengths == w.lengths == [12, 6, 14, 0]
    for le, lw in zip(e.layers, w.layers):
        n = min(le.size, lw.size)
        for r in range(3):
            keep = slice(0, min(n, e.lengths[r]))
            torch.testing.assert_close(lw.k[r, :, keep], le.k[r, :, keep], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(lw.v[r, :, keep], le.v[r, :, keep], atol=1e-5, rtol=1e-5)
