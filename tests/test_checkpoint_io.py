"""llama4.save / llama4.load without an oracle: exact round trips, config mapping, atomic writes,
dtype and memory. (Parity against transformers and Meta lives in tests/test_parity_*.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import llama4
from llama4.checkpoint import CheckpointError, args_from_hf_config, hf_config_from_args
from llama4.model import ModelArgs, RopeScaling, Transformer, flavor


def tiny(**kw) -> ModelArgs:
    base = dict(vocab_size=128, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, n_experts=3, top_k=2,
                expert_dim=16, dense_dim=48, interleave_moe_layer_step=2, nope_layer_interval=4,
                attention_chunk_size=8, floor_scale=4.0, max_seq_len=2048)
    return ModelArgs(**{**base, **kw})


VARIANTS = {
    "default": tiny(),
    "bias_headdim_scaling": tiny(attention_bias=True, head_dim=16, use_qk_norm=False,
                                 rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64), rope_theta=10000.0),
    "explicit_lists": tiny(moe_layers=(0, 3), nope_layers=(1, 2), interleave_moe_layer_step=1),
    "dense_global": tiny(n_experts=0, attention_chunk_size=None, nope_layer_interval=None,
                         attn_temperature_tuning=False),
    "all_moe_top1": tiny(interleave_moe_layer_step=1, top_k=1, floor_scale=8192.0, attn_scale=0.25),
}


def layout(a: ModelArgs) -> dict:
    """What the model computes, independent of how the layer lists are spelled."""
    d = a.to_dict()
    for k in ("moe_layers", "nope_layers", "nope_layer_interval", "interleave_moe_layer_step", "head_dim"):
        d.pop(k)
    d["moe"] = [a.is_moe_layer(i) for i in range(a.n_layers)]
    d["nope"] = [a.is_nope_layer(i) for i in range(a.n_layers)]
    d["hd"] = a.hd
    return d


def random_model(args: ModelArgs, seed=0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(args)
    m.init_weights()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trip_exact(name, tmp_path):
    args = VARIANTS[name]
    m = random_model(args)
    llama4.save(m, tmp_path / "ck")
    back = llama4.load(tmp_path / "ck")
    assert layout(back.args) == layout(args)
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(0, args.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.equal(m(x), back(x))


@pytest.mark.parametrize("name", ["debug", "scout", "maverick", "behemoth"])
def test_flavor_configs_round_trip(name):
    a = flavor(name)
    assert args_from_hf_config(hf_config_from_args(a)).args == a


def test_args_round_trip_spelling():
    for a in VARIANTS.values():
        assert layout(args_from_hf_config(hf_config_from_args(a)).args) == layout(a)


# config.json of the released checkpoints (v4 spelling: rope_scaling + rope_theta, empty no_rope_layers,
# attn_temperature_tuning 4, no layer_types), text part of Llama4ForConditionalGeneration.
HUB_TEXT = {
    "attention_bias": False, "attention_chunk_size": 8192, "attention_dropout": 0.0, "attn_scale": 0.1,
    "attn_temperature_tuning": 4, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
    "floor_scale": 8192, "for_llm_compressor": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "interleave_moe_layer_step": 1, "intermediate_size": 8192,
    "intermediate_size_mlp": 16384, "max_position_embeddings": 10485760, "model_type": "llama4_text",
    "no_rope_layers": [], "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48,
    "num_key_value_heads": 8, "num_local_experts": 16, "output_router_logits": False, "pad_token_id": 200018,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "torch_dtype": "bfloat16",
    "use_cache": True, "use_qk_norm": True, "vocab_size": 202048,
}


def test_hub_style_configs_give_the_flavors():
    scout = {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
             "text_config": HUB_TEXT, "vision_config": {"hidden_size": 1408}}
    got = args_from_hf_config(scout)
    assert got.args == flavor("scout") and got.prefix == "language_model." and got.dtype == "bfloat16"
    maverick = {**HUB_TEXT, "interleave_moe_layer_step": 2, "num_local_experts": 128, "use_qk_norm": False,
                "rope_scaling": None, "max_position_embeddings": 1048576}
    assert args_from_hf_config({"model_type": "llama4", "text_config": maverick}).args == flavor("maverick")


def test_config_json_is_complete(tmp_path):
    m = random_model(VARIANTS["explicit_lists"])
    llama4.save(m, tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["architectures"] == ["Llama4ForCausalLM"] and cfg["model_type"] == "llama4_text"
    assert cfg["moe_layers"] == [0, 3] and cfg["no_rope_layers"] == [1, 0, 0, 1]
    assert cfg["layer_types"] == ["chunked_attention", "full_attention", "full_attention", "chunked_attention"]
    assert cfg["dtype"] == "float32" and cfg["tie_word_embeddings"] is False
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    mode = (tmp_path / "ck" / "config.json").stat().st_mode  # weights readable like the config (umask)
    assert (tmp_path / "ck" / "model.safetensors").stat().st_mode == mode


def test_meta_params_mapping():
    """params.json -> ModelArgs the way Meta's model.py / moe.py / args.py read it."""
    from llama4.checkpoint import args_from_meta_params

    base = dict(dim=64, n_layers=4, n_heads=4, vocab_size=256, multiple_of=16, ffn_dim_multiplier=1.2, ffn_exp=4.0,
                head_dim=999)  # head_dim is ignored by Meta's attention: dim // n_heads
    a = args_from_meta_params({"model": {**base, "use_scaled_rope": True,
                                         "moe_args": {"num_experts": 4, "interleave_moe_layer_step": 2}}})
    # dense: int(2 * 256 / 3) = 170 -> x1.2 = 204 -> 208; experts: 256 -> 170 -> 204 -> /2 = 102 -> 112
    assert (a.dense_dim, a.expert_dim, a.hd, a.n_kv_heads, a.n_experts, a.top_k) == (208, 112, 16, 4, 4, 1)
    assert a.rope_scaling == RopeScaling(16.0, 1.0, 1.0, 8192)  # Scout's constants when unspecified
    assert not a.use_qk_norm and not a.attn_temperature_tuning and a.nope_layer_interval is None
    assert [a.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
    dense = args_from_meta_params({**base, "ffn_dim_multiplier": None, "rope_scaling_factor": 8.0})
    assert dense.n_experts == 0 and dense.dense_dim == 176 and dense.rope_scaling is None
    assert not any(dense.is_moe_layer(i) for i in range(4))


def test_tied_embeddings_config(tmp_path):
    """tie_word_embeddings with no lm_head.weight on disk: the head is the embedding."""
    m = random_model(VARIANTS["default"])
    llama4.save(m, tmp_path / "ck")
    from safetensors.torch import load_file, save_file

    f = tmp_path / "ck" / "model.safetensors"
    sd = load_file(str(f))
    sd.pop("lm_head.weight")
    save_file(sd, str(f), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    back = llama4.load(tmp_path / "ck")
    assert torch.equal(back.output.weight, m.tok_embeddings.weight)
    llama4.save(back, tmp_path / "again")  # shared storage is written as two tensors
    assert torch.equal(llama4.load(tmp_path / "again").output.weight, m.tok_embeddings.weight)


def test_dtype_and_device(tmp_path):
    m = random_model(VARIANTS["default"])
    llama4.save(m, tmp_path / "ck", dtype=torch.bfloat16)
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["dtype"] == "bfloat16"
    b = llama4.load(tmp_path / "ck")
    assert {p.dtype for p in b.parameters()} == {torch.bfloat16}
    assert torch.equal(b.output.weight, m.output.weight.to(torch.bfloat16))
    f = llama4.load(tmp_path / "ck", dtype="float32", device="cpu")
    assert {p.dtype for p in f.parameters()} == {torch.float32}
    assert f.rope.inv_freq.device.type == "cpu" and not f.rope.inv_freq.is_meta
    assert torch.equal(f.rope.inv_freq, Transformer(VARIANTS["default"]).rope.inv_freq)
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        llama4.load(tmp_path / "ck", dtype="int8")


def test_loaded_model_is_complete_and_trainable(tmp_path):
    m = random_model(VARIANTS["default"])
    llama4.save(m, tmp_path / "ck")
    b = llama4.load(tmp_path / "ck")
    assert not any(t.is_meta for t in list(b.parameters()) + list(b.buffers()))
    assert all(p.requires_grad for p in b.parameters())
    x = torch.randint(0, 128, (1, 12))
    b.train()
    b(x).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in b.named_parameters() if "experts" not in n and "router" not in n)


def test_save_sharded_index(tmp_path):
    m = random_model(VARIANTS["default"])
    llama4.save(m, tmp_path / "ck", max_shard_size="30KB")
    d = tmp_path / "ck"
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(idx["weight_map"].values()) == set(shards)
    assert idx["metadata"]["total_size"] == sum(p.numel() * 4 for p in m.parameters())
    assert not (d / "model.safetensors").exists()
    back = llama4.load(d)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in m.state_dict().items())


def test_save_is_atomic(tmp_path, monkeypatch):
    """A failure mid-save leaves no checkpoint (or the old one, untouched) and no temp files."""
    import safetensors.torch

    m = random_model(VARIANTS["default"])
    real = safetensors.torch.save_file
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        llama4.save(m, tmp_path / "ck", max_shard_size="30KB")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(safetensors.torch, "save_file", real)
    llama4.save(m, tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    calls["n"] = 0
    monkeypatch.setattr(safetensors.torch, "save_file", failing)
    m2 = random_model(VARIANTS["default"], seed=1)
    with pytest.raises(OSError, match="disk full"):
        llama4.save(m2, tmp_path / "ck", max_shard_size="30KB")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]

    monkeypatch.setattr(safetensors.torch, "save_file", real)
    llama4.save(m2, tmp_path / "ck")  # overwriting a checkpoint replaces it whole
    assert torch.equal(llama4.load(tmp_path / "ck").output.weight, m2.output.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_save_refuses_to_clobber_other_files(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        llama4.save(random_model(VARIANTS["default"]), tmp_path / "ck")
    assert (tmp_path / "ck" / "notes.txt").read_text() == "mine"
    with pytest.raises(CheckpointError, match="can only save"):
        llama4.save(torch.nn.Linear(2, 2), tmp_path / "x")


_MEASURE = textwrap.dedent("""
    import sys, threading, time
    import torch, llama4
    import llama4.checkpoint, safetensors.torch
    from llama4.model import ModelArgs, Transformer

    with torch.device("meta"):  # one-time costs (lazy imports, meta kernels) are not the load's memory
        Transformer(ModelArgs(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=8,
                              n_experts=2, expert_dim=16, dense_dim=32))
        torch.ones(2, dtype=torch.bfloat16).to(torch.float32)

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    base = anon()
    peak, done = [base], []

    def sample():
        while not done:
            peak[0] = max(peak[0], anon())
            time.sleep(0.0002)

    t = threading.Thread(target=sample)
    t.start()
    m = llama4.load(sys.argv[1], dtype=torch.float32)
    done.append(1)
    t.join()
    nbytes = sum(p.numel() * p.element_size() for p in m.parameters())
    print(nbytes, max(peak[0], anon()) - base)
""")


def test_load_does_not_need_twice_the_memory(tmp_path):
    """Peak anonymous memory while loading stays near one copy of the model. The checkpoint is
    bf16 and the model float32, so every tensor is converted (copied); without a conversion,
    safetensors hands out copy-on-write mappings of the file and the load allocates almost nothing."""
    args = ModelArgs(vocab_size=8192, dim=512, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=64, n_experts=0,
                     dense_dim=2048, expert_dim=2048, nope_layer_interval=4, attention_chunk_size=64)
    with torch.device("meta"):
        m = Transformer(args)
    m.to_empty(device="cpu")
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(0.5)
    m.rope.reset_parameters()
    llama4.save(m, tmp_path / "big", dtype=torch.bfloat16)
    del m
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path / "big")], capture_output=True, text=True,
                         timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    nbytes, peak = map(int, out.stdout.split())
    print(f"model {nbytes / 2**20:.0f} MiB, peak extra anonymous memory while loading {peak / 2**20:.0f} MiB")
    assert nbytes > 150e6
    assert peak < 1.3 * nbytes
