"""Bad input to `llama4 quantize` and to the quantized loader: clear errors naming what and where,
and never a half-written output folder."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file, save_file

import llama4
from llama4.checkpoint import CheckpointError
from llama4.cli import main
from llama4.quant.checkpoint import quantize_dir
from serving import write_tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("float") / "m")


@pytest.fixture(scope="module")
def int4(tiny, tmp_path_factory):
    return quantize_dir(tiny, tmp_path_factory.mktemp("q") / "int4", "int4", 32)


def _only(tmp_path, *names):
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temp folder left behind


def test_quantizing_a_quantized_model_is_refused(int4, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"config\.json: this model is already quantized \(scheme 'int4'\)"):
        quantize_dir(int4, tmp_path / "again", "int8")
    assert main(["quantize", "--model", str(int4), "--scheme", "int8", "--out", str(tmp_path / "again")]) == 2
    assert "llama4 quantize: error:" in capsys.readouterr().err
    _only(tmp_path)


def test_group_size_that_does_not_divide_names_the_tensor(tiny, tmp_path):
    # the tiny model's hidden size is 64: group 128 cannot divide the attention inputs
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight'.*group size 128 "
                                         r"does not divide its input dimension 64"):
        quantize_dir(tiny, tmp_path / "out", "int4", 128)
    _only(tmp_path)
    with pytest.raises(ValueError, match="--group-size 48: int4 supports"):
        quantize_dir(tiny, tmp_path / "out", "int4", 48)
    with pytest.raises(ValueError, match="--group-size is for int4 only"):
        quantize_dir(tiny, tmp_path / "out", "int8", 32)
    _only(tmp_path)


def test_output_folder_is_never_overwritten_or_half_written(tiny, tmp_path, monkeypatch):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match="exists and is not an empty directory"):
        quantize_dir(tiny, tmp_path / "busy", "int8")
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"

    import safetensors.torch

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        quantize_dir(tiny, tmp_path / "out", "int8")
    _only(tmp_path, "busy")


def _rewrite(src, dst, drop=(), cfg_edit=None):
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for k in drop:
        del tensors[k]
    save_file(tensors, str(dst / "model.safetensors"))
    if cfg_edit:
        cfg = json.loads((dst / "config.json").read_text())
        cfg_edit(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_scales_name_the_tensor_and_file(int4, tmp_path):
    bad = _rewrite(int4, tmp_path / "noscale", drop=["model.layers.1.self_attn.v_proj.weight_scale"])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing scale/zero tensor\(s\) of quantized "
                                              r"weights \(int4\): model\.layers\.1\.self_attn\.v_proj\.weight_scale"):
        llama4.load(bad)
    bad = _rewrite(int4, tmp_path / "nozero", drop=["model.layers.1.feed_forward.experts.down_proj_zero"])
    with pytest.raises(CheckpointError, match=r"experts\.down_proj_zero"):
        llama4.load(bad)


def test_bad_quantization_config_fields(int4, tmp_path):
    cases = [
        (lambda q: q.update(scheme="int3"), r"quantization_config\.scheme = 'int3'"),
        (lambda q: q.update(group_size=48), r"quantization_config\.group_size = 48"),
        (lambda q: q.update(quant_method="gptq"), r"quant_method 'gptq', which is not supported"),
        (lambda q: q["quantized_tensors"].append("model.layers.9.self_attn.q_proj.weight"),
         r"names tensor\(s\) this model does not have: model\.layers\.9"),
        (lambda q: q["quantized_tensors"].remove("model.layers.0.self_attn.q_proj.weight"),
         r"unexpected tensor\(s\): model\.layers\.0\.self_attn\.q_proj\.weight_scale"),
    ]
    for i, (edit, msg) in enumerate(cases):
        bad = _rewrite(int4, tmp_path / f"c{i}", cfg_edit=edit)
        with pytest.raises(CheckpointError, match=msg):
            llama4.load(bad)


def test_wrong_stored_dtype_is_named(int4, tmp_path):
    import shutil

    bad = tmp_path / "dt"
    shutil.copytree(int4, bad)
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"].float()
    save_file(t, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' has dtype torch\.float32; .* stores it as torch\.uint8"):
        llama4.load(bad)


def test_saving_a_loaded_quantized_model_as_float_is_refused(int4, tmp_path):
    m = llama4.load(int4)
    with pytest.raises(CheckpointError, match=r"cannot save a quantized model \(int4\)"):
        llama4.save(m, tmp_path / "out")
    _only(tmp_path)
