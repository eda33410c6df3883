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
            seen = []
            real = step_mod.DecodeStep._run
            monkeypatch.setattr(step_mod.DecodeStep, "_run",
                                lambda self, *a: seen.append(torch.get_num_threads()) or real(self, *a))
            assert llama4.generate(m, [1, 2, 3, 4, 5], max_new_tokens=6, compile=True) == eager
            monkeypatch.setattr(step_mod.DecodeStep, "_run", real)
            assert seen and set(seen) == {forced}
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
