"""Hugging Face layout of a multimodal checkpoint (``Llama4ForConditionalGeneration``): the
``vision_config`` <-> `VisionArgs`, the image token, and the whole config.json. The tensor names
are in `hf.VISION_RULES`, beside the text table. Semantics: transformers 5.24 (LLAMA4.md §1.2-1.3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from llama4.checkpoint.common import CheckpointConfigError, wrap_config_error
from llama4.checkpoint.hf import MM_MODEL_TYPE, _get, hf_config_from_args
from llama4.model import ConfigError, ModelArgs, VisionArgs


MM_ARCH, VISION_MODEL_TYPE = "Llama4ForConditionalGeneration", "llama4_vision_model"
# Llama4VisionConfig's defaults (transformers 5.24). They are not the released model's (that one
# has hidden 1408, 336 px tiles), and with vision_output_dim 7680 != projector_output_dim 4096 a
# config that leaves both out does not even run in transformers: we reject it by name.
HF_VISION_DEFAULTS = {
    "hidden_size": 768, "hidden_act": "gelu", "num_hidden_layers": 34, "num_attention_heads": 16,
    "num_channels": 3, "intermediate_size": 5632, "vision_output_dim": 7680, "image_size": 448,
    "patch_size": 14, "norm_eps": 1e-5, "pixel_shuffle_ratio": 0.5, "projector_input_dim": 4096,
    "projector_output_dim": 4096, "rope_parameters": None,
}
HF_VISION_THETA = 10000.0
HF_IMAGE_TOKEN_INDEX = 200092  # Llama4Config default (`<|patch|>` with the official vocabulary)
# `<|image_start|>` / `<|image_end|>` sit 12 / 11 ids before `<|patch|>` in every Llama 4 vocabulary
# (llama4/tokenizer/special_tokens.py); transformers stores them but the model never reads them.
BOI_OFFSET, EOI_OFFSET = -12, -11

VISION_FIELD_NAMES = {
    "dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "mlp_dim": "intermediate_size", "image_size": "image_size", "patch_size": "patch_size",
    "n_channels": "num_channels", "pixel_shuffle_ratio": "pixel_shuffle_ratio",
    "output_dim": "projector_output_dim", "rope_theta": "rope_parameters.rope_theta", "norm_eps": "norm_eps",
}


@dataclass
class HFVision:
    """What a multimodal config.json says beyond the text decoder."""

    args: VisionArgs
    image_token_id: int


def vision_args_from_hf_config(cfg: Mapping, source: str = "config.json") -> HFVision | None:
    """The vision tower of a ``Llama4ForConditionalGeneration`` config.json, or None for a
    text-only (``llama4_text``) one. Fields transformers ignores (``norm_eps``: its LayerNorms
    always use 1e-5; ``hidden_act``: always exact GELU; ``multi_modal_projector_bias``;
    ``vision_feature_select_strategy``) are ignored here too, except that a ``norm_eps`` other
    than 1e-5 is an error rather than a silent difference."""
    if not isinstance(cfg, Mapping) or cfg.get("model_type") != MM_MODEL_TYPE:
        return None
    src = f"{source} (vision_config)"
    raw = cfg.get("vision_config")
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise CheckpointConfigError(f"{source}: field 'vision_config' must be an object")
    v = {**HF_VISION_DEFAULTS, **raw}
    i, f = (int,), (int, float)
    dims = {name: _get(v, name, i, src, positive=True)
            for name in ("projector_input_dim", "projector_output_dim", "vision_output_dim")}
    if len(set(dims.values())) > 1:
        raise CheckpointConfigError(
            f"{src}: fields 'projector_input_dim', 'projector_output_dim' and 'vision_output_dim' must be "
            f"equal (the adapter's fc2 is square and feeds the projector), got {dims}")
    hidden = _get(v, "hidden_size", i, src, positive=True)
    ratio = _get(v, "pixel_shuffle_ratio", f, src, positive=True)
    mlp = _get(v, "intermediate_size", i, src, positive=True)
    if abs(mlp * ratio * ratio - hidden) > 1e-6:
        raise CheckpointConfigError(
            f"{src}: field 'intermediate_size' ({mlp}) must equal hidden_size / pixel_shuffle_ratio**2 "
            f"({hidden / ratio / ratio:g}): transformers sizes both the ViT MLP and the adapter's fc1 input "
            "with it")
    eps = _get(v, "norm_eps", f, src, positive=True)
    if abs(eps - 1e-5) > 1e-12:
        raise CheckpointConfigError(f"{src}: field 'norm_eps' = {eps!r} is not supported (transformers' vision "
                                    "LayerNorms always use 1e-5)")
    rope = v.get("rope_parameters") or {}
    if not isinstance(rope, Mapping):
        raise CheckpointConfigError(f"{src}: field 'rope_parameters' must be an object, got {rope!r}")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointConfigError(f"{src}: field 'rope_parameters.rope_type' = {rope.get('rope_type')!r} is "
                                    "not supported (the vision RoPE is 'default')")
    theta = rope.get("rope_theta", v.get("rope_theta") or HF_VISION_THETA)
    token = cfg.get("image_token_index", cfg.get("image_token_id", HF_IMAGE_TOKEN_INDEX))
    if isinstance(token, bool) or not isinstance(token, int) or token < 0:
        raise CheckpointConfigError(f"{source}: field 'image_token_index' must be a token id, got {token!r}")
    try:
        args = VisionArgs(dim=hidden, n_layers=_get(v, "num_hidden_layers", i, src, positive=True),
                          n_heads=_get(v, "num_attention_heads", i, src, positive=True), mlp_dim=mlp,
                          image_size=_get(v, "image_size", i, src, positive=True),
                          patch_size=_get(v, "patch_size", i, src, positive=True),
                          n_channels=_get(v, "num_channels", i, src, positive=True),
                          pixel_shuffle_ratio=float(ratio), output_dim=dims["projector_output_dim"],
                          rope_theta=float(theta), norm_eps=float(eps))
    except ConfigError as e:
        raise wrap_config_error(e, src, VISION_FIELD_NAMES) from None
    return HFVision(args=args, image_token_id=token)


def hf_vision_config_from_args(v: VisionArgs) -> dict:
    """VisionArgs -> the ``vision_config`` object (every field explicit)."""
    if v.mlp_dim != v.shuffled_dim:
        raise CheckpointConfigError(
            f"VisionArgs.mlp_dim ({v.mlp_dim}) != dim / pixel_shuffle_ratio**2 ({v.shuffled_dim}): transformers "
            "cannot represent this tower (its intermediate_size sizes both)")
    if abs(v.norm_eps - 1e-5) > 1e-12:
        raise CheckpointConfigError(f"VisionArgs.norm_eps ({v.norm_eps}) != 1e-5: transformers' vision "
                                    "LayerNorms always use 1e-5")
    return {
        "model_type": VISION_MODEL_TYPE, "hidden_size": v.dim, "hidden_act": "gelu",
        "num_hidden_layers": v.n_layers, "num_attention_heads": v.n_heads, "num_channels": v.n_channels,
        "intermediate_size": v.mlp_dim, "image_size": v.image_size, "patch_size": v.patch_size,
        "norm_eps": v.norm_eps, "pixel_shuffle_ratio": v.pixel_shuffle_ratio,
        "projector_input_dim": v.output_dim, "projector_output_dim": v.output_dim,
        "vision_output_dim": v.output_dim, "multi_modal_projector_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(v.rope_theta)},
        "rope_theta": float(v.rope_theta),  # v4 spelling, as in the hub configs
    }


def hf_mm_config_from_args(args: ModelArgs, vision: VisionArgs, image_token_id: int,
                           dtype: torch.dtype | None = None) -> dict:
    """-> config.json of a ``Llama4ForConditionalGeneration``."""
    text = hf_config_from_args(args, dtype)
    text.pop("architectures")
    cfg = {
        "architectures": [MM_ARCH],
        "model_type": MM_MODEL_TYPE,
        "text_config": text,
        "vision_config": hf_vision_config_from_args(vision),
        "image_token_index": image_token_id,
        "boi_token_index": max(image_token_id + BOI_OFFSET, 0),
        "eoi_token_index": max(image_token_id + EOI_OFFSET, 0),
        "tie_word_embeddings": False,
    }
    if dtype is not None:
        cfg["dtype"] = text["dtype"]
    return cfg
