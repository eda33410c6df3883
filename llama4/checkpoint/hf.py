"""Hugging Face layout: config.json <-> ModelArgs, and the tensor-name table with its transforms.

Semantics follow transformers 5.24 (`Llama4TextConfig.__post_init__`, `RotaryEmbeddingConfigMixin`),
as recorded in LLAMA4.md Part B §1 and §5. A text-only checkpoint (`Llama4ForCausalLM`,
``model_type: llama4_text``) names its tensors ``model.*`` / ``lm_head.weight``; a multimodal one
(`Llama4ForConditionalGeneration`, ``model_type: llama4``) prefixes the same names with
``language_model.`` and adds the vision tower (``vision_model.*``, ``multi_modal_projector.*``,
``VISION_RULES``), read into a `MultimodalTransformer` whose own names are ``text.*``,
``vision.*`` and ``projector.*``.

No I/O here: `store.py` reads and writes the files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from llama4.checkpoint.common import CheckpointConfigError, wrap_config_error
from llama4.model import ConfigError, ModelArgs, RopeScaling

# --------------------------------------------------------------------------------------------
# config.json

# Llama4TextConfig's defaults: a field absent from config.json takes these values in transformers.
HF_TEXT_DEFAULTS = {
    "vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
    "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "num_experts_per_tok": 1, "num_local_experts": 16, "moe_layers": None,
    "interleave_moe_layer_step": 1, "use_qk_norm": True, "rope_parameters": None, "no_rope_layers": None,
    "no_rope_layer_interval": 4, "attention_chunk_size": 8192, "layer_types": None,
    "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1, "attention_bias": False,
}
HF_DEFAULT_THETA = 500000.0

# our ModelArgs field -> the config.json field it comes from (for error messages)
FIELD_NAMES = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
    "norm_eps": "rms_norm_eps", "attention_bias": "attention_bias", "n_experts": "num_local_experts",
    "top_k": "num_experts_per_tok", "expert_dim": "intermediate_size", "dense_dim": "intermediate_size_mlp",
    "interleave_moe_layer_step": "interleave_moe_layer_step", "moe_layers": "moe_layers",
    "nope_layer_interval": "no_rope_layer_interval", "nope_layers": "no_rope_layers",
    "attention_chunk_size": "attention_chunk_size", "use_qk_norm": "use_qk_norm",
    "attn_temperature_tuning": "attn_temperature_tuning", "floor_scale": "floor_scale",
    "attn_scale": "attn_scale", "rope_theta": "rope_parameters.rope_theta",
    "rope_scaling": "rope_parameters", "max_seq_len": "max_position_embeddings",
}

TEXT_ARCH, TEXT_MODEL_TYPE = "Llama4ForCausalLM", "llama4_text"
MM_MODEL_TYPE, MM_TEXT_PREFIX = "llama4", "language_model."
# Multimodal tensors outside the text decoder (VISION_RULES): `load` reads them into a
# MultimodalTransformer; a reader of the text part alone skips them by these prefixes.
MM_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")


@dataclass
class HFText:
    """What config.json says about the text decoder."""

    args: ModelArgs
    prefix: str  # "" (Llama4ForCausalLM) or "language_model." (Llama4ForConditionalGeneration)
    skip_prefixes: tuple[str, ...]  # tensors that belong to other towers
    tie_word_embeddings: bool
    dtype: str | None


def _get(cfg: Mapping, name: str, kinds: tuple[type, ...], source: str, *, optional: bool = False,
         positive: bool = False):
    v = cfg[name]
    if v is None and optional:
        return None
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise CheckpointConfigError(f"{source}: field {name!r} must be "
                                    f"{' or '.join(k.__name__ for k in kinds)}, got {v!r}")
    if positive and not v > 0:
        raise CheckpointConfigError(f"{source}: field {name!r} must be positive, got {v!r}")
    return v


def _layer_list(cfg: Mapping, name: str, n_layers: int, source: str) -> list:
    v = cfg[name]
    if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise CheckpointConfigError(f"{source}: field {name!r} must be a list of ints, got {v!r}")
    return v


def _rope(t: Mapping, source: str) -> tuple[float, RopeScaling | None]:
    """HF's folding of legacy ``rope_scaling`` / ``rope_theta`` into ``rope_parameters``."""
    raw = t.get("rope_scaling") or t.get("rope_parameters") or {}
    if not isinstance(raw, Mapping):
        raise CheckpointConfigError(f"{source}: field 'rope_parameters' must be an object, got {raw!r}")
    p = dict(raw)
    if any(isinstance(v, Mapping) for v in p.values()):
        raise CheckpointConfigError(f"{source}: per-layer-type 'rope_parameters' are not supported "
                                    "(Llama 4 uses one RoPE for all layers)")
    theta = p.setdefault("rope_theta", t.get("rope_theta") or HF_DEFAULT_THETA)
    rope_type = p.setdefault("rope_type", p.get("type", "default"))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise CheckpointConfigError(f"{source}: field 'rope_parameters.rope_theta' must be positive, got {theta!r}")
    prf = p.get("partial_rotary_factor", 1.0)
    if prf != 1.0:
        raise CheckpointConfigError(f"{source}: field 'rope_parameters.partial_rotary_factor' = {prf!r} "
                                    "is not supported (Llama 4 rotates the whole head)")
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise CheckpointConfigError(f"{source}: field 'rope_parameters.rope_type' = {rope_type!r} is not "
                                    "supported (known: 'default', 'llama3')")
    p.setdefault("original_max_position_embeddings", t.get("max_position_embeddings"))
    kw = {}
    for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        v = p.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise CheckpointConfigError(f"{source}: field 'rope_parameters.{k}' is required for "
                                        f"rope_type 'llama3' and must be a number, got {v!r}")
        kw[k] = v
    kw["original_max_position_embeddings"] = int(kw["original_max_position_embeddings"])
    try:
        return float(theta), RopeScaling(**kw)
    except ConfigError as e:
        raise CheckpointConfigError(f"{source}: field 'rope_parameters': {e}") from None


def args_from_hf_config(cfg: Mapping, source: str = "config.json") -> HFText:
    """config.json (text-only or multimodal) -> ModelArgs of the text decoder."""
    if not isinstance(cfg, Mapping):
        raise CheckpointConfigError(f"{source}: expected a JSON object")
    model_type = cfg.get("model_type")
    if model_type == MM_MODEL_TYPE:
        text = cfg.get("text_config")
        if text is None:
            text = {}
        if not isinstance(text, Mapping):
            raise CheckpointConfigError(f"{source}: field 'text_config' must be an object")
        prefix, skip, src = MM_TEXT_PREFIX, MM_VISION_PREFIXES, f"{source} (text_config)"
    elif model_type == TEXT_MODEL_TYPE:
        text, prefix, skip, src = cfg, "", (), source
    else:
        raise CheckpointConfigError(f"{source}: field 'model_type' = {model_type!r}; expected "
                                    f"{TEXT_MODEL_TYPE!r} or {MM_MODEL_TYPE!r}")
    for where, c in ((source, cfg), (src, text)):
        if c.get("quantization_config"):
            raise CheckpointConfigError(f"{where}: field 'quantization_config' is set; quantized checkpoints "
                                        "are not supported")
    t = {**HF_TEXT_DEFAULTS, **text}
    if t.get("hidden_act") != "silu":
        raise CheckpointConfigError(f"{src}: field 'hidden_act' = {t.get('hidden_act')!r} is not supported "
                                    "(Llama 4 uses 'silu')")
    i, f = (int,), (int, float)
    n_layers = _get(t, "num_hidden_layers", i, src, positive=True)
    n_heads = _get(t, "num_attention_heads", i, src, positive=True)
    dim = _get(t, "hidden_size", i, src, positive=True)
    n_kv = _get(t, "num_key_value_heads", i, src, optional=True)
    n_kv = n_heads if n_kv is None else n_kv
    head_dim = _get(t, "head_dim", i, src, optional=True)
    if head_dim is None:
        if dim % n_heads:
            raise CheckpointConfigError(f"{src}: field 'hidden_size' ({dim}) is not divisible by "
                                        f"'num_attention_heads' ({n_heads}) and 'head_dim' is not given")
        head_dim = dim // n_heads

    # NoPE layers: no_rope_layers[i] == 0 (1 means RoPE); None or [] -> every interval-th layer.
    interval = _get(t, "no_rope_layer_interval", i, src, positive=True)
    derived_nope = [l for l in range(n_layers) if (l + 1) % interval == 0]
    nope_interval, nope_layers = interval, None
    if t["no_rope_layers"]:
        flags = _layer_list(t, "no_rope_layers", n_layers, src)
        if len(flags) < n_layers or any(v not in (0, 1) for v in flags):
            raise CheckpointConfigError(f"{src}: field 'no_rope_layers' must hold a 0 (NoPE) or 1 (RoPE) for "
                                        f"each of the {n_layers} layers, got {flags!r}")
        explicit = [l for l in range(n_layers) if flags[l] == 0]
        if explicit != derived_nope:
            nope_layers = tuple(explicit)
    chunk = _get(t, "attention_chunk_size", i, src, optional=True, positive=True)

    # MoE layers: explicit list, else every step-th layer. An explicit [] makes every FFN dense.
    n_experts = _get(t, "num_local_experts", i, src)
    step = t["interleave_moe_layer_step"]
    step_ok = isinstance(step, int) and not isinstance(step, bool) and step > 0
    moe_layers = None
    if t["moe_layers"] is None:
        step = _get(t, "interleave_moe_layer_step", i, src, positive=True)
        if not n_experts:
            raise CheckpointConfigError(f"{src}: field 'num_local_experts' is 0 but 'moe_layers' (from "
                                        f"'interleave_moe_layer_step' = {step}) is not empty")
    else:
        explicit = sorted(set(_layer_list(t, "moe_layers", n_layers, src)))
        bad = [l for l in explicit if not 0 <= l < n_layers]
        if bad:
            raise CheckpointConfigError(f"{src}: field 'moe_layers' holds layer(s) {bad} outside [0, {n_layers})")
        if explicit and not n_experts:
            raise CheckpointConfigError(f"{src}: field 'moe_layers' is non-empty but 'num_local_experts' is 0")
        if not explicit:
            n_experts = 0
        elif not (step_ok and explicit == list(range(step - 1, n_layers, step))):
            moe_layers = tuple(explicit)
        step = step if step_ok else 1  # unused when the list is explicit

    theta, scaling = _rope(t, src)
    args_kw = dict(
        vocab_size=_get(t, "vocab_size", i, src), dim=dim, n_layers=n_layers, n_heads=n_heads,
        n_kv_heads=n_kv, head_dim=head_dim, norm_eps=_get(t, "rms_norm_eps", f, src),
        attention_bias=bool(_get(t, "attention_bias", (bool,), src)),
        n_experts=n_experts,
        top_k=_get(t, "num_experts_per_tok", i, src), expert_dim=_get(t, "intermediate_size", i, src),
        dense_dim=_get(t, "intermediate_size_mlp", i, src), interleave_moe_layer_step=step,
        moe_layers=moe_layers,
        nope_layer_interval=nope_interval, nope_layers=nope_layers, attention_chunk_size=chunk,
        use_qk_norm=bool(_get(t, "use_qk_norm", (bool, int), src)),
        attn_temperature_tuning=bool(_get(t, "attn_temperature_tuning", (bool, int), src)),
        floor_scale=float(_get(t, "floor_scale", f, src)), attn_scale=float(_get(t, "attn_scale", f, src)),
        rope_theta=theta, rope_scaling=scaling,
        max_seq_len=_get(t, "max_position_embeddings", i, src),
    )
    try:
        args = ModelArgs(**args_kw)
    except ConfigError as e:
        raise wrap_config_error(e, src, FIELD_NAMES) from None

    layer_types = t.get("layer_types")
    if layer_types is not None:
        expected = [_layer_type(args, l) for l in range(n_layers)]
        if not isinstance(layer_types, list) or layer_types[:n_layers] != expected:
            raise CheckpointConfigError(
                f"{src}: field 'layer_types' = {layer_types!r} disagrees with no_rope_layers/attention_chunk_size "
                f"(expected {expected!r}); RoPE layers must be chunked and NoPE layers global")
    tie = bool(t.get("tie_word_embeddings") or False)
    dtype = t.get("dtype") or t.get("torch_dtype") or cfg.get("dtype") or cfg.get("torch_dtype")
    return HFText(args=args, prefix=prefix, skip_prefixes=skip, tie_word_embeddings=tie, dtype=dtype)


def _layer_type(args: ModelArgs, layer: int) -> str:
    chunked = not args.is_nope_layer(layer) and args.attention_chunk_size is not None
    return "chunked_attention" if chunked else "full_attention"


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype | None = None) -> dict:
    """ModelArgs -> config.json of a ``Llama4ForCausalLM`` (every field explicit, so the result
    does not depend on transformers' defaults)."""
    L = args.n_layers
    if args.rope_scaling is None:
        rope = {"rope_type": "default", "rope_theta": float(args.rope_theta)}
    else:
        s = args.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": float(args.rope_theta), "factor": float(s.factor),
                "low_freq_factor": float(s.low_freq_factor), "high_freq_factor": float(s.high_freq_factor),
                "original_max_position_embeddings": int(s.original_max_position_embeddings)}
    cfg = {
        "architectures": [TEXT_ARCH],
        "model_type": TEXT_MODEL_TYPE,
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "num_hidden_layers": L,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.hd,
        "hidden_act": "silu",
        "rms_norm_eps": args.norm_eps,
        "attention_bias": args.attention_bias,
        "intermediate_size": args.expert_dim,
        "intermediate_size_mlp": args.dense_dim,
        "num_local_experts": args.n_experts,
        "num_experts_per_tok": args.top_k,
        "interleave_moe_layer_step": args.interleave_moe_layer_step,
        "moe_layers": [l for l in range(L) if args.is_moe_layer(l)],
        "no_rope_layer_interval": args.nope_layer_interval or L + 1,
        "no_rope_layers": [int(not args.is_nope_layer(l)) for l in range(L)],
        "attention_chunk_size": args.attention_chunk_size,
        "layer_types": [_layer_type(args, l) for l in range(L)],
        "use_qk_norm": args.use_qk_norm,
        "attn_temperature_tuning": args.attn_temperature_tuning,
        "floor_scale": _num(args.floor_scale),
        "attn_scale": float(args.attn_scale),
        "rope_parameters": rope,
        # the same, in the v4 spelling that older transformers and the hub configs use
        "rope_theta": float(args.rope_theta),
        "rope_scaling": None if args.rope_scaling is None else dict(rope),
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": False,
    }
    if dtype is not None:
        cfg["dtype"] = str(dtype).removeprefix("torch.")
    return cfg


# --------------------------------------------------------------------------------------------
# tensor names: one table, explicit transforms


def _same(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return ts


def _cat_last(ts: list[torch.Tensor]) -> list[torch.Tensor]:  # (w1, w3) -> gate_up_proj [E, D, 2F]
    return [torch.cat(ts, dim=-1)]


def _split_last(ts: list[torch.Tensor]) -> list[torch.Tensor]:  # gate_up_proj -> (w1 gate, w3 up)
    (t,) = ts
    if t.shape[-1] % 2:
        raise ValueError(f"last dim {t.shape[-1]} is odd")
    return [c.contiguous() for c in t.chunk(2, dim=-1)]


@dataclass(frozen=True)
class Rule:
    """Our tensors <-> HF tensors. ``{i}`` stands for the layer index; a rule applies wherever our
    model has all its tensors (so dense vs MoE layers and optional biases pick themselves)."""

    ours: tuple[str, ...]
    hf: tuple[str, ...]
    to_hf: Callable[[list[torch.Tensor]], list[torch.Tensor]] = _same
    to_ours: Callable[[list[torch.Tensor]], list[torch.Tensor]] = _same


def _one(ours: str, hf: str) -> Rule:
    return Rule((ours,), (hf,))


TEXT_RULES: tuple[Rule, ...] = (
    _one("tok_embeddings.weight", "model.embed_tokens.weight"),
    _one("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    *(_one(f"layers.{{i}}.attention.{o}.{p}", f"model.layers.{{i}}.self_attn.{h}_proj.{p}")
      for o, h in (("wq", "q"), ("wk", "k"), ("wv", "v"), ("wo", "o")) for p in ("weight", "bias")),
    _one("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    # dense FFN layers
    _one("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.feed_forward.gate_proj.weight"),
    _one("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.feed_forward.up_proj.weight"),
    _one("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.feed_forward.down_proj.weight"),
    # MoE layers: router [E, D]; experts in x @ W layout, HF fuses gate|up on the last dim
    _one("layers.{i}.feed_forward.router.weight", "model.layers.{i}.feed_forward.router.weight"),
    Rule(("layers.{i}.feed_forward.experts.w1", "layers.{i}.feed_forward.experts.w3"),
         ("model.layers.{i}.feed_forward.experts.gate_up_proj",), to_hf=_cat_last, to_ours=_split_last),
    _one("layers.{i}.feed_forward.experts.w2", "model.layers.{i}.feed_forward.experts.down_proj"),
    *(_one(f"layers.{{i}}.feed_forward.shared_expert.{o}.weight",
           f"model.layers.{{i}}.feed_forward.shared_expert.{h}_proj.weight")
      for o, h in (("w1", "gate"), ("w3", "up"), ("w2", "down"))),
    _one("norm.weight", "model.norm.weight"),
    _one("output.weight", "lm_head.weight"),
)


# The vision tower: our MultimodalTransformer's ``vision.*`` / ``projector.*`` <-> HF's
# ``vision_model.*`` / ``multi_modal_projector.*``. ``{i}`` is the ViT layer.
VISION_RULES: tuple[Rule, ...] = (
    _one("vision.encoder.patch_embedding.weight", "vision_model.patch_embedding.linear.weight"),
    _one("vision.encoder.class_embedding", "vision_model.class_embedding"),
    _one("vision.encoder.positional_embedding", "vision_model.positional_embedding_vlm"),
    *(_one(f"vision.encoder.{o}.{p}", f"vision_model.{h}.{p}")
      for o, h in (("ln_pre", "layernorm_pre"), ("ln_post", "layernorm_post")) for p in ("weight", "bias")),
    *(_one(f"vision.encoder.layers.{{i}}.{o}.{p}", f"vision_model.model.layers.{{i}}.{h}.{p}")
      for o, h in (("attention_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                   ("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
                   ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
                   ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
      for p in ("weight", "bias")),
    _one("vision.adapter.fc1.weight", "vision_model.vision_adapter.mlp.fc1.weight"),
    _one("vision.adapter.fc2.weight", "vision_model.vision_adapter.mlp.fc2.weight"),
    _one("projector.weight", "multi_modal_projector.linear_1.weight"),
)
MM_OURS_TEXT_PREFIX = "text."  # MultimodalTransformer.text


@dataclass(frozen=True)
class Mapped:
    """One rule instantiated for one layer."""

    ours: tuple[str, ...]
    hf: tuple[str, ...]
    rule: Rule


def _instantiate(rules, our_keys: set, n_layers: int, ours_prefix: str, hf_prefix: str,
                 covered: set) -> list[Mapped]:
    out = []
    for rule in rules:
        layers = range(n_layers) if "{i}" in rule.ours[0] else (None,)
        for i in layers:
            ours = tuple(ours_prefix + k.format(i=i) for k in rule.ours)
            if all(k in our_keys for k in ours):
                out.append(Mapped(ours, tuple(hf_prefix + k.format(i=i) for k in rule.hf), rule))
                covered.update(ours)
    return out


def plan(our_keys, n_layers: int, prefix: str = "", n_vision_layers: int | None = None) -> list[Mapped]:
    """Every (our tensors <-> HF tensors) group for a model whose state dict has ``our_keys``;
    raises if one of our tensors has no rule (a model change the table does not know).

    A text ``Transformer``: ``prefix`` is put before the HF names ("" or "language_model.").
    A ``MultimodalTransformer`` (``n_vision_layers`` given): our ``text.*`` map to
    ``language_model.*`` and the vision tower follows ``VISION_RULES``."""
    our_keys = set(our_keys)
    covered: set = set()
    if n_vision_layers is None:
        out = _instantiate(TEXT_RULES, our_keys, n_layers, "", prefix, covered)
    else:
        out = (_instantiate(TEXT_RULES, our_keys, n_layers, MM_OURS_TEXT_PREFIX, MM_TEXT_PREFIX, covered)
               + _instantiate(VISION_RULES, our_keys, n_vision_layers, "", "", covered))
    unmapped = our_keys - covered
    if unmapped:
        raise KeyError(f"no HF name for tensor(s) {sorted(unmapped)}")
    return out


def hf_tensors(state: Mapping[str, torch.Tensor], n_layers: int,
               n_vision_layers: int | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Our state dict -> (HF name, tensor) pairs, one group at a time (so saving never holds a
    second copy of the whole model)."""
    for m in plan(state.keys(), n_layers, n_vision_layers=n_vision_layers):
        for name, t in zip(m.hf, m.rule.to_hf([state[k] for k in m.ours])):
            yield name, t


def hf_shapes(meta_state: Mapping[str, torch.Tensor], n_layers: int, prefix: str = "",
              n_vision_layers: int | None = None) -> dict[str, tuple]:
    """The HF tensor shapes a model expects, from its meta-device state dict."""
    shapes = {}
    for m in plan(meta_state.keys(), n_layers, prefix, n_vision_layers):
        for name, t in zip(m.hf, m.rule.to_hf([meta_state[k] for k in m.ours])):
            shapes[name] = tuple(t.shape)
    return shapes
