"""Compiled decode over compact weights (llama4/quant/fused.py): the fused dequantizing reductions
against the dequantized float twin, the choice that keeps them only where they measured faster,
and a whole quantized model decoding compiled as it does eager. No timings are asserted."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llama4
from llama4.infer.step import compile_for_decode
from llama4.quant import apply, formats, fused
from llama4.quant.layers import QuantExperts, QuantLinear
from serving import write_tiny_model_dir

SCHEMES = [("bf16", None), ("fp16", None), ("int8", None), ("int4", 32), ("int4", 64)]


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("scheme,g", SCHEMES)
def test_compiled_fused_linear_matches_dequantized_twin(scheme, g, one_thread):
    """The reduction compiled by the decode backend, at 1 row (decode) and 3, against F.linear
    over the dequantized weight: within 1e-3 relative (fp32 accumulation; only the order differs)."""
    torch.manual_seed(0)
    st = formats.quantize(torch.randn(48, 128), scheme, g)
    twin = formats.dequantize(st, scheme)
    form = fused.linear_form(scheme, st, g)
    names = sorted(form)
    for rows in (1, 3):
        x = torch.randn(rows, 128)
        run = compile_for_decode(lambda x, *ts: fused.linear(scheme, x, dict(zip(names, ts)), g),
                             [x, *(form[k] for k in names)])
        y = run([x, *(form[k] for k in names)])
        y = y[0] if isinstance(y, (list, tuple)) else y
        assert y.shape == (rows, 48) and y.dtype == torch.float32
        assert rel(y, F.linear(x, twin)) < 1e-3


@pytest.mark.parametrize("scheme,g", SCHEMES)
def test_fused_expert_gather_is_the_selected_dequantized_experts_with_inputs_contiguous(scheme, g):
    torch.manual_seed(0)
    w = torch.randn(4, 64, 32)  # (E, in, out)
    st = formats.quantize(w, scheme, g, axis=-2)
    twin = formats.dequantize(st, scheme, axis=-2)
    ids = torch.tensor([[2], [0]])
    sel = fused.gather_experts(scheme, fused.experts_form(scheme, st, g), ids, g)
    assert sel.shape == (2, 1, 64, 32) and sel.stride(-2) == 1  # the decode backend reduces over `in`
    assert torch.allclose(sel, twin[ids], atol=1e-6)


def _quantized_model(tmp_path, scheme, g):
    from llama4.quant.checkpoint import quantize_dir

    src = write_tiny_model_dir(tmp_path / "src")
    return llama4.load(quantize_dir(src, tmp_path / scheme, scheme, g))


def test_choice_keeps_the_fused_reduction_only_where_it_measured_faster(tmp_path, monkeypatch, capsys, one_thread):
    m = _quantized_model(tmp_path, "int8", None)
    # the fp32 reduction faster everywhere: every layer keeps its load-time path (never slower)
    monkeypatch.setattr(fused, "time_linear", lambda *a: (1.0, 1.05))
    chosen = apply.prepare_compiled(m)
    assert "fused" not in chosen.values()
    assert all(q.fused_rows == 0 for q in m.modules() if isinstance(q, QuantLinear))
    assert not any(q.fused for q in m.modules() if isinstance(q, QuantExperts))
    # faster only for wide layers (out >= 128 here): those and only those take it, at one row
    monkeypatch.setattr(fused, "time_linear",
                        lambda scheme, st, g, deq, rows: (2.0, 1.0) if deq.shape[0] >= 128 else (1.0, 1.0))
    chosen = apply.prepare_compiled(m)
    for name, q in m.named_modules():
        if isinstance(q, QuantLinear):
            assert (chosen[name] == "fused") == (q.out_features >= 128) == (q.fused_rows == 1)
            assert (chosen[name] == "fused") or chosen[name] == q.path
    assert "fused" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("scheme,g", [("int4", 32)])
def test_compiled_quantized_decode_matches_eager(tmp_path, scheme, g, one_thread, monkeypatch):
    """Whole model, every layer forced onto the fused reductions: compiled greedy decode gives
    eager's tokens (the float arithmetic of the dequantized weights, summed in another order)."""
    m = _quantized_model(tmp_path, scheme, g)
    monkeypatch.setattr(fused, "time_linear", lambda *a: (2.0, 1.0))
    prompt = list(range(5, 25))
    eager = llama4.generate(m, prompt, max_new_tokens=12)
    compiled = llama4.generate(m, prompt, max_new_tokens=12, compile=True)
    assert all(q.fused_rows == 1 for q in m.modules() if isinstance(q, QuantLinear))
    assert all(q.fused for q in m.modules() if isinstance(q, QuantExperts))
    assert compiled == eager


def test_experts_dequantized_per_token_use_the_fp32_copy_for_several_tokens():
    """The load-time choice 'dequant' (made at one token) keeps an fp32 copy that batches use:
    same values either way, and several tokens never take the per-expert dequantization."""
    torch.manual_seed(0)
    m = QuantExperts(32, 64, 4, "bf16")
    for w in m.NAMES:
        getattr(m, f"{w}_q").copy_(torch.randn(m.dims[w]).to(torch.bfloat16))
    m.set_path("dequant", 1.2, fp32_for_several=True)
    one, several = torch.tensor([[2]]), torch.tensor([[2], [0]])
    deq = {w: m.dequantized(w) for w in m.NAMES}
    assert torch.equal(m.w1[one], deq["w1"][one])
    calls = []
    real = formats.dequantize
    monkey = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
    import llama4.quant.layers as layers
    layers.dequantize, saved = monkey, layers.dequantize
    try:
        assert torch.equal(m.w1[several], deq["w1"][several]) and not calls
        x, counts = torch.randn(3, 32), torch.tensor([1, 0, 2, 0])
        y = m(x, counts)
        assert not calls
    finally:
        layers.dequantize = saved
    ref = torch.cat([(F.silu(xe @ deq["w1"][e]) * (xe @ deq["w3"][e])) @ deq["w2"][e]
                     for e, xe in ((0, x[:1]), (2, x[1:]))])
    assert rel(y, ref) < 1e-5
