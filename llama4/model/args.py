"""Typed configuration of the Llama 4 text decoder, and the named flavors.

Field names follow Meta's reference (`llama_models/llama4/args.py`) where it has one; the Hugging
Face names are mapped in `llama4/checkpoint/hf.py`. Every field is validated on construction and
errors name the field, so a bad config.json fails at load time and not deep inside torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """An invalid model configuration; the message names the offending field."""


def check_fields(cls, d: dict, error: type[Exception] = ConfigError) -> None:
    """Reject keys of ``d`` that are not fields of the dataclass ``cls``, naming them."""
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise error(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")


@dataclass(frozen=True)
class RopeScaling:
    """llama3-style frequency scaling (Scout: factor 16, low 1, high 1, original context 8192)."""

    factor: float = 16.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"rope_scaling.{name} must be > 0, got {getattr(self, name)!r}")
        if self.high_freq_factor < self.low_freq_factor:
            raise ConfigError(
                f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must be >= "
                f"low_freq_factor ({self.low_freq_factor})"
            )


@dataclass
class ModelArgs:
    # vocabulary and width
    vocab_size: int = 202048
    dim: int = 5120
    n_layers: int = 48
    n_heads: int = 40
    n_kv_heads: int = 8
    head_dim: int | None = 128  # None: dim // n_heads
    norm_eps: float = 1e-5
    attention_bias: bool = False

    # mixture of experts; n_experts = 0 makes every FFN dense
    n_experts: int = 16
    top_k: int = 1
    expert_dim: int = 8192  # width of every routed expert and of the shared expert
    dense_dim: int = 16384  # width of the FFN in non-MoE layers
    interleave_moe_layer_step: int = 1  # layer i is MoE iff (i + 1) % step == 0
    moe_layers: tuple[int, ...] | None = None  # explicit list; overrides the step

    # iRoPE: RoPE + chunked local attention, except NoPE + global attention every N-th layer
    nope_layer_interval: int | None = 4  # layer i is NoPE iff (i + 1) % interval == 0
    nope_layers: tuple[int, ...] | None = None  # explicit list; overrides the interval
    attention_chunk_size: int | None = 8192  # None: RoPE layers attend globally too
    use_qk_norm: bool = True  # weightless RMS norm of q, k after RoPE (RoPE layers only)
    attn_temperature_tuning: bool = True  # NoPE layers: q *= 1 + attn_scale*log1p(floor((p+1)/floor_scale))
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None

    max_seq_len: int = 262144  # advisory context limit for inference; never enforced by the model

    # Forward multipliers of a width/depth-transferable parametrization (llama4.metap). The
    # defaults are Llama 4's own forward; checkpoint export folds other values into the weights.
    embed_mult: float = 1.0  # h = embed(tokens) * embed_mult
    residual_mult: float = 1.0  # h += residual_mult * branch(norm(h)) for attention and FFN
    logit_mult: float = 1.0  # logits = output(norm(h)) * logit_mult
    softmax_scale: float | None = None  # attention logit scale; None: 1/sqrt(head_dim)

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        for name in ("moe_layers", "nope_layers"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, tuple(int(i) for i in v))
        self.validate()

    # ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "top_k", "expert_dim",
                    "dense_dim", "interleave_moe_layer_step", "floor_scale", "rope_theta", "norm_eps",
                    "max_seq_len")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"ModelArgs.{name} must be a positive number, got {v!r}")
        if not isinstance(self.n_experts, int) or self.n_experts < 0:
            raise ConfigError(f"ModelArgs.n_experts must be an int >= 0, got {self.n_experts!r}")
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0):
            raise ConfigError(f"ModelArgs.head_dim must be a positive int or None, got {self.head_dim!r}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ConfigError(f"ModelArgs.dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                              "when head_dim is not given")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"ModelArgs.n_heads ({self.n_heads}) must be divisible by n_kv_heads "
                              f"({self.n_kv_heads})")
        if self.hd % 2:
            raise ConfigError(f"ModelArgs.head_dim ({self.hd}) must be even for RoPE")
        if self.n_experts and self.top_k > self.n_experts:
            raise ConfigError(f"ModelArgs.top_k ({self.top_k}) exceeds n_experts ({self.n_experts})")
        if self.attention_chunk_size is not None and (
                not isinstance(self.attention_chunk_size, int) or self.attention_chunk_size <= 0):
            raise ConfigError(f"ModelArgs.attention_chunk_size must be a positive int or None, "
                              f"got {self.attention_chunk_size!r}")
        if self.nope_layer_interval is not None and (
                not isinstance(self.nope_layer_interval, int) or self.nope_layer_interval <= 0):
            raise ConfigError(f"ModelArgs.nope_layer_interval must be a positive int or None, "
                              f"got {self.nope_layer_interval!r}")
        for name in ("embed_mult", "residual_mult", "logit_mult"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"ModelArgs.{name} must be a positive number, got {v!r}")
        if self.softmax_scale is not None and (isinstance(self.softmax_scale, bool)
                                               or not isinstance(self.softmax_scale, (int, float))
                                               or not self.softmax_scale > 0):
            raise ConfigError(f"ModelArgs.softmax_scale must be a positive number or None, "
                              f"got {self.softmax_scale!r}")
        if self.attn_scale < 0:
            raise ConfigError(f"ModelArgs.attn_scale must be >= 0, got {self.attn_scale!r}")
        for name in ("moe_layers", "nope_layers"):
            for i in getattr(self, name) or ():
                if not 0 <= i < self.n_layers:
                    raise ConfigError(f"ModelArgs.{name} contains layer {i}, outside [0, {self.n_layers})")
        if self.moe_layers and not self.n_experts:
            raise ConfigError("ModelArgs.moe_layers is non-empty but n_experts is 0")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"ModelArgs.rope_scaling must be RopeScaling, a dict or None, "
                              f"got {type(self.rope_scaling).__name__}")

    # ----------------------------------------------------------------------------------------
    @property
    def hd(self) -> int:
        """The per-head width actually used."""
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def has_forward_multipliers(self) -> bool:
        """True when the forward differs from Llama 4's by a multiplier (MetaP); ``llama4.save`` folds them."""
        return (self.embed_mult, self.residual_mult, self.logit_mult, self.softmax_scale) != (1.0, 1.0, 1.0, None)

    def is_moe_layer(self, i: int) -> bool:
        if not self.n_experts:
            return False
        if self.moe_layers is not None:
            return i in self.moe_layers
        return (i + 1) % self.interleave_moe_layer_step == 0

    def is_nope_layer(self, i: int) -> bool:
        if self.nope_layers is not None:
            return i in self.nope_layers
        return self.nope_layer_interval is not None and (i + 1) % self.nope_layer_interval == 0

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in ("moe_layers", "nope_layers"):
            if d[name] is not None:
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        check_fields(cls, d)
        return cls(**d)


@dataclass
class VisionArgs:
    """The vision tower of early fusion (Meta's ``VisionArgs``; HF's ``Llama4VisionConfig``): a ViT
    over square tiles, a pixel shuffle, a two-layer GELU adapter, and the projector into the text
    width. Scout and Maverick share one (LLAMA4.md Part A)."""

    dim: int = 1408  # ViT width
    n_layers: int = 34
    n_heads: int = 16
    mlp_dim: int = 5632  # ViT MLP width
    image_size: int = 336  # tile side in pixels
    patch_size: int = 14
    n_channels: int = 3
    pixel_shuffle_ratio: float = 0.5  # tokens per tile shrink by ratio**2, channels grow by 1/ratio**2
    output_dim: int = 4096  # adapter width (fc1 out, fc2 in/out) = the projector's input
    rope_theta: float = 10000.0  # 2D RoPE over patch (x, y)
    norm_eps: float = 1e-5  # the ViT's LayerNorms

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "mlp_dim", "image_size", "patch_size", "n_channels",
                     "output_dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"VisionArgs.{name} must be a positive int, got {v!r}")
        for name in ("pixel_shuffle_ratio", "rope_theta", "norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"VisionArgs.{name} must be a positive number, got {v!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"VisionArgs.image_size ({self.image_size}) must be a multiple of "
                              f"patch_size ({self.patch_size})")
        if self.dim % self.n_heads:
            raise ConfigError(f"VisionArgs.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.hd % 4:
            raise ConfigError(f"VisionArgs: head width dim/n_heads = {self.hd} must be a multiple of 4 "
                              "(2D RoPE rotates a quarter of the pairs by x and a quarter by y)")
        k = 1 / self.pixel_shuffle_ratio
        if not _is_int(k):
            raise ConfigError(f"VisionArgs.pixel_shuffle_ratio must be 1/k for an integer k (Llama 4: 0.5), "
                              f"got {self.pixel_shuffle_ratio!r}")
        if self.grid % round(k):
            raise ConfigError(f"VisionArgs: the patch grid image_size/patch_size = {self.grid} must be a "
                              f"multiple of 1/pixel_shuffle_ratio = {round(k)}")

    @property
    def hd(self) -> int:
        return self.dim // self.n_heads

    @property
    def grid(self) -> int:
        """Patches per tile side."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Image tokens (``<|patch|>`` positions) per tile after the pixel shuffle (144 for Scout)."""
        return (self.grid // self.shuffle_factor) ** 2

    @property
    def shuffled_dim(self) -> int:
        """Channels after the pixel shuffle: the adapter's input width (5632 for Scout)."""
        return self.dim * self.shuffle_factor ** 2

    @property
    def shuffle_factor(self) -> int:
        """k = 1/pixel_shuffle_ratio: each k x k block of patches becomes one token."""
        return round(1 / self.pixel_shuffle_ratio)

    def replace(self, **changes) -> "VisionArgs":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VisionArgs":
        check_fields(cls, d)
        return cls(**d)


def _is_int(x: float) -> bool:
    return abs(x - round(x)) < 1e-9


# --------------------------------------------------------------------------------------------
# Named flavors. Scout and Maverick are the released configs (LLAMA4.md, Part A).

def _debug() -> ModelArgs:
    # Tiny but complete: MoE every 2nd layer (dense + MoE interleave), a NoPE layer, chunked
    # attention with a small chunk, QK-norm, temperature tuning that kicks in within a short run.
    return ModelArgs(vocab_size=8192, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                     n_experts=8, top_k=1, expert_dim=256, dense_dim=512, interleave_moe_layer_step=2,
                     nope_layer_interval=4, attention_chunk_size=64, floor_scale=128.0,
                     max_seq_len=1 << 20)


def _scout() -> ModelArgs:
    return ModelArgs(interleave_moe_layer_step=1, n_experts=16, use_qk_norm=True,
                     rope_scaling=RopeScaling(factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                                              original_max_position_embeddings=8192),
                     max_seq_len=10485760)


def _maverick() -> ModelArgs:
    return ModelArgs(interleave_moe_layer_step=2, n_experts=128, use_qk_norm=False, rope_scaling=None,
                     max_seq_len=1048576)


def _behemoth() -> ModelArgs:
    # Meta published only "~2T total, 288B active, 16 experts". We keep Scout's recipe (MoE in
    # every layer, top-1 routed + 1 shared expert, GQA with 8 KV heads, head_dim 128, iRoPE every
    # 4th layer) and solve for the rest: per layer, attention a = 2*D*(H+KV)*hd and expert
    # e = 3*D*F give total ~ L*(a + 17e) and active ~ L*(a + 2e), so total/active ~ 6.9 fixes
    # a ~ 0.52e. D = 16384 with 128 heads gives a = 0.57B, hence F ~ 22.1k -> 22528 (a multiple of
    # 2048, as Meta rounds). L = 100 then gives 1.95T total and 285B active (`llama4 params behemoth`).
    return ModelArgs(dim=16384, n_layers=100, n_heads=128, n_kv_heads=8, head_dim=128,
                     n_experts=16, top_k=1, expert_dim=22528, dense_dim=45056, interleave_moe_layer_step=1,
                     rope_scaling=None, max_seq_len=262144)


FLAVORS = {"debug": _debug, "scout": _scout, "maverick": _maverick, "behemoth": _behemoth}


def flavor(name: str) -> ModelArgs:
    """The text decoder of a named flavor."""
    try:
        return FLAVORS[name]()
    except KeyError:
        raise ConfigError(f"unknown flavor {name!r}; known: {', '.join(FLAVORS)}") from None


def _debug_vision() -> VisionArgs:
    # 28 px tiles of 7 px patches: a 4x4 grid, 4 image tokens per tile after the shuffle.
    return VisionArgs(dim=64, n_layers=2, n_heads=4, mlp_dim=256, image_size=28, patch_size=7, output_dim=128)


# The vision tower of each multimodal flavor (Scout and Maverick share Meta's released one;
# Behemoth's is unpublished, so it has none here).
VISION_FLAVORS = {"debug": _debug_vision, "scout": VisionArgs, "maverick": VisionArgs}


def vision_flavor(name: str) -> VisionArgs | None:
    """The vision tower of a named flavor, or None for a text-only flavor."""
    if name not in FLAVORS:
        raise ConfigError(f"unknown flavor {name!r}; known: {', '.join(FLAVORS)}")
    make = VISION_FLAVORS.get(name)
    return make() if make else None
