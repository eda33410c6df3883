"""MetaP-like parametrization: per-parameter-group init std, Adam LR, weight decay and epsilon
multipliers, plus forward multipliers, that make hyper-parameters tuned on a small base shape
carry over to a wider, deeper, more-expert target.

Meta published no formula for MetaP; this is a reconstruction from the public science (μP /
Tensor Programs V and ``microsoft/mup``'s Adam rules, CompleteP's depth rule, μP for MoE), see
``shared/METAP.md``. Notation: ``m = fan_in / base fan_in`` of a parameter, ``m_d = dim / base
dim``, ``m_L = n_layers / base n_layers``, ``a`` = ``depth_alpha``; η, σ, ε, λ are the base LR,
init std, Adam epsilon and weight decay. At the base shape every multiplier is 1, and MetaP
equals the standard parametrization (same init, one LR) except for the knobs set to other values.

The rules, and why:

* hidden matrices (attention q/k/v/o, dense FFN, shared expert, routed experts w1/w3/w2):
  init σ/sqrt(m) -- keeps each output coordinate O(1) as fan-in grows (variance ∝ 1/fan_in);
  Adam LR η/m · m_L^(a-1) -- Adam's update has entries of size η whatever the gradient, and
  they add up coherently over fan-in, so the step must shrink like 1/fan_in;
  λ·m -- keeps the decoupled decay η·λ per step constant; ε/(m · m_L^a) -- the gradients
  shrink like 1/(fan_in · depth multiplier), ε must not swamp them.
* residual outputs (``wo``, every ``w2``) additionally keep the base's GPT-2 factor
  1/sqrt(2 L_base) and no more: depth is handled by the forward multiplier below, not by init.
* residual branches: h += m_L^-a · branch(norm(h)) -- CompleteP (a = 1) / depth-μP (a = 0.5):
  each of L blocks contributes O(1/L) so the residual stream and its updates stay O(1) with depth.
* norm gains in blocks: LR η · m_L^(a-1); final norm: LR η -- vector-like, one width-free
  dimension, Adam already gives O(1) steps.
* embedding: init σ_emb, LR η · embed_lr_mult, forward × embed_mult -- vector-like (its fan-in
  is the vocabulary, not the width); its LR is the one per-layer knob that matters most under
  AdamW (Kalra & Barkeshli), so it is tunable on the base.
* output head (readout): init σ_out (constant), LR η · output_lr_mult, logits × output_mult/m_d
  -- μP's MuReadout: the logit is a sum over a fan-in that grows with width of terms that Adam
  moves coherently, so it needs the 1/width multiplier or it blows up with width.
* router (MoE): init σ_router/m_d, LR η · router_lr_mult/m_d -- also a readout (fan-out = number
  of experts, finite), written in the equivalent no-multiplier form, which keeps the router's
  weights and HF export unchanged; its logits set the sigmoid gate and the top-1 choice, so they
  must stay O(1) with width like the output logits.
* number of experts: no multiplier -- no fan-in depends on it, each token meets one expert
  (top-1), and Adam normalises away the 1/E share of tokens each expert's gradient sees.
  Expert width enters through the fan-in of ``w2`` like any hidden matrix.
* attention logits: scale sqrt(hd_base)/hd -- μP's 1/d rule anchored to equal 1/sqrt(hd) at the
  base head width. Heads are meant to grow in number, not width: at a fixed head_dim this is the
  standard scale, and the QK-norm of the RoPE layers (which fixes |q|, |k|) is unaffected.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from torch import nn

from llama4.model.args import ConfigError, ModelArgs, check_fields
from llama4.model.layers import FeedForward, RMSNorm
from llama4.model.moe import MoE

SHAPE_FIELDS = ("dim", "n_layers", "attn_dim", "head_dim", "dense_dim", "expert_dim", "n_experts")


@dataclass(frozen=True)
class BaseShape:
    """The shape the base hyper-parameters were tuned at (every width-like dimension)."""

    dim: int
    n_layers: int
    attn_dim: int  # n_heads * head_dim: the fan-in of wo
    head_dim: int
    dense_dim: int
    expert_dim: int
    n_experts: int = 0

    def __post_init__(self):
        for name in SHAPE_FIELDS:
            v = getattr(self, name)
            lo = 0 if name == "n_experts" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"metap base.{name} must be an int >= {lo}, got {v!r}")

    @classmethod
    def of(cls, args: ModelArgs) -> "BaseShape":
        return cls(dim=args.dim, n_layers=args.n_layers, attn_dim=args.n_heads * args.hd, head_dim=args.hd,
                   dense_dim=args.dense_dim, expert_dim=args.expert_dim, n_experts=args.n_experts)


@dataclass(frozen=True)
class MetaPConfig:
    """The base: its shape and the per-layer knobs tuned there (defaults: the standard
    parametrization's values, so MetaP at the base shape *is* the standard model)."""

    base: BaseShape
    depth_alpha: float = 1.0  # 1: CompleteP, 0.5: depth-μP
    init_std: float = 0.02  # hidden matrices at the base shape
    embed_std: float = 0.02
    output_std: float = 0.02  # 0: zero-initialised readout
    router_std: float = 0.02
    embed_mult: float = 1.0
    output_mult: float = 1.0
    embed_lr_mult: float = 1.0
    output_lr_mult: float = 1.0
    router_lr_mult: float = 1.0

    def __post_init__(self):
        if isinstance(self.base, dict):
            check_fields(BaseShape, self.base)
            object.__setattr__(self, "base", BaseShape(**self.base))
        if not isinstance(self.base, BaseShape):
            raise ConfigError(f"metap base must be a BaseShape or a dict, got {type(self.base).__name__}")
        if not 0.0 <= self.depth_alpha <= 1.0:
            raise ConfigError(f"metap depth_alpha must be in [0, 1], got {self.depth_alpha!r}")
        for f in dataclasses.fields(self):
            if f.name in ("base", "depth_alpha"):
                continue
            v = getattr(self, f.name)
            lo_ok = v >= 0 if f.name.endswith("_std") else v > 0
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo_ok:
                raise ConfigError(f"metap {f.name} must be a {'non-negative' if f.name.endswith('_std') else 'positive'}"
                                  f" number, got {v!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MetaPConfig":
        check_fields(cls, d)
        if "base" not in d:
            raise ConfigError("metap config needs a 'base' shape: " + ", ".join(SHAPE_FIELDS))
        return cls(**d)


@dataclass(frozen=True)
class Group:
    """One row of the table: how a kind of parameter is initialised and optimised."""

    name: str  # e.g. "attn.wq", "experts.w2", "router", "embedding"
    init_std: float | None  # None: ones (norm gains) or zeros (biases)
    lr_mult: float  # times the base LR
    wd_mult: float  # times the base weight decay (0: not decayed)
    eps_mult: float  # times the base Adam epsilon
    fan_in_mult: float = 1.0


@dataclass
class MetaP:
    """The parametrization of ``target`` given a base: forward multipliers (``model_args``),
    initialisation (``init_weights``) and AdamW groups (``param_groups``)."""

    config: MetaPConfig
    target: ModelArgs
    groups: dict[str, Group] = field(init=False)

    def __post_init__(self):
        b, t, c = self.config.base, self.target, self.config
        if (b.n_experts == 0) != (t.n_experts == 0):
            raise ConfigError(f"metap base has {b.n_experts} experts and the target {t.n_experts}: "
                              "both must be MoE models or both dense")
        self.m_d = t.dim / b.dim
        self.m_L = t.n_layers / b.n_layers
        a = c.depth_alpha
        depth_lr = self.m_L ** (a - 1)
        out_init = 1 / math.sqrt(2 * b.n_layers)  # the base's GPT-2 factor on residual outputs

        def hidden(name, m, extra_init=1.0):
            return Group(name, c.init_std * extra_init / math.sqrt(m), depth_lr / m, m, 1 / (m * self.m_L ** a), m)

        fan = {"dim": self.m_d, "heads": t.n_heads * t.hd / b.attn_dim,
               "dense": t.dense_dim / b.dense_dim, "expert": t.expert_dim / b.expert_dim}
        g = [
            Group("embedding", c.embed_std, c.embed_lr_mult, 0.0, 1.0),
            Group("output", c.output_std, c.output_lr_mult, 1.0, 1.0, self.m_d),
            Group("final_norm", None, 1.0, 0.0, 1.0),
            Group("block_norm", None, depth_lr, 0.0, 1.0),
            Group("bias", None, depth_lr, 0.0, 1.0),
            hidden("attn.wq", fan["dim"]), hidden("attn.wk", fan["dim"]), hidden("attn.wv", fan["dim"]),
            hidden("attn.wo", fan["heads"], out_init),
            hidden("ffn.w1", fan["dim"]), hidden("ffn.w3", fan["dim"]), hidden("ffn.w2", fan["dense"], out_init),
            hidden("shared.w1", fan["dim"]), hidden("shared.w3", fan["dim"]),
            hidden("shared.w2", fan["expert"], out_init),
            hidden("experts.w1", fan["dim"]), hidden("experts.w3", fan["dim"]),
            hidden("experts.w2", fan["expert"], out_init),
            Group("router", c.router_std / self.m_d, c.router_lr_mult / self.m_d, 1.0, 1.0, self.m_d),
        ]
        self.groups = {x.name: x for x in g}

    # ----------------------------------------------------------------------------------------
    def model_args(self) -> ModelArgs:
        """The target's ModelArgs with MetaP's forward multipliers."""
        b, c = self.config.base, self.config
        hd = self.target.hd
        return self.target.replace(
            embed_mult=float(c.embed_mult),
            residual_mult=self.m_L ** -c.depth_alpha,
            logit_mult=c.output_mult / self.m_d,
            softmax_scale=None if hd == b.head_dim else math.sqrt(b.head_dim) / hd)

    def assign(self, model: nn.Module) -> list[tuple[str, nn.Parameter, Group]]:
        """Every trainable parameter of a text ``Transformer`` with its group; an unknown
        parameter is an error, so a new module cannot silently escape the rules."""
        named = dict(model.named_parameters())
        owner = {id(p): n for n, p in named.items()}
        out: list[tuple[str, nn.Parameter, Group]] = []

        def put(p, group):
            if p is not None:
                out.append((owner[id(p)], p, self.groups[group]))

        put(model.tok_embeddings.weight, "embedding")
        put(model.output.weight, "output")
        put(model.norm.weight, "final_norm")
        for block in model.layers:
            put(block.attention_norm.weight, "block_norm")
            put(block.ffn_norm.weight, "block_norm")
            attn = block.attention
            for n in ("wq", "wk", "wv", "wo"):
                lin = getattr(attn, n)
                put(lin.weight, f"attn.{n}")
                put(lin.bias, "bias")
            ffn = block.feed_forward
            if isinstance(ffn, MoE):
                for n in ("w1", "w3", "w2"):
                    put(getattr(ffn.shared_expert, n).weight, f"shared.{n}")
                put(ffn.router.weight, "router")
                for n in ("w1", "w3", "w2"):
                    put(getattr(ffn.experts, n), f"experts.{n}")
            elif isinstance(ffn, FeedForward):
                for n in ("w1", "w3", "w2"):
                    put(getattr(ffn, n).weight, f"ffn.{n}")
        seen = {id(p) for _, p, _ in out}
        missing = [n for n, p in named.items() if id(p) not in seen and p.requires_grad]
        if missing:
            raise ConfigError(f"metap has no rule for parameter(s) {', '.join(missing)}")
        return [x for x in out if x[1].requires_grad]

    def init_stds(self, model: nn.Module) -> dict[str, float | None]:
        """``{parameter name: init std}`` for ``Transformer.init_weights(stds=...)`` (None: the
        norm gains' ones and the biases' zeros)."""
        return {name: g.init_std for name, _, g in self.assign(model)}

    def init_weights(self, model: nn.Module) -> None:
        """Initialise ``model`` by the table (after ``to_empty`` from meta is fine); buffers too."""
        model.init_weights(stds=self.init_stds(model))

    def param_groups(self, model: nn.Module, weight_decay: float, eps: float) -> list[dict]:
        """AdamW groups, one per distinct (lr_mult, wd, eps); each carries ``lr_mult`` for the
        schedule (``llama4.train.optim.set_lr`` multiplies the scheduled base LR by it)."""
        by_key: dict[tuple, dict] = {}
        for _, p, g in self.assign(model):
            key = (g.lr_mult, g.wd_mult, g.eps_mult)
            grp = by_key.setdefault(key, {"params": [], "lr_mult": g.lr_mult, "weight_decay": weight_decay * g.wd_mult,
                                          "eps": eps * g.eps_mult, "name": g.name})
            if g.name not in grp["name"].split("+"):
                grp["name"] += "+" + g.name
            grp["params"].append(p)
        return list(by_key.values())

    def table(self, lr: float | None = None, weight_decay: float | None = None, eps: float | None = None) -> list[dict]:
        """The per-group rules as rows (absolute LR / decay / eps when the base values are given)."""
        rows = []
        for g in self.groups.values():
            if g.name.startswith(("experts.", "router", "shared.")) and not self.target.n_experts:
                continue
            if g.name.startswith("ffn.") and not any(not self.target.is_moe_layer(i)
                                                     for i in range(self.target.n_layers)):
                continue
            row = dataclasses.asdict(g)
            if lr is not None:
                row["lr"] = lr * g.lr_mult
            if weight_decay is not None:
                row["weight_decay"] = weight_decay * g.wd_mult
            if eps is not None:
                row["eps"] = eps * g.eps_mult
            rows.append(row)
        return rows
