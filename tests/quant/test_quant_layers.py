"""Quantized layers against their dequantized float twins, every scheme and compute path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama4.model import MoE, Transformer
from llama4.quant import formats, kernels
from llama4.quant.apply import quantize_modules, target_modules
from llama4.quant.layers import QuantExperts, QuantLinear
from quant_common import float_twin
from serving import tiny_args


def rel(a, b) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def test_int8_per_channel_round_trip_error_is_half_a_step():
    w = torch.randn(48, 96)
    q, s = formats.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    err = (formats.dequantize_int8(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("g", formats.GROUP_SIZES)
def test_int4_group_round_trip_and_packing(g):
    w = torch.randn(16, 256)
    p, s, z = formats.quantize_int4(w, g)
    assert p.dtype == torch.uint8 and p.shape == (16, 128) and s.shape == z.shape == (16, 256 // g)
    q = formats.unpack_int4(p)
    assert int(q.max()) <= 15 and torch.equal(formats.pack_int4(q), p)
    err = (formats.dequantize_int4(p, s, z) - w).abs()
    step = s.repeat_interleave(g, 1)
    assert bool((err <= step / 2 + 1e-6).all())
    # the group's min and max are representable: the range is used in full
    assert rel(formats.dequantize_int4(p, s, z), w) < 0.12


def test_expert_axis_quantizes_over_inputs():
    w = torch.randn(3, 64, 32)  # (E, in, out) as x @ W
    t = formats.quantize(w, "int4", 32, axis=-2)
    assert t["q"].shape == (3, 64, 16) and t["scale"].shape == (3, 2, 32)
    ref = torch.stack([formats.dequantize(formats.quantize(w[e].t(), "int4", 32), "int4").t() for e in range(3)])
    assert torch.allclose(formats.dequantize(t, "int4", axis=-2), ref, atol=1e-6)


def _layer(scheme, g, n=96, k=128, bias=False):
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n, bias=bias)
    ql = QuantLinear(k, n, scheme, g, bias=bias)
    for part, t in formats.quantize(lin.weight.detach(), scheme, g).items():
        getattr(ql, "weight" if part == "q" else f"weight_{part}").copy_(t)
    if bias:
        ql.bias.data.copy_(lin.bias.data)
    return ql


CASES = [("bf16", None, "linear16", 1e-2), ("fp16", None, "linear16", 2e-3),
         ("int8", None, "int8mm", 1e-3), ("int8", None, "int8mm-bf16", 1e-2),
         ("int4", 32, "int4mm", 1e-3), ("int4", 64, "int4mm-bf16", 1e-2), ("int4", 128, "int4mm", 1e-3)]


@pytest.mark.parametrize("scheme,g,path,tol", CASES)
def test_quant_linear_matches_dequantized_twin(scheme, g, path, tol):
    """Every kernel path against F.linear with the dequantized weight: fp32-activation paths within
    1e-3 relative; paths that round activations to 16 bits within ``tol`` (their rounding)."""
    ql = _layer(scheme, g, bias=True)
    x = torch.randn(5, 128)
    twin = F.linear(x, ql.dequantized(), ql.bias)
    ql.set_path("fp32")
    assert rel(ql(x), twin) < 1e-6
    if path not in kernels.available(scheme, torch.device("cpu")):
        pytest.fail(f"torch {torch.__version__} lacks the {path} kernel this machine is expected to have")
    ql.set_path(path)
    y = ql(x)
    assert y.dtype == torch.float32 and y.shape == (5, 96)
    assert rel(y, twin) < tol, (path, rel(y, twin))
    assert rel(ql(x[:1]), twin[:1]) < tol  # the decode shape
    ql.set_path(path, dequant_from=4)  # many rows: dequantize per call, then the fp32 matmul
    assert rel(ql(x), twin) < 1e-6 and rel(ql(x[:3]), twin[:3]) < tol


def test_auto_choice_never_picks_a_path_slower_than_fp32_by_its_own_measure():
    ql = _layer("int8", None, n=64, k=64)
    c = kernels.choose("int8", ql.stored(), None, ql.dequantized(), kernels.available("int8", torch.device("cpu")))
    assert c.path == "fp32" or c.speedup >= kernels.MARGIN


@pytest.mark.parametrize("scheme,g", [("int8", None), ("int4", 32), ("bf16", None)])
def test_quantized_model_matches_float_twin_on_every_moe_path(scheme, g, one_thread):
    """Whole model: quantized modules (routed experts sparse: dequantized per selected expert)
    against the float model holding the dequantized weights, for MoE's grouped, gather and loop
    paths."""
    torch.manual_seed(0)
    f = Transformer(tiny_args())
    f.init_weights(std=0.3)
    q = Transformer(tiny_args())
    q.load_state_dict(f.state_dict())
    names = target_modules(q)
    assert any(n.endswith(".experts") for n in names) and "output" in names
    float_w = {n: q.get_submodule(n) for n in names}
    quantize_modules(q, names, scheme, g)
    for n, old in float_w.items():
        new = q.get_submodule(n)
        if isinstance(new, QuantLinear):
            src = {"weight": old.weight.detach()}
            for part, t in formats.quantize(src["weight"], scheme, g).items():
                getattr(new, "weight" if part == "q" else f"weight_{part}").copy_(t)
        else:
            for w in QuantExperts.NAMES:
                for part, t in formats.quantize(getattr(old, w).detach(), scheme, g, axis=-2).items():
                    getattr(new, f"{w}_{part}").copy_(t)
    float_twin(q, f)
    ids = torch.randint(0, 2304, (2, 24))
    for expert_path, linear_path in (("dequant", "dequant"), ("fp32", "fp32")):
        for name, m in q.named_modules():
            if isinstance(m, QuantExperts):
                m.set_path(expert_path)
            elif isinstance(m, QuantLinear):
                m.set_path(linear_path)
        for impl in ("grouped", "gather", "loop"):
            f.set_moe_impl(impl)
            q.set_moe_impl(impl)
            with torch.no_grad():
                assert rel(q(ids), f(ids)) < 1e-5, (expert_path, impl)
    assert sum(isinstance(m, MoE) for m in q.modules()) == 2


@pytest.mark.parametrize("path", ["int8mm-bf16", "int8mm"])
def test_kernel_path_survives_a_weight_at_an_odd_address(path):
    """safetensors hands out tensors at any byte offset; torch's int8 kernel crashed the process on
    one (16+ rows, bf16). The kernel form must live in fresh memory."""
    ql = _layer("int8", None, n=512, k=256)
    buf = torch.empty(512 * 256 + 8, dtype=torch.int8)
    odd = buf[8:].view(512, 256)
    odd.copy_(ql.weight)
    assert odd.data_ptr() % 16 != 0
    ql.weight = odd
    ql.set_path(path)
    x = torch.randn(64, 256)
    assert rel(ql(x), F.linear(x, ql.dequantized())) < 1e-2
