"""Meta's native layout (llama-models 0.3.0, `llama_models/llama4/`): params.json + consolidated.NN.pth.

params.json -> ModelArgs follows Meta's `ModelArgs` (args.py) and the way `model.py` / `moe.py`
derive the FFN widths. The tensor names are those the reference's load hooks accept, in two
spellings: the released (fused) one and the module one Meta's `Transformer.state_dict()` writes.

    released (per model-parallel shard)             module / ours
    layers.i.attention.wqkv.weight                  attention.{wq,wk,wv}.weight (split per shard)
    layers.i.attention.wqkv.layer_norm_weight       attention_norm.weight
    layers.i.feed_forward.norm.weight               ffn_norm.weight (MoE layers)
    layers.i.feed_forward.mlp.layer_norm_weight     ffn_norm.weight (dense layers)
    layers.i.feed_forward.mlp.fc1_weight            feed_forward.{w1,w3}.weight (chunk 2 on dim 0)
    layers.i.feed_forward.mlp.fc2_weight            feed_forward.w2.weight
    layers.i.feed_forward.experts.moe_w_in_eD_F     experts.w1 [e, D, F]
    layers.i.feed_forward.experts.moe_w_swiglu_eD_F experts.w3 [e, D, F]
    layers.i.feed_forward.experts.moe_w_out_eF_D    experts.w2 [e, F, D]
    layers.i.feed_forward.w_in_shared_FD.weight     shared_expert.w1.weight
    layers.i.feed_forward.w_swiglu_FD.weight        shared_expert.w3.weight
    layers.i.feed_forward.w_out_shared_DF.weight    shared_expert.w2.weight
    layers.i.feed_forward.router_DE [D, E]          feed_forward.router.weight [E, D] (transposed)

Several consolidated.NN.pth files are the model-parallel shards of fairscale's Column/Row-parallel
layers; they are unfused per shard, then concatenated on the dimension each layer splits
(`SHARD_DIM`). Statistics and runtime state (`_extra_state`, `rope.freqs`, gate stats) are dropped
by name; the vision tower (`vision_embeddings.*`, `vision_projection.*`) is skipped by name.

No I/O here: `store.py` reads the files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from llama4.checkpoint.common import CheckpointConfigError, CheckpointError, wrap_config_error
from llama4.model import ConfigError, ModelArgs, RopeScaling

# --------------------------------------------------------------------------------------------
# params.json

# Meta's ModelArgs defaults (args.py) for the fields the text decoder uses.
META_DEFAULTS = {
    "n_kv_heads": None, "multiple_of": 256, "ffn_dim_multiplier": None, "ffn_exp": None, "norm_eps": 1e-5,
    "attention_chunk_size": None, "rope_theta": 500000.0, "use_scaled_rope": False,
    "rope_scaling_factor": None, "rope_high_freq_factor": None, "nope_layer_interval": None,
    "use_qk_norm": False, "attn_temperature_tuning": False, "floor_scale": 8192.0, "attn_scale": 0.1,
    "moe_args": None, "quantization_args": None, "lora_args": None, "max_seq_len": 2048,
}
MOE_DEFAULTS = {"num_experts": -1, "capacity_factor": 1.0, "auto_scale_F": True, "top_k": 1,
                "interleave_moe_layer_step": 1}
FIELD_NAMES = {
    "vocab_size": "vocab_size", "dim": "dim", "n_layers": "n_layers", "n_heads": "n_heads",
    "n_kv_heads": "n_kv_heads", "norm_eps": "norm_eps", "n_experts": "moe_args.num_experts",
    "top_k": "moe_args.top_k", "interleave_moe_layer_step": "moe_args.interleave_moe_layer_step",
    "nope_layer_interval": "nope_layer_interval", "attention_chunk_size": "attention_chunk_size",
    "floor_scale": "floor_scale", "attn_scale": "attn_scale", "rope_theta": "rope_theta",
    "rope_scaling": "rope_scaling_factor", "max_seq_len": "max_seq_len",
    "expert_dim": "ffn_exp/ffn_dim_multiplier/multiple_of", "dense_dim": "ffn_dim_multiplier/multiple_of",
}


def _num(p: Mapping, name: str, source: str, kinds=(int, float)):
    v = p[name]
    if isinstance(v, bool) or not isinstance(v, kinds):
        raise CheckpointConfigError(f"{source}: field {name!r} must be a number, got {v!r}")
    return v


def dense_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Width of the non-MoE FFN (`TransformerBlock.__init__` in model.py)."""
    h = int(2 * int(4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        h = int(ffn_dim_multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


def moe_hidden_dim(dim: int, ffn_exp: float, ffn_dim_multiplier: float, multiple_of: int,
                   capacity_factor: float, auto_scale_F: bool) -> int:  # noqa: N803
    """Width of every routed expert and of the shared expert (`MoE.__init__` in moe.py)."""
    h = int(2 * int(ffn_exp * dim) / 3)
    h = int(ffn_dim_multiplier * h)
    if auto_scale_F:
        h = int(h / (capacity_factor + 1))
    return h + (-h % multiple_of)


def args_from_meta_params(params: Mapping, source: str = "params.json") -> ModelArgs:
    """params.json (optionally wrapped in {"model": ...}) -> ModelArgs of the text decoder.

    The reference attention always uses head_dim = dim // n_heads (it ignores ``head_dim``), and
    temperature tuning is off unless params.json turns it on (Meta's default; HF's is on)."""
    if not isinstance(params, Mapping):
        raise CheckpointConfigError(f"{source}: expected a JSON object")
    params = params.get("model", params)
    for name in ("dim", "n_layers", "n_heads", "vocab_size"):
        if name not in params:
            raise CheckpointConfigError(f"{source}: required field {name!r} is missing")
    p = {**META_DEFAULTS, **params}
    for name in ("quantization_args", "lora_args"):
        if p[name]:
            raise CheckpointConfigError(f"{source}: field {name!r} is set; quantized / LoRA checkpoints "
                                        "are not supported")
    dim, n_heads = _num(p, "dim", source, (int,)), _num(p, "n_heads", source, (int,))
    if n_heads <= 0 or dim <= 0 or dim % n_heads:
        raise CheckpointConfigError(f"{source}: field 'dim' ({dim}) must be a positive multiple of "
                                    f"'n_heads' ({n_heads})")
    multiple_of = _num(p, "multiple_of", source, (int,))
    if multiple_of <= 0:
        raise CheckpointConfigError(f"{source}: field 'multiple_of' must be positive, got {multiple_of}")
    mult = p["ffn_dim_multiplier"]
    if mult is not None:
        mult = _num(p, "ffn_dim_multiplier", source)
    dense_dim = dense_hidden_dim(dim, multiple_of, mult)

    moe = p["moe_args"]
    if moe:
        if not isinstance(moe, Mapping):
            raise CheckpointConfigError(f"{source}: field 'moe_args' must be an object")
        m = {**MOE_DEFAULTS, **moe}
        for name in ("ffn_exp", "ffn_dim_multiplier"):
            if p[name] is None:
                raise CheckpointConfigError(f"{source}: field {name!r} is required with 'moe_args'")
        expert_dim = moe_hidden_dim(dim, _num(p, "ffn_exp", source), mult, multiple_of,
                                    _num(m, "capacity_factor", source), bool(m["auto_scale_F"]))
        n_experts, top_k, step = m["num_experts"], m["top_k"], m["interleave_moe_layer_step"]
        if isinstance(n_experts, int) and n_experts <= 0:
            raise CheckpointConfigError(f"{source}: field 'moe_args.num_experts' must be positive, "
                                        f"got {n_experts}")
    else:
        n_experts, top_k, step, expert_dim = 0, 1, 1, dense_dim

    scaling = None
    if p["use_scaled_rope"]:  # Meta fixes low_freq_factor = 1 and the old context to 8192
        scaling = RopeScaling(factor=p["rope_scaling_factor"] or 16.0, low_freq_factor=1.0,
                              high_freq_factor=p["rope_high_freq_factor"] or 1.0,
                              original_max_position_embeddings=8192)
    kw = dict(
        vocab_size=p["vocab_size"], dim=dim, n_layers=p["n_layers"], n_heads=n_heads,
        n_kv_heads=p["n_kv_heads"] if p["n_kv_heads"] is not None else n_heads, head_dim=dim // n_heads,
        norm_eps=p["norm_eps"], attention_bias=False, n_experts=n_experts, top_k=top_k,
        expert_dim=expert_dim, dense_dim=dense_dim, interleave_moe_layer_step=step,
        nope_layer_interval=p["nope_layer_interval"], attention_chunk_size=p["attention_chunk_size"],
        use_qk_norm=bool(p["use_qk_norm"]), attn_temperature_tuning=bool(p["attn_temperature_tuning"]),
        floor_scale=p["floor_scale"], attn_scale=p["attn_scale"], rope_theta=p["rope_theta"],
        rope_scaling=scaling, max_seq_len=p["max_seq_len"],
    )
    try:
        return ModelArgs(**kw)
    except ConfigError as e:
        raise wrap_config_error(e, source, FIELD_NAMES) from None


# --------------------------------------------------------------------------------------------
# tensor names

# Dropped by name: runtime state and statistics, never parameters of the model.
IGNORED = re.compile(r"(^|\.)(_extra_state|rope\.freqs|freq_cis|freqs_cis)$|"
                     r"feed_forward\.(global_gate_stats_3E|running_gate_stats_3E|expert_activation_DE)$|"
                     r"\._extra_state$")
# The vision tower: loaded by the vision room, skipped by the text model.
VISION_PREFIXES = ("vision_embeddings.", "vision_projection.")

_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")

# Dimension each fairscale-parallel tensor is split on across consolidated.NN.pth (None: replicated).
SHARD_DIM = {
    "tok_embeddings.weight": 0,  # VocabParallelEmbedding
    "output.weight": 0,  # ColumnParallelLinear
    "norm.weight": None,
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
    "attention_norm.weight": None, "ffn_norm.weight": None,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1,
    "feed_forward.router_DE": None,
    "feed_forward.experts.w1": 2, "feed_forward.experts.w3": 2, "feed_forward.experts.w2": 1,
    "feed_forward.shared_expert.w1.weight": 0, "feed_forward.shared_expert.w3.weight": 0,
    "feed_forward.shared_expert.w2.weight": 1,
}

# Released (fused) name inside a layer -> module name(s), with the per-shard transform.
_RENAMES = {
    "attention.wqkv.layer_norm_weight": "attention_norm.weight",
    "feed_forward.norm.weight": "ffn_norm.weight",
    "feed_forward.mlp.layer_norm_weight": "ffn_norm.weight",
    "feed_forward.mlp.fc2_weight": "feed_forward.w2.weight",
    "feed_forward.w_in_shared_FD.weight": "feed_forward.shared_expert.w1.weight",
    "feed_forward.w_swiglu_FD.weight": "feed_forward.shared_expert.w3.weight",
    "feed_forward.w_out_shared_DF.weight": "feed_forward.shared_expert.w2.weight",
    "feed_forward.w_in_shared_FD": "feed_forward.shared_expert.w1.weight",
    "feed_forward.w_swiglu_FD": "feed_forward.shared_expert.w3.weight",
    "feed_forward.w_out_shared_DF": "feed_forward.shared_expert.w2.weight",
}
_EXPERTS = {  # name -> (module name, view: "eD_F" -> [e, D, F], "eF_D" -> [e, F, D])
    "feed_forward.experts.moe_w_in_eD_F": ("feed_forward.experts.w1", "eD_F"),
    "feed_forward.experts.moe_w_swiglu_eD_F": ("feed_forward.experts.w3", "eD_F"),
    "feed_forward.experts.moe_w_out_eF_D": ("feed_forward.experts.w2", "eF_D"),
}


def unfuse_shard(sd: Mapping[str, torch.Tensor], args: ModelArgs, n_shards: int, source: str
                 ) -> dict[str, torch.Tensor]:
    """One shard in the released spelling -> the same shard in module names (Meta's load hooks)."""
    out: dict[str, torch.Tensor] = {}

    def put(name, t):
        if name in out:
            raise CheckpointError(f"{source}: tensor {name!r} is given twice (fused and unfused names)")
        out[name] = t

    h_local, kv_local = args.n_heads // n_shards, args.n_kv_heads // n_shards
    for key, t in sd.items():
        if IGNORED.search(key) or key.startswith(VISION_PREFIXES):
            continue
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(t).__name__}, not a tensor")
        m = _LAYER.match(key)
        if m is None:
            put(key, t)
            continue
        pre, rest = f"layers.{m.group(1)}.", m.group(2)
        if rest == "attention.wqkv.weight":
            d, r = divmod(t.shape[0], h_local + 2 * kv_local)
            if r or t.dim() != 2:
                raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}; rows must split "
                                      f"into {h_local} q + 2 x {kv_local} kv heads per shard")
            for name, part in zip(("wq", "wk", "wv"), t.split([d * h_local, d * kv_local, d * kv_local])):
                put(f"{pre}attention.{name}.weight", part)
        elif rest == "feed_forward.mlp.fc1_weight":
            if t.dim() != 2 or t.shape[0] % 2:
                raise CheckpointError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}; expected "
                                      "[2 x hidden, dim] (w1 stacked over w3)")
            w1, w3 = t.chunk(2, dim=0)
            put(pre + "feed_forward.w1.weight", w1)
            put(pre + "feed_forward.w3.weight", w3)
        elif rest in _EXPERTS:
            name, layout = _EXPERTS[rest]
            e, D = args.n_experts, args.dim
            if e <= 0 or t.numel() % (e * D):
                raise CheckpointError(f"{source}: tensor {key!r} of shape {tuple(t.shape)} does not hold "
                                      f"{e} experts of dim {D}")
            put(pre + name, t.reshape(e, D, -1) if layout == "eD_F" else t.reshape(e, -1, D))
        else:
            put(pre + _RENAMES.get(rest, rest), t)
    return out


def _shard_dim(name: str) -> int | None:
    m = _LAYER.match(name)
    rest = m.group(2) if m else name
    if rest not in SHARD_DIM:
        raise KeyError(name)
    return SHARD_DIM[rest]


def merge_shards(shards: list[dict[str, torch.Tensor]], sources: list[str]) -> dict[str, torch.Tensor]:
    """Model-parallel shards (module names) -> whole tensors."""
    if len(shards) == 1:
        return dict(shards[0])
    keys = set(shards[0])
    for sd, src in zip(shards[1:], sources[1:]):
        if set(sd) != keys:
            diff = set(sd) ^ keys
            raise CheckpointError(f"{src}: holds a different set of tensors than {sources[0]} "
                                  f"(e.g. {sorted(diff)[:4]})")
    out = {}
    for k in sorted(keys):
        try:
            dim = _shard_dim(k)
        except KeyError:
            raise CheckpointError(f"{sources[0]}: unexpected tensor {k!r}") from None
        parts = [sd.pop(k) for sd in shards]
        if dim is None:
            out[k] = parts[0]
            continue
        try:
            out[k] = torch.cat(parts, dim=dim)
        except RuntimeError as e:
            raise CheckpointError(f"{sources[0]}..: shards of tensor {k!r} do not concatenate on dim {dim}: "
                                  f"{[tuple(p.shape) for p in parts]}") from e
    return out


def to_ours(merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module names -> our names: only the router differs (router_DE [D, E] -> router.weight [E, D])."""
    out = {}
    for k, t in merged.items():
        if k.endswith("feed_forward.router_DE"):
            out[k.removesuffix("router_DE") + "router.weight"] = t.t().contiguous()
        else:
            out[k] = t
    return out

