"""Training room pieces without a training run: config overrides, schedules, parameter groups,
MoE losses, atomic checkpoints, metrics truncation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llama4.model import ModelArgs, Transformer
from llama4.recipes import RECIPES, get_recipe
from llama4.train import TrainConfig, TrainConfigError, apply_overrides
from llama4.train import checkpointing as ckpt
from llama4.train import losses
from llama4.train.log import MetricsLog, read_metrics
from llama4.train.optim import Schedule, param_groups


def test_recipes_build_and_match_their_promises():
    for name in RECIPES:
        cfg = get_recipe(name)
        assert cfg.name == name
    d = get_recipe("default")
    a = d.model
    assert a.n_experts > 1 and all(a.is_moe_layer(i) for i in range(a.n_layers))
    assert any(a.is_nope_layer(i) for i in range(a.n_layers)) and a.attention_chunk_size < d.seq_len
    assert d.tokenizer is None and "bias" in d.balance and "aux_loss" in d.balance  # own BPE; both balancers
    dense = get_recipe("default-dense")
    # same active parameters: one dense FFN as wide as routed + shared expert
    assert dense.model.n_experts == 0 and dense.model.dense_dim == 2 * a.expert_dim
    assert dense.tokens_per_step == d.tokens_per_step and dense.max_steps == d.max_steps
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("nope")


def test_overrides_are_typed_and_named():
    cfg = get_recipe("debug")
    new = apply_overrides(cfg, ["lr=1e-3", "model.dim=96", "schedule=wsd", "threads=null", "max_steps=7",
                                "sample_langs=[\"eng\"]", "compile=true"])
    assert new.lr == 1e-3 and new.model.dim == 96 and new.schedule == "wsd" and new.threads is None
    assert new.max_steps == 7 and new.sample_langs == ("eng",) and new.compile is True
    assert cfg.model.dim == 64  # the original is untouched
    assert apply_overrides(cfg, ["lr=1"]).lr == 1.0  # int accepted for a float
    for bad, match in [("lr=fast", "lr must be a number"), ("max_steps=1.5", "max_steps must be an int"),
                       ("nosuch=1", "unknown TrainConfig field 'nosuch'"), ("model.nosuch=1", "unknown model field"),
                       ("schedule=linear", "schedule must be one of"), ("lr", "not key=value"),
                       ("model.n_heads=3", "n_heads"), ("compile=1", "compile must be true or false")]:
        with pytest.raises(TrainConfigError, match=match):
            apply_overrides(cfg, [bad])


def test_config_round_trips_and_diffs():
    cfg = get_recipe("default")
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.differences(cfg) == {}
    other = apply_overrides(cfg, ["lr=1e-4", "model.dim=64"])
    assert set(other.differences(cfg)) == {"lr", "model.dim"}


def test_schedules():
    s = Schedule("cosine", 1.0, total=100, warmup=10, min_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0) and s(10) == pytest.approx(1.0)
    assert s(55) == pytest.approx(0.55) and s(100) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 100))
    w = Schedule("wsd", 1.0, total=100, warmup=10, min_ratio=0.0, decay_fraction=0.2)
    assert [w(i) for i in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert w(80) == pytest.approx(1.0) and w(90) == pytest.approx(0.5) and w(100) == pytest.approx(0.0)
    c = Schedule("constant", 2.0, total=10, warmup=0)
    assert c(0) == c(9) == 2.0


def test_param_groups_skip_decay_on_norms_embeddings_biases():
    args = ModelArgs(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, n_experts=2,
                     expert_dim=8, dense_dim=16, interleave_moe_layer_step=2, attention_bias=True,
                     attention_chunk_size=8, max_seq_len=64)
    model = Transformer(args)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    d = {names[id(p)] for p in decay["params"]}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert "tok_embeddings.weight" in nd and "norm.weight" in nd and "layers.0.attention.wq.bias" in nd
    assert "layers.1.feed_forward.experts.w1" in d and "layers.1.feed_forward.router.weight" in d
    assert "output.weight" in d and "layers.0.attention.wq.weight" in d
    assert len(d) + len(nd) == len(list(model.parameters()))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_balance_loss_is_one_when_uniform_and_grows_with_imbalance():
    E, N = 4, 64
    logits = torch.zeros(N, E, requires_grad=True)
    uniform = torch.full((E,), N // E)
    assert losses.load_balance_loss(logits, uniform).item() == pytest.approx(1.0)
    # expert 0 both favoured by the router and overloaded: loss > 1, and its gradient lowers logit 0
    skew = torch.zeros(N, E)
    skew[:, 0] = 2.0
    skew.requires_grad_(True)
    loss = losses.load_balance_loss(skew, torch.tensor([N, 0, 0, 0]))
    s0 = torch.sigmoid(torch.tensor(2.0)).item()
    assert loss.item() == pytest.approx(E * s0 / (s0 + 3 * 0.5))  # E * f_0 * P_0 with f_0 = 1
    loss.backward()
    assert (skew.grad[:, 0] > 0).all() and (skew.grad[:, 1:] < 0).all()


def test_z_loss_and_bias_update():
    logits = torch.randn(10, 4)
    assert losses.router_z_loss(logits).item() == pytest.approx(torch.logsumexp(logits, -1).pow(2).mean().item())
    args = ModelArgs(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, n_experts=4,
                     expert_dim=8, dense_dim=16, attention_chunk_size=8, max_seq_len=64)
    model = Transformer(args)
    model.init_weights()
    layers = losses.moe_layers(model)
    losses.update_expert_bias(layers, torch.tensor([[10, 2, 2, 2]]), rate=0.5)
    assert layers[0][1].expert_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    assert losses.load_imbalance(torch.tensor([[10, 2, 2, 2], [4, 4, 4, 4]])).tolist() == [2.5, 1.0]


def test_router_losses_read_the_recorded_stats():
    args = ModelArgs(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, n_experts=4,
                     expert_dim=8, dense_dim=16, attention_chunk_size=8, max_seq_len=64)
    model = Transformer(args)
    model.init_weights()
    layers = losses.moe_layers(model)
    with pytest.raises(RuntimeError, match="record_router_stats"):
        model(torch.randint(0, 64, (2, 8)))
        losses.router_losses(layers)
    losses.record_router_stats(model)
    model(torch.randint(0, 64, (2, 8)))
    bal, z, loads = losses.router_losses(layers)
    assert loads.shape == (2, 4) and loads.sum(-1).tolist() == [16, 16]
    (bal + z).backward()
    assert all(m.router.weight.grad is not None for _, m in layers)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    d = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        ckpt.save_checkpoint(d, step, {"x": torch.tensor([step])}, {"config": {}}, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(d)] == [2, 3]

    def boom():
        raise KeyboardInterrupt  # stands in for a kill between writing and the rename

    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(d, 4, {"x": torch.tensor([4])}, {"config": {}}, keep=2, _fault=boom)
    state, meta, path = ckpt.latest_checkpoint(d)
    assert meta["step"] == 3 and state["x"].item() == 3 and path.name == "step_00000003"
    # a leftover temporary folder (what SIGKILL leaves) is ignored, then cleaned
    (d / ".tmp-step_00000004-deadbeef").mkdir()
    assert [s for s, _ in ckpt.list_checkpoints(d)] == [2, 3]
    assert ckpt.clean_temporaries(d) == [".tmp-step_00000004-deadbeef"]
    # an unreadable newest checkpoint falls back to the previous one
    (d / "step_00000003" / "state.pt").write_bytes(b"truncated")
    state, meta, _ = ckpt.latest_checkpoint(d)
    assert meta["step"] == 2


def test_rng_state_round_trip():
    s = ckpt.rng_state()
    a = torch.rand(3)
    ckpt.set_rng_state(s)
    assert torch.equal(a, torch.rand(3))


def test_metrics_truncate_after(tmp_path):
    log = MetricsLog(tmp_path)
    for step in range(1, 6):
        log.write({"step": step, "loss": float(step)})
    with open(log.path, "a") as f:
        f.write('{"step": 6, "lo')  # a line cut short by a kill
    log.truncate_after(3)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert not math.isnan(read_metrics(tmp_path)[-1]["loss"])


def test_flops_per_token_counts_active_weights_and_attention():
    from llama4.model import count_params
    from llama4.train.flops import mean_keys_seen, train_flops_per_token

    assert mean_keys_seen(8, None) == 4.5 and mean_keys_seen(8, 16) == 4.5
    assert mean_keys_seen(8, 4) == 2.5 and mean_keys_seen(10, 4) == pytest.approx((10 + 10 + 3) / 10)
    args = ModelArgs(vocab_size=64, dim=16, n_layers=4, n_heads=2, n_kv_heads=1, head_dim=8, n_experts=4,
                     expert_dim=8, dense_dim=16, interleave_moe_layer_step=2, nope_layer_interval=4,
                     attention_chunk_size=4, max_seq_len=64)
    f = train_flops_per_token(args, 8)
    dense_active = count_params(args.replace(n_experts=0, dense_dim=16))["active"]
    moe_layer_extra = 2 * (3 * 16 * 8 + 16 * 4) - 3 * 16 * 16  # 2 MoE layers: 1 routed + shared + router vs dense
    assert f["matmul"] == 6 * (dense_active + moe_layer_extra - 64 * 16)
    assert f["attention"] == 3 * 4 * 2 * 8 * (3 * 2.5 + 4.5)  # three chunked layers, one NoPE layer


def test_language_id_names_held_out_text():
    """The identifier behind the run report's "detected as the prompted language" count, on
    validation text it was not fitted on. Measured: 130 of 171 documents right (76%), at least 4 of
    11 in every language; its misses are help pages dominated by untranslated English UI strings
    and code (vie, jpn, kor), which it calls English. A broken identifier would score about 1/14."""
    from llama4.data.corpus import iter_corpus
    from llama4.train.evaluate import LanguageID

    lid = LanguageID()
    right = total = 0
    for lang in lid.langs:
        docs = [d.text[:300] for d in iter_corpus("val", langs=(lang,)) if len(d.text) >= 300]
        hits = sum(lid(t) == lang for t in docs)
        assert hits >= len(docs) / 3, (lang, hits, len(docs))
        right, total = right + hits, total + len(docs)
    assert right / total >= 0.7, (right, total)
    assert lid("") == "?"
