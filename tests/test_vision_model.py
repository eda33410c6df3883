"""The vision tower and early-fusion wrapper on their own: configs that fail by field name, the
released sizes, the merge order, the 2D RoPE layout, and the HF config mapping's checks."""

from __future__ import annotations

import pytest
import torch

from llama4.checkpoint import CheckpointConfigError, hf_mm_config_from_args, vision_args_from_hf_config
from llama4.model import (ConfigError, MultimodalTransformer, VisionArgs, count_params, flavor,
                          vision_flavor)
from llama4.model.vision import merge_image_features, vision_rope_angles


@pytest.mark.parametrize("kw,field", [
    (dict(dim=30, n_heads=4), "n_heads"),
    (dict(dim=72, n_heads=12), "multiple of 4"),
    (dict(image_size=30, patch_size=7), "image_size"),
    (dict(pixel_shuffle_ratio=0.3), "pixel_shuffle_ratio"),
    (dict(image_size=21, patch_size=7), "1/pixel_shuffle_ratio"),
    (dict(n_layers=0), "n_layers"),
    (dict(output_dim=True), "output_dim"),
])
def test_bad_vision_args_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        VisionArgs(**kw)


def test_released_vision_tower_and_param_counts():
    v = vision_flavor("scout")
    assert v == vision_flavor("maverick") and vision_flavor("behemoth") is None
    assert (v.grid, v.tokens_per_tile, v.shuffled_dim, v.hd) == (24, 144, 5632, 88)
    # LLAMA4.md Part A: vision + adapter + projector 0.872B; Scout 108.64B, Maverick 401.58B in all
    scout = count_params(flavor("scout"), v)
    maverick = count_params(flavor("maverick"), v)
    assert scout == {"total": 108_641_793_536, "active": 17_172_894_720, "text": 107_769_861_120,
                     "vision": 871_932_416}
    assert maverick["total"] == 401_583_781_376 and maverick["vision"] == 871_932_416
    with pytest.raises(ConfigError, match="unknown flavor"):
        vision_flavor("nope")


def test_rope_angles_layout():
    v = VisionArgs(dim=32, n_heads=2, image_size=56, patch_size=14)  # hd 16: 4 x-pairs, 4 y-pairs
    a = vision_rope_angles(v)
    assert a.shape == (17, 8)
    f = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    n = 6  # row 1, column 2
    assert torch.allclose(a[n, :4], 3 * f) and torch.allclose(a[n, 4:], 2 * f)
    assert (a[-1] == 0).all()  # CLS, appended last, is not rotated


def test_merge_fills_patch_slots_in_order_and_checks_counts():
    h = torch.zeros(2, 5, 3)
    tokens = torch.tensor([[7, 9, 7, 1, 2], [7, 3, 3, 3, 7]])
    feats = torch.arange(4 * 3, dtype=torch.float).view(4, 3) + 1
    out = merge_image_features(h, tokens, feats, image_token_id=7)
    assert torch.equal(out[0, 0], feats[0]) and torch.equal(out[0, 2], feats[1])
    assert torch.equal(out[1, 0], feats[2]) and torch.equal(out[1, 4], feats[3])
    assert (out[tokens != 7] == 0).all() and (h == 0).all()  # not in place
    with pytest.raises(ValueError, match="4 image-patch tokens .* 3 features"):
        merge_image_features(h, tokens, feats[:3], image_token_id=7)


def test_model_checks_its_inputs():
    model = MultimodalTransformer(flavor("debug"), vision_flavor("debug"), image_token_id=5)
    model.init_weights()
    ids = torch.tensor([[1, 5, 5, 5, 5, 2]])
    assert model(ids, pixel_values=torch.randn(1, 3, 28, 28)).shape == (1, 6, 8192)
    with pytest.raises(ValueError, match="pixel tiles must be"):
        model(ids, pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="4 image-patch tokens"):
        model(ids, pixel_values=torch.randn(2, 3, 28, 28))
    with pytest.raises(ConfigError, match="image_token_id"):
        MultimodalTransformer(flavor("debug"), vision_flavor("debug"), image_token_id=-1)
    # gradients reach every parameter through the fused sequence
    model(ids, pixel_values=torch.randn(1, 3, 28, 28)).sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" not in n and "router" not in n)
    assert model.vision.encoder.patch_embedding.weight.grad.abs().sum() > 0


def test_hf_config_round_trip_and_errors():
    args, v = flavor("scout"), vision_flavor("scout")
    cfg = hf_mm_config_from_args(args, v, 200092)
    assert (cfg["boi_token_index"], cfg["eoi_token_index"], cfg["image_token_index"]) == (200080, 200081, 200092)
    got = vision_args_from_hf_config(cfg)
    assert got.args == v and got.image_token_id == 200092
    hub = {"model_type": "llama4", "image_token_index": 200092, "vision_config": {  # the hub's Scout, v4 spelling
        "hidden_size": 1408, "image_size": 336, "intermediate_size": 5632, "num_attention_heads": 16,
        "num_hidden_layers": 34, "patch_size": 14, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096,
        "projector_output_dim": 4096, "vision_output_dim": 4096, "rope_theta": 10000, "norm_eps": 1e-05}}
    assert vision_args_from_hf_config(hub).args == v
    assert vision_args_from_hf_config({"model_type": "llama4_text"}) is None
    bad = [({"vision_output_dim": 7680}, "vision_output_dim"), ({"intermediate_size": 4096}, "intermediate_size"),
           ({"norm_eps": 1e-6}, "norm_eps"), ({"num_attention_heads": 12}, "num_attention_heads"),
           ({"image_size": 330}, "image_size")]
    for change, field in bad:
        with pytest.raises(CheckpointConfigError, match=field):
            vision_args_from_hf_config({**hub, "vision_config": {**hub["vision_config"], **change}})
    with pytest.raises(CheckpointConfigError, match="mlp_dim"):
        hf_mm_config_from_args(args, v.replace(mlp_dim=1000), 200092)
