"""The quantized file format: `llama4 quantize` -> safetensors + quantization_config ->
llama4.load / load_model_dir -> the same tensors and logits; generate runs it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import llama4
from llama4.cli import main
from llama4.infer.model_dir import load_model_dir
from llama4.quant import formats
from llama4.quant.apply import prepare
from llama4.quant.checkpoint import QUANT_METHOD, quantize_dir
from llama4.quant.layers import QuantExperts, QuantLinear
from quant_common import float_twin
from serving import write_tiny_model_dir

SCHEMES = [("bf16", None), ("fp16", None), ("int8", None), ("int4", 32), ("int4", 64)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("float") / "m")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("scheme,g", SCHEMES)
def test_quantize_save_load_round_trip(tiny, tmp_path, scheme, g, one_thread):
    out = quantize_dir(tiny, tmp_path / "q", scheme, g)
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == QUANT_METHOD and qc["scheme"] == scheme and qc["group_size"] == g
    names = qc["quantized_tensors"]
    # attention, dense FFN, shared expert, routed experts (fused HF stacks), head; never embedding/router
    for want in ("self_attn.q_proj.weight", "feed_forward.gate_proj.weight", "shared_expert.down_proj.weight",
                 "experts.gate_up_proj", "experts.down_proj", "lm_head.weight"):
        assert any(n.endswith(want) for n in names), want
    assert not any("embed_tokens" in n or "router" in n for n in names)
    assert (out / "tokenizer.model").is_file()

    # the file holds exactly what formats.quantize makes of the float weights (HF layout)
    with safe_open(str(tiny / "model.safetensors"), "pt") as fsrc, safe_open(str(out / "model.safetensors"), "pt") as fq:
        for n in names:
            axis = -2 if ".experts." in n else -1
            ref = formats.quantize(fsrc.get_tensor(n), scheme, g, axis=axis)
            for part, t in ref.items():
                got = fq.get_tensor(n if part == "q" else f"{n}_{part}")
                assert got.dtype == t.dtype and torch.equal(got, t), (n, part)

    m = llama4.load(out)
    assert m.quantization == {"scheme": scheme, "group_size": g}
    assert sum(isinstance(x, QuantExperts) for x in m.modules()) == 2
    # state dict of the loaded model -> the same stored tensors on a second load
    again = llama4.load(out)
    sd1, sd2 = m.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)

    ids = torch.randint(0, 2304, (1, 20))
    prepare(m, "fp32", quiet=True)
    prepare(again, "auto", quiet=True)
    with torch.no_grad():
        lq, lauto = m(ids), again(ids)
        # "auto" may pick a kernel that rounds activations to bf16: close, not equal
        assert _rel(lauto, lq) < 1e-2
        prepare(again, "fp32", quiet=True)
        assert torch.equal(again(ids), lq)  # identical tensors, same path: identical logits
        # the float twin: the float model with every quantized weight replaced by its dequantized value
        f = llama4.load(tiny)
        float_twin(m, f)
        assert _rel(lq, f(ids)) < 1e-5


def test_cli_quantize_then_generate_and_load_model_dir(tiny, tmp_path, capsys, one_thread):
    out = tmp_path / "int8"
    assert main(["quantize", "--model", str(tiny), "--scheme", "int8", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    model, tok, name = load_model_dir(out)
    assert name == "int8" and isinstance(model.output, QuantLinear)
    assert "llama4 quant: int8 weights" in capsys.readouterr().err  # says which paths, once per load
    ids = llama4.generate(model, tok.encode("hello"), max_new_tokens=6)
    assert len(ids) == 6
    assert main(["generate", "--model", str(out), "--prompt", "hi", "--max-tokens", "4", "--threads", "1"]) == 0


def test_no_head_keeps_the_output_float(tiny, tmp_path):
    out = quantize_dir(tiny, tmp_path / "q", "int4", 32, head=False)
    names = json.loads((out / "config.json").read_text())["quantization_config"]["quantized_tensors"]
    assert "lm_head.weight" not in names
    m = llama4.load(out)
    assert isinstance(m.output, torch.nn.Linear)
