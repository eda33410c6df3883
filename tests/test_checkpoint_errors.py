"""Bad input is a clear error naming the field, tensor or file, never a partial load (issue 2, point 8)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama4
from llama4.checkpoint import CheckpointError
from llama4.model import ConfigError, ModelArgs, Transformer

ARGS = ModelArgs(vocab_size=128, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, n_experts=2, top_k=1,
                 expert_dim=16, dense_dim=48, interleave_moe_layer_step=2, nope_layer_interval=2,
                 attention_chunk_size=8, floor_scale=4.0, max_seq_len=1024)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    m = Transformer(ARGS)
    m.init_weights()
    return llama4.save(m, tmp_path_factory.mktemp("ck") / "hf")


@pytest.fixture
def ck(hf_dir, tmp_path):
    """A fresh, editable copy of the checkpoint."""
    import shutil

    return shutil.copytree(hf_dir, tmp_path / "ck")


def edit_tensors(ck, fn):
    f = ck / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def edit_config(ck, **changes):
    cfg = json.loads((ck / "config.json").read_text())
    for k, v in changes.items():
        if v is KeyError:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (ck / "config.json").write_text(json.dumps(cfg))


def test_good_checkpoint_loads(ck):
    assert isinstance(llama4.load(ck), Transformer)


def test_missing_tensor(ck):
    edit_tensors(ck, lambda sd: sd.pop("model.layers.1.feed_forward.experts.down_proj"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.feed_forward\.experts\.down_proj"):
        llama4.load(ck)


def test_extra_tensor(ck):
    edit_tensors(ck, lambda sd: sd.__setitem__("model.layers.0.self_attn.rotary.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor.*self_attn\.rotary\.weight"):
        llama4.load(ck)


def test_vision_tensor_in_text_only_checkpoint_is_extra(ck):
    edit_tensors(ck, lambda sd: sd.__setitem__("vision_model.class_embedding", torch.zeros(3)))
    with pytest.raises(CheckpointError, match="unexpected tensor.*vision_model.class_embedding"):
        llama4.load(ck)


def test_misshaped_tensor(ck):
    edit_tensors(ck, lambda sd: sd.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(24, 32)))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(24, 32\), "
                                              r"expected \(16, 32\)"):
        llama4.load(ck)


def test_config_disagreeing_with_tensors(ck):
    edit_config(ck, intermediate_size=24)
    with pytest.raises(CheckpointError, match=r"experts\.gate_up_proj' has shape \(2, 32, 32\), expected \(2, 32, 48\)"):
        llama4.load(ck)


def test_truncated_file(ck):
    f = ck / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        llama4.load(ck)


def test_truncated_header(ck):
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        llama4.load(ck)


def test_not_safetensors(ck):
    (ck / "model.safetensors").write_bytes(pickle.dumps({"a": 1}) * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        llama4.load(ck)


def test_no_weights_file(ck):
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        llama4.load(ck)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        llama4.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither config.json"):
        llama4.load(tmp_path / "empty")


def test_bad_json(ck):
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: cannot read JSON"):
        llama4.load(ck)


@pytest.mark.parametrize("changes,needle", [
    (dict(num_key_value_heads=3), r"n_heads \(4\) must be divisible by n_kv_heads \(3\).*'num_attention_heads', 'num_key_value_heads'"),
    (dict(num_attention_heads=5, head_dim=None), r"'hidden_size' \(32\) is not divisible by 'num_attention_heads' \(5\)"),
    (dict(hidden_size=-32), r"'hidden_size' must be positive"),
    (dict(vocab_size=0), r"vocab_size must be a positive number.*'vocab_size'"),
    (dict(num_experts_per_tok=3), r"top_k \(3\) exceeds n_experts \(2\).*'num_experts_per_tok'"),
    (dict(intermediate_size_mlp=-1), r"dense_dim must be a positive.*'intermediate_size_mlp'"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}, rope_scaling=None), r"rope_type' = 'yarn' is not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}, rope_scaling=None),
     r"'rope_parameters.low_freq_factor' is required"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
          rope_scaling=None), r"partial_rotary_factor"),
    (dict(no_rope_layers=[1, 0, 1]), None),  # longer than the layers: HF accepts, so do we
    (dict(no_rope_layers=[1]), r"'no_rope_layers' must hold a 0 \(NoPE\) or 1 \(RoPE\) for each of the 2 layers"),
    (dict(no_rope_layers=[1, 2]), r"'no_rope_layers'"),
    (dict(moe_layers=[1, 5]), r"'moe_layers' holds layer\(s\) \[5\] outside \[0, 2\)"),
    (dict(layer_types=["full_attention", "full_attention"]), r"'layer_types'.*disagrees"),
    (dict(model_type="llama"), r"'model_type' = 'llama'"),
    (dict(hidden_act="gelu"), r"'hidden_act' = 'gelu' is not supported"),
    (dict(num_hidden_layers="2"), r"'num_hidden_layers' must be int"),
    (dict(attention_chunk_size=0), r"'attention_chunk_size' must be positive"),
    (dict(moe_layers=KeyError, interleave_moe_layer_step=0), r"'interleave_moe_layer_step' must be positive"),
    (dict(floor_scale=0), r"floor_scale must be a positive.*'floor_scale'"),
    (dict(quantization_config={"quant_method": "fbgemm_fp8"}), r"'quantization_config' is set"),
])
def test_inconsistent_config(ck, changes, needle):
    edit_config(ck, **changes)
    if needle is None:
        llama4.load(ck)
        return
    with pytest.raises(CheckpointError, match=needle) as e:
        llama4.load(ck)
    assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)
    assert "config.json" in str(e.value)


# --- sharded ---------------------------------------------------------------------------------

@pytest.fixture
def sharded(tmp_path):
    torch.manual_seed(0)
    m = Transformer(ARGS)
    m.init_weights()
    return llama4.save(m, tmp_path / "sharded", max_shard_size=20_000)


def shard_files(d):
    files = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(files) >= 3
    return files


def test_sharded_loads(sharded):
    assert isinstance(llama4.load(sharded), Transformer)


def test_index_names_a_missing_shard(sharded):
    victim = shard_files(sharded)[1]
    (sharded / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"{victim}: shard listed in .* is missing"):
        llama4.load(sharded)


def test_index_and_shard_disagree(sharded):
    first, second = shard_files(sharded)[:2]
    idx = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = next(k for k, v in idx["weight_map"].items() if v == first)
    idx["weight_map"][name] = second
    (sharded / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=rf"({first}|{second}): (lacks|holds) tensor"):
        llama4.load(sharded)


def test_index_missing_a_tensor(sharded):
    idx = json.loads((sharded / "model.safetensors.index.json").read_text())
    idx["weight_map"].pop("model.layers.0.self_attn.q_proj.weight")
    (sharded / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"(holds tensor\(s\)|missing tensor\(s\):) "
                                              r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        llama4.load(sharded)


# --- Meta layout -----------------------------------------------------------------------------

META_PARAMS = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16,
                   ffn_dim_multiplier=1.0, ffn_exp=1.5, attention_chunk_size=8, nope_layer_interval=2,
                   use_qk_norm=True, moe_args=dict(num_experts=2, top_k=1, interleave_moe_layer_step=2))


def meta_state(args: ModelArgs) -> dict:
    """A Meta module-layout state dict for a model of ``args`` (router_DE instead of router.weight)."""
    torch.manual_seed(0)
    m = Transformer(args)
    m.init_weights()
    sd = m.state_dict()
    for k in [k for k in sd if k.endswith("router.weight")]:
        sd[k.replace("router.weight", "router_DE")] = sd.pop(k).t().contiguous()
    return sd


@pytest.fixture
def meta_dir(tmp_path):
    from llama4.checkpoint.meta import args_from_meta_params

    d = tmp_path / "meta"
    d.mkdir()
    (d / "params.json").write_text(json.dumps(META_PARAMS))
    torch.save(meta_state(args_from_meta_params(META_PARAMS)), d / "consolidated.00.pth")
    return d


def test_meta_good(meta_dir):
    m = llama4.load(meta_dir)
    assert m.args.expert_dim == 16 and m.args.dense_dim == 96 and m.args.is_moe_layer(1)


def test_meta_missing_and_extra_and_misshaped(meta_dir):
    f = meta_dir / "consolidated.00.pth"
    sd = torch.load(f)
    sd.pop("output.weight")
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: missing tensor.*output\.weight"):
        llama4.load(meta_dir)
    sd["output.weight"] = torch.zeros(128, 32)
    sd["layers.0.attention.wz.weight"] = torch.zeros(1)
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*layers\.0\.attention\.wz\.weight"):
        llama4.load(meta_dir)
    sd.pop("layers.0.attention.wz.weight")
    sd["layers.1.feed_forward.router_DE"] = torch.zeros(32, 3)
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match=r"'layers\.1\.feed_forward\.router\.weight' has shape \(3, 32\), expected \(2, 32\)"):
        llama4.load(meta_dir)


def test_meta_fused_wqkv_wrong_rows(meta_dir):
    f = meta_dir / "consolidated.00.pth"
    sd = torch.load(f)
    for w in ("wq", "wk", "wv"):
        sd.pop(f"layers.0.attention.{w}.weight")
    sd["layers.0.attention.wqkv.weight"] = torch.zeros(63, 32)
    torch.save(sd, f)
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wqkv\.weight' has shape \(63, 32\)"):
        llama4.load(meta_dir)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_meta_refuses_pickled_code(meta_dir):
    torch.save({"output.weight": _Evil()}, meta_dir / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: cannot read as a weights-only"):
        llama4.load(meta_dir)


def test_meta_truncated(meta_dir):
    f = meta_dir / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: cannot read"):
        llama4.load(meta_dir)


def test_meta_shard_gap(meta_dir):
    (meta_dir / "consolidated.00.pth").rename(meta_dir / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match=r"numbered 00\.\.00, found \[1\]"):
        llama4.load(meta_dir)


@pytest.mark.parametrize("changes,needle", [
    (dict(dim=30), r"'dim' \(30\) must be a positive multiple of 'n_heads' \(4\)"),
    (dict(n_kv_heads=3), r"n_heads \(4\) must be divisible by n_kv_heads \(3\).*'n_heads', 'n_kv_heads'"),
    (dict(ffn_exp=None), r"'ffn_exp' is required with 'moe_args'"),
    (dict(moe_args=dict(num_experts=-1)), r"'moe_args.num_experts' must be positive"),
    (dict(vocab_size=None), r"'vocab_size'"),
    (dict(quantization_args={"scheme": "int4_weight_int8_dynamic_activation"}), r"'quantization_args'"),
])
def test_meta_bad_params(meta_dir, changes, needle):
    (meta_dir / "params.json").write_text(json.dumps({**META_PARAMS, **changes}))
    with pytest.raises(CheckpointError, match=needle) as e:
        llama4.load(meta_dir)
    assert "params.json" in str(e.value)
