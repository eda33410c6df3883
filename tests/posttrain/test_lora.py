"""LoRA (llama4.posttrain.lora): exact no-op at init, exact merge, frozen base, adapter files."""

import json

import pytest
import torch
import torch.nn.functional as F

import llama4
from llama4.model import ModelArgs, Transformer
from llama4.posttrain.lora import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_lora, load_adapter, load_lora,
                                   lora_modules, lora_state_dict, merge_lora, save_adapter,
                                   trainable_parameters)
from llama4.train.optim import param_groups

ALL = ("attention", "experts", "shared", "dense")


def tiny(seed=0) -> Transformer:
    # MoE every 2nd layer: dense FFN, shared expert and routed experts all present; the byte-level
    # tokenizer (256 bytes + specials) fits the vocabulary
    args = ModelArgs(vocab_size=2304, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4,
                     top_k=1, expert_dim=32, dense_dim=96, interleave_moe_layer_step=2, nope_layer_interval=2,
                     attention_chunk_size=16, floor_scale=8.0, max_seq_len=256)
    torch.manual_seed(seed)
    m = Transformer(args)
    m.init_weights(std=0.3)
    m.init_buffers()
    return m


def tokens(n=2, t=12, seed=1):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def randomize_b(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for *_, d in lora_modules(model):
            d.lora_B.copy_(torch.randn(d.lora_B.shape, generator=g) * 0.5)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.mark.parametrize("impl", ["grouped", "loop", "gather"])
def test_fresh_adapter_leaves_logits_exactly_unchanged(impl):
    m = tiny()
    m.set_moe_impl(impl)
    x = tokens()
    with torch.no_grad():
        before = m(x)
        apply_lora(m, rank=4, alpha=8, targets=ALL)
        after = m(x)
    assert torch.equal(before, after)


@pytest.mark.parametrize("impl", ["grouped", "loop"])
@pytest.mark.parametrize("target", ALL)
def test_merged_equals_unmerged(target, impl):
    m = tiny()
    m.set_moe_impl(impl)
    x = tokens()
    with torch.no_grad():
        base = m(x)
        apply_lora(m, rank=4, alpha=16, targets=(target,))
        randomize_b(m)
        unmerged = m(x)
        merge_lora(m)
        merged = m(x)
    assert not torch.allclose(base, unmerged, atol=1e-3)  # the adapter does change the model
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert not lora_modules(m) and all(p.requires_grad for p in m.parameters())
    assert set(m.state_dict()) == set(tiny().state_dict())


def test_adapter_is_the_lora_formula():
    # Independent of the parametrization: y = x W^T + alpha/r (x A^T) B^T for a Linear, and per
    # expert x W[e] + alpha/r (x A[e]) B[e] for the stacked weights.
    m = tiny()
    apply_lora(m, rank=3, alpha=6, targets=ALL)
    randomize_b(m)
    x = torch.randn(5, 64)
    att = m.layers[0].attention.wq
    d = att.parametrizations.weight[0]
    want = x @ att.parametrizations.weight.original.T + 2.0 * (x @ d.lora_A.T) @ d.lora_B.T
    torch.testing.assert_close(att(x), want, atol=1e-5, rtol=1e-5)
    ex = m.layers[1].feed_forward.experts
    d = ex.parametrizations.w1[0]
    for e in range(4):
        want = x @ ex.parametrizations.w1.original[e] + 2.0 * (x @ d.lora_A[e]) @ d.lora_B[e]
        torch.testing.assert_close(x @ ex.w1[e], want, atol=1e-5, rtol=1e-5)
    assert d.lora_A.shape == (4, 64, 3) and d.lora_B.shape == (4, 3, 32)
    assert ex.parametrizations.w2[0].lora_A.shape == (4, 32, 3)


def test_only_adapters_get_gradients():
    m = tiny()
    apply_lora(m, rank=4, alpha=4)
    randomize_b(m)
    x = tokens()
    F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    tp = trainable_parameters(m)
    assert {id(p) for p in tp} == {id(p) for n, p in m.named_parameters() if n in names}
    # the dense FFN is not a default target; the attention, routed and shared experts are
    assert not any("layers.0.feed_forward" in n for n in names)
    assert any("experts" in n for n in names) and any("shared_expert" in n for n in names)
    # the trainer's optimizer groups pick the adapters alone
    grouped = {id(p) for g in param_groups(m, 0.1) for p in g["params"]}
    assert grouped == {id(p) for p in tp}


def test_training_step_reduces_loss():
    m = tiny()
    apply_lora(m, rank=4, alpha=8)
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(param_groups(m, 0.0), lr=1e-2)
    x = tokens(4, 16)

    def loss():
        return F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

    first = loss()
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        assert loss() < first.item() - 0.05
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_adapter_save_load_round_trip(tmp_path):
    m = tiny()
    apply_lora(m, rank=4, alpha=8, targets=("attention", "experts"))
    randomize_b(m)
    x = tokens()
    with torch.no_grad():
        want = m(x)
    out = save_adapter(m, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["target_modules"] == ["attention", "experts"]
    assert cfg["peft_type"] == "LORA"

    fresh = load_adapter(tiny(), out)  # same base, adapter applied from the config
    with torch.no_grad():
        assert torch.equal(fresh(x), want)
    for k, v in lora_state_dict(m).items():
        assert torch.equal(lora_state_dict(fresh)[k], v)

    # the adapter file is a small fraction of the full model
    llama4.save(tiny(), tmp_path / "full")
    full = sum(f.stat().st_size for f in (tmp_path / "full").glob("*.safetensors"))
    small = (out / ADAPTER_WEIGHTS).stat().st_size
    n_adapter = sum(v.numel() for v in lora_state_dict(m).values())
    assert small < full / 3 and small >= n_adapter * 4


def test_bad_input(tmp_path):
    m = tiny()
    with pytest.raises(ValueError, match="unknown"):
        apply_lora(m, rank=4, targets=("attention", "mlp"))
    with pytest.raises(ValueError, match="rank"):
        apply_lora(m, rank=0)
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(m, rank=2, dropout=0.1)
    with pytest.raises(ValueError, match="no LoRA"):
        merge_lora(m)
    apply_lora(m, rank=2)
    with pytest.raises(ValueError, match="already"):
        apply_lora(m, rank=2)
    state = lora_state_dict(m)
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="missing"):
        load_lora(m, bad)
    with pytest.raises(FileNotFoundError, match=ADAPTER_CONFIG):
        load_adapter(tiny(), tmp_path)
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="other files"):
        save_adapter(m, tmp_path)
    assert (tmp_path / "keep.txt").exists()


def test_merge_save_load_same_logits(tmp_path):
    m = tiny()
    apply_lora(m, rank=4, alpha=8, targets=ALL)
    randomize_b(m)
    x = tokens()
    with torch.no_grad():
        want = m(x)
    llama4.save(merge_lora(m), tmp_path / "merged")
    back = llama4.load(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, atol=1e-5, rtol=0)


def test_cached_weights_match():
    from llama4.posttrain.lora import adapters_cached

    m = tiny()
    apply_lora(m, rank=4, targets=ALL)
    randomize_b(m)
    x = tokens()
    with torch.no_grad():
        want = m(x)
        with adapters_cached():
            assert torch.equal(m(x), want)


def test_lora_args_flags():
    import argparse

    from llama4.posttrain.lora_args import add_lora_arguments, lora_from_args

    p = argparse.ArgumentParser()
    add_lora_arguments(p)
    m = tiny()
    a = p.parse_args([])
    assert lora_from_args(a, m) is m and not lora_modules(m)
    a = p.parse_args(["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "attention,dense", "--adapter-only"])
    lora_from_args(a, m)
    paths = {path for path, *_ in lora_modules(m)}
    assert "layers.0.feed_forward.w1" in paths and "layers.0.attention.wq" in paths
    assert not any("experts" in p for p in paths)
    assert lora_modules(m)[0][3].scale == 2.0 and m._lora_adapter_only
    for bad in (["--lora-targets", "mlp"], ["--lora-rank", "0"], ["--lora-alpha", "-1"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)
    with pytest.raises(ValueError, match="--adapter-only needs --lora-rank"):
        lora_from_args(p.parse_args(["--adapter-only"]), tiny())


def test_stage_export(tmp_path):
    from llama4.posttrain.lora import export_stage_model
    from llama4.tokenizer.files import write_tiktoken_bpe

    tok = tmp_path / "tokenizer.model"
    write_tiktoken_bpe(tok, {bytes([b]): b for b in range(256)})
    x = tokens()
    m = apply_lora(tiny(), rank=4)
    randomize_b(m)
    with torch.no_grad():
        want = m(x)
    m._lora_adapter_only = True
    out = export_stage_model(m, tok, tmp_path / "a")
    assert out == tmp_path / "a" / "adapter" and not (tmp_path / "a" / "final").exists()
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer.model"]
    with torch.no_grad():
        assert torch.equal(load_adapter(tiny(), out)(x), want)
    m._lora_adapter_only = False
    out = export_stage_model(m, tok, tmp_path / "b")
    assert out == tmp_path / "b" / "final" and not lora_modules(m)
    with torch.no_grad():
        torch.testing.assert_close(llama4.load(out)(x), want, atol=1e-5, rtol=0)


def test_save_of_an_adapted_model_writes_it_merged(tmp_path):
    m = tiny()
    apply_lora(m, rank=4, alpha=8, targets=ALL)
    randomize_b(m)
    x = tokens()
    with torch.no_grad():
        want = m(x)
    llama4.save(m, tmp_path / "m")
    assert lora_modules(m)  # the model keeps its adapters
    with torch.no_grad():
        torch.testing.assert_close(llama4.load(tmp_path / "m")(x), want, atol=1e-5, rtol=0)


def test_sft_cli_with_lora(tmp_path):
    # `llama4 sft --lora-rank`: OUT/final is the merged model; --adapter-only writes OUT/adapter alone,
    # and base + that adapter is the same model; bad flags fail before anything is written
    from serving import write_tiny_model_dir

    from llama4.cli import main

    base = write_tiny_model_dir(tmp_path / "base")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"add {i} and {i}"},
                                                     {"role": "assistant", "content": str(2 * i)}]}) + "\n"
                            for i in range(6)))
    common = ["sft", "--base", str(base), "--data", str(data), "--max-steps", "2", "--batch-size", "2",
              "--seq-len", "48", "--lr", "1e-2", "--no-progress", "--lora-rank", "4", "--lora-alpha", "8"]
    assert main(common + ["--out", str(tmp_path / "merged")]) == 0
    assert main(common + ["--out", str(tmp_path / "ad"), "--adapter-only"]) == 0
    assert (tmp_path / "merged" / "final" / "model.safetensors").exists()
    assert not (tmp_path / "ad" / "final").exists()
    assert sorted(p.name for p in (tmp_path / "ad" / "adapter").iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS,
                                                                               "tokenizer.model"]
    x = tokens()
    with torch.no_grad():
        before = llama4.load(base)(x)
        merged = llama4.load(tmp_path / "merged" / "final")(x)
        adapted = load_adapter(llama4.load(base), tmp_path / "ad" / "adapter")(x)
    assert (merged - before).abs().max() > 1e-3  # training moved the model
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=0)
    for bad in (["--adapter-only"], ["--lora-rank", "4096"]):
        argv = [a for a in common if a not in ("--lora-rank", "4", "--lora-alpha", "8")] + bad
        assert main(argv + ["--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
