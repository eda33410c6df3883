"""TrainConfig: everything a training run depends on, as one flat dataclass plus the ModelArgs.

Recipes (``llama4/recipes``) return one; the command line changes single fields with
``--set key=value`` (``model.dim=256`` reaches into the model args). Values are parsed as JSON
when they parse (numbers, true/false, null, lists) and kept as strings otherwise, then checked
against the field's type, so a typo fails with the field's name instead of deep inside torch.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field

from llama4.model.args import ModelArgs, check_fields

SCHEDULES = ("cosine", "wsd", "constant")
PARAMETRIZATIONS = ("standard", "metap")
BALANCE = ("aux_loss", "bias", "aux_loss+bias", "none")
DTYPES = ("auto", "float32", "bfloat16")

# Fields a resumed run may change without changing what it computes.
OPERATIONAL = frozenset({
    "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_batches",
    "final_eval_batches", "load_eval_windows", "progress", "plots", "sample_tokens", "sample_langs", "threads",
    "compile", "activation_checkpointing", "max_bad_steps", "max_steps",
})


class TrainConfigError(ValueError):
    """An invalid training configuration; the message names the field."""


@dataclass
class TrainConfig:
    name: str = "custom"
    model: ModelArgs = field(default_factory=lambda: ModelArgs(vocab_size=8192, dim=128, n_layers=4,
                                                               n_heads=4, n_kv_heads=2, head_dim=32,
                                                               n_experts=8, expert_dim=256, dense_dim=512))
    seed: int = 0

    # tokenizer and data: by default a BPE of model.vocab_size is trained on the embedded corpus
    tokenizer: str | None = None  # an existing tokenizer file instead of training one
    tokenizer_doc_stride: int = 1  # train the BPE on every n-th document (speed for tiny runs)
    data_dir: str | None = None  # a prepared shard folder instead of OUT/data
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch (per rank)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps; sets the schedule's length

    # optimizer (AdamW; no weight decay on norms, embeddings and biases)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays linearly

    # mixture of experts
    balance: str = "aux_loss"  # aux_loss | bias | aux_loss+bias | none
    aux_loss_coef: float = 0.01  # Switch/GShard load-balancing loss weight
    bias_update_rate: float = 1e-3  # DeepSeek-V3 bias step (gamma) per optimizer step
    z_loss_coef: float = 1e-3  # router z-loss weight (ST-MoE)
    init_std: float = 0.02  # standard parametrization: N(0, init_std), GPT-2 depth factor on wo/w2

    # parametrization: "standard" (one LR, init_std) or "metap" (llama4.metap: per-layer init and
    # LR from a base shape; lr is then the base LR). metap: MetaPConfig as a dict, e.g.
    # {"base": {"dim": 32, ...}}; null with metap = the model itself is the base.
    parametrization: str = "standard"
    metap: dict | None = None

    # execution
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # autocast dtype; auto: bfloat16 where the device supports it fast, else float32
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False
    threads: int | None = None  # torch intra-op threads (None: torch's default)

    # checkpoints, logging, evaluation
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 1  # validation batches per language during training
    final_eval_batches: int = 8  # per language at the end
    load_eval_windows: int = 512  # sequences spread over each split for the final model's expert load
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    progress: bool = True
    plots: bool = True
    sample_tokens: int = 48
    sample_langs: tuple[str, ...] = ("eng", "deu", "fra", "spa", "ita", "por", "pol", "tur", "vie",
                                     "rus", "ell", "jpn", "kor", "cmn")

    def __post_init__(self):
        if isinstance(self.model, dict):
            self.model = ModelArgs.from_dict(self.model)
        if isinstance(self.sample_langs, list):
            self.sample_langs = tuple(self.sample_langs)
        self.validate()

    def validate(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "checkpoint_every",
                     "keep_checkpoints", "log_every", "eval_every", "max_bad_steps",
                     "tokenizer_doc_stride"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise TrainConfigError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        for name in ("eval_batches", "final_eval_batches", "warmup_steps", "sample_tokens", "load_eval_windows"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise TrainConfigError(f"TrainConfig.{name} must be an int >= 0, got {v!r}")
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                raise TrainConfigError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip", "aux_loss_coef", "bias_update_rate", "z_loss_coef",
                     "init_std"):
            if not getattr(self, name) >= 0:
                raise TrainConfigError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("beta1", "beta2", "min_lr_ratio", "decay_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise TrainConfigError(f"TrainConfig.{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name, allowed in (("schedule", SCHEDULES), ("balance", BALANCE), ("dtype", DTYPES),
                              ("parametrization", PARAMETRIZATIONS)):
            if getattr(self, name) not in allowed:
                raise TrainConfigError(f"TrainConfig.{name} must be one of {', '.join(allowed)}, "
                                       f"got {getattr(self, name)!r}")
        if self.metap is not None:
            from llama4.metap.param import MetaPConfig

            if not isinstance(self.metap, dict):
                raise TrainConfigError(f"TrainConfig.metap must be a dict or null, got {self.metap!r}")
            try:
                MetaPConfig.from_dict(self.metap)
            except (ValueError, TypeError) as e:
                raise TrainConfigError(f"TrainConfig.metap: {e}") from None
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise TrainConfigError(f"TrainConfig.threads must be an int >= 1 or null, got {self.threads!r}")

    # ----------------------------------------------------------------------------------------
    def metap_plan(self):
        """The :class:`llama4.metap.MetaP` of this run, or None under the standard parametrization."""
        if self.parametrization != "metap":
            return None
        from llama4.metap.param import BaseShape, MetaP, MetaPConfig

        mc = MetaPConfig.from_dict(self.metap) if self.metap else MetaPConfig(base=BaseShape.of(self.model))
        return MetaP(mc, self.model)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["model"] = self.model.to_dict()
        d["sample_langs"] = list(self.sample_langs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        check_fields(cls, d, TrainConfigError)
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def differences(self, other: "TrainConfig") -> dict[str, tuple]:
        """``{field: (mine, other's)}`` for every field (model fields as ``model.x``) that differs."""
        a, b = _flatten(self.to_dict()), _flatten(other.to_dict())
        return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k == "model":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# --------------------------------------------------------------------------------------------
# --set key=value overrides

def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _coerce(value, hint, where: str):
    """Check ``value`` against a field type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except TrainConfigError as e:
                errors.append(str(e))
        raise TrainConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TrainConfigError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else object
        return tuple(_coerce(v, inner, where) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TrainConfigError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TrainConfigError(f"{where} must be an int, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TrainConfigError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        return json.dumps(value) if not isinstance(value, (int, float)) else str(value)
    return value


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """A copy of ``cfg`` with each ``key=value`` applied (``model.key=value`` for ModelArgs)."""
    d = cfg.to_dict()
    train_hints = typing.get_type_hints(TrainConfig)
    model_hints = typing.get_type_hints(ModelArgs)
    for item in overrides:
        if "=" not in item:
            raise TrainConfigError(f"override {item!r} is not key=value")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        value = _parse_value(text)
        if key.startswith("model."):
            sub = key[len("model."):]
            if sub not in model_hints:
                raise TrainConfigError(f"unknown model field {sub!r} in override {item!r}")
            hint = model_hints[sub]
            if sub == "rope_scaling":
                d["model"][sub] = value  # a dict or null; ModelArgs validates it
            else:
                d["model"][sub] = _coerce(value, hint, f"model.{sub}")
        else:
            if key not in train_hints or key == "model":
                raise TrainConfigError(f"unknown TrainConfig field {key!r} in override {item!r}")
            d[key] = _coerce(value, train_hints[key], key)
    try:
        return TrainConfig.from_dict(d)
    except TrainConfigError:
        raise
    except ValueError as e:  # ModelArgs' ConfigError names the field
        raise TrainConfigError(str(e)) from None
