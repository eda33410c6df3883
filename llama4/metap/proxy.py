"""Proxy runs: small byte-level Llama 4 models trained for a fixed token budget, the unit of the
MetaP sweeps and of the coordinate check.

The model family is one shape rule (:func:`proxy_args`) applied to a width, a depth, an expert
count and an expert-width factor: head_dim fixed at 16 with heads growing with width (GQA 2:1),
FFN widths proportional to width, RoPE + chunked attention alternating with NoPE + global
attention, MoE in every layer (top-1 sigmoid router + shared expert). Bytes (vocabulary 256) keep
the width-scaling in the hidden matrices, not in a vocabulary-sized embedding.

Data: UTF-8 bytes of the embedded corpus's 14 main languages, train split for training (random
windows drawn from the run's seed) and a fixed set of windows from the validation split, the same
for every run, so losses of different runs are paired comparisons.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch

from llama4.data.corpus import MAIN_LANGUAGES, iter_corpus
from llama4.metap.param import BaseShape, MetaP, MetaPConfig
from llama4.model import ModelArgs, Transformer
from llama4.train import losses
from llama4.train.optim import Schedule, set_lr

HEAD_DIM = 16
VOCAB = 256


def proxy_args(width: int, depth: int = 2, n_experts: int = 4, expert_mult: float = 2.0,
               chunk: int = 32) -> ModelArgs:
    """The proxy family's ModelArgs at one shape."""
    if width % (2 * HEAD_DIM):
        raise ValueError(f"proxy width must be a multiple of {2 * HEAD_DIM}, got {width}")
    heads = width // HEAD_DIM
    return ModelArgs(vocab_size=VOCAB, dim=width, n_layers=depth, n_heads=heads, n_kv_heads=heads // 2,
                     head_dim=HEAD_DIM, n_experts=n_experts, top_k=1, expert_dim=int(round(expert_mult * width)),
                     dense_dim=4 * width, interleave_moe_layer_step=1, nope_layer_interval=2,
                     attention_chunk_size=chunk, floor_scale=8192.0, rope_theta=10000.0, max_seq_len=4096)


@dataclass(frozen=True)
class ProxyRun:
    """One training run of the sweep; ``base_*`` is MetaP's base shape (ignored under standard,
    whose base is the run's own shape)."""

    width: int
    lr: float
    param: str = "metap"  # "metap" | "standard"
    depth: int = 2
    n_experts: int = 4
    expert_mult: float = 2.0
    steps: int = 400
    batch: int = 16
    seq_len: int = 64
    seed: int = 0
    base_width: int = 32
    base_depth: int = 2
    base_experts: int = 4
    base_expert_mult: float = 2.0
    init_std: float = 0.02  # standard: every matrix; MetaP: hidden matrices at the base shape
    output_mult: float = 1.0  # MetaP base knobs (MetaPConfig); 1 = the standard model at the base
    embed_lr_mult: float = 1.0
    output_lr_mult: float = 1.0
    warmup_frac: float = 0.1
    min_lr_ratio: float = 0.1
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    family: str = ""  # which sweep it belongs to (for the report)

    @classmethod
    def from_row(cls, row: dict) -> "ProxyRun":
        """The run a result row (``ProxyResult.row``) came from; fields it lacks keep their defaults."""
        return cls(**{k: row[k] for k in cls.__dataclass_fields__ if k in row})

    def args(self) -> ModelArgs:
        return proxy_args(self.width, self.depth, self.n_experts, self.expert_mult)

    def base_args(self) -> ModelArgs:
        return proxy_args(self.base_width, self.base_depth, self.base_experts, self.base_expert_mult)

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.seq_len

    def cost(self) -> float:
        """Relative compute (active params x tokens), for scheduling the largest runs first."""
        a = self.args()
        per_token = a.n_layers * (4 * a.dim * a.dim + 3 * a.dim * a.expert_dim * 2) + 2 * a.dim * VOCAB
        return per_token * self.tokens


def metap_plan(run: ProxyRun) -> MetaP:
    """MetaP from the run's base, or for ``standard`` from the run's own shape: the same knobs
    (init, output multiplier, embedding LR) with no width/depth scaling. With the default knobs
    that is exactly ``Transformer.init_weights`` and one LR (tests/test_metap.py)."""
    if run.param not in ("metap", "standard"):
        raise ValueError(f"unknown parametrization {run.param!r}; use 'metap' or 'standard'")
    base = run.base_args() if run.param == "metap" else run.args()
    cfg = MetaPConfig(base=BaseShape.of(base), init_std=run.init_std, output_mult=run.output_mult,
                      embed_lr_mult=run.embed_lr_mult, output_lr_mult=run.output_lr_mult)
    return MetaP(cfg, run.args())


def build(run: ProxyRun) -> tuple[Transformer, MetaP]:
    """The run's model, initialised from its seed under its parametrization."""
    plan = metap_plan(run)
    model = Transformer(plan.model_args())
    torch.manual_seed(run.seed)
    plan.init_weights(model)
    return model, plan


def optimizer_for(model: Transformer, plan: MetaP, weight_decay: float = 0.0, eps: float = 1e-8):
    return torch.optim.AdamW(plan.param_groups(model, weight_decay, eps), lr=1.0, betas=(0.9, 0.95), eps=eps)


# --------------------------------------------------------------------------------------------
# data

@lru_cache(maxsize=2)
def corpus_bytes(split: str) -> np.ndarray:
    """UTF-8 bytes of the main languages' documents of one split, documents joined by newlines."""
    text = "\n".join(d.text for d in iter_corpus(split, langs=MAIN_LANGUAGES))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def train_batches(seed: int, batch: int, seq_len: int):
    """Endless (inputs, targets) of random train windows, reproducible from ``seed``."""
    data = torch.from_numpy(corpus_bytes("train").astype(np.int64))
    g = torch.Generator().manual_seed(10_000 + seed)
    span = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, len(data) - seq_len - 1, (batch,), generator=g)
        w = data[starts[:, None] + span]
        yield w[:, :-1], w[:, 1:]


@lru_cache(maxsize=4)
def val_windows(n_batches: int = 32, batch: int = 16, seq_len: int = 64) -> torch.Tensor:
    """Fixed validation windows (n_batches * batch, seq_len + 1), evenly spaced over the split."""
    data = torch.from_numpy(corpus_bytes("val").astype(np.int64))
    n = n_batches * batch
    starts = torch.linspace(0, len(data) - seq_len - 2, n).long()
    return data[starts[:, None] + torch.arange(seq_len + 1)]


@torch.no_grad()
def evaluate(model: Transformer, windows: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        total += losses.cross_entropy(model(w[:, :-1]), w[:, 1:]).item() * len(w)
    model.train()
    return total / len(windows)


def step_loss(run: ProxyRun, model: Transformer, moe: list, x: torch.Tensor, y: torch.Tensor):
    """-> (training loss, cross-entropy, expert loads or None) of one batch: cross-entropy plus
    the run's balance and z-losses (router stats must be recorded)."""
    logits = model(x)
    ce = losses.cross_entropy(logits, y)
    if not moe:
        return ce, ce, None
    bal, z, loads = losses.router_losses(moe)
    return ce + run.aux_loss_coef * bal + run.z_loss_coef * z, ce, loads


# --------------------------------------------------------------------------------------------
# one run

@dataclass
class ProxyResult:
    run: ProxyRun
    val_loss: float  # nan when the run diverged
    train_loss: float  # mean of the last 10% of steps
    imbalance: float  # max/mean expert load over the last 10% of steps, worst layer
    seconds: float
    diverged: bool = False

    def row(self) -> dict:
        d = asdict(self.run)
        d.update(tokens=self.run.tokens, val_loss=self.val_loss, train_loss=self.train_loss,
                 imbalance=self.imbalance, seconds=round(self.seconds, 2), diverged=self.diverged)
        return d


def train_proxy(run: ProxyRun) -> ProxyResult:
    """Train one proxy (AdamW, warmup then cosine to ``min_lr_ratio``, no clipping: clipping
    couples the groups with a width-dependent threshold) and evaluate it."""
    torch.set_flush_denormal(True)  # small MetaP weights and Adam states go denormal: 10-20x slower
    t0 = time.perf_counter()
    model, plan = build(run)
    opt = optimizer_for(model, plan)
    schedule = Schedule("cosine", run.lr, run.steps, max(1, int(run.warmup_frac * run.steps)), run.min_lr_ratio)
    moe = losses.moe_layers(model)
    losses.record_router_stats(model)
    data = train_batches(run.seed, run.batch, run.seq_len)
    tail = max(1, run.steps // 10)
    ce_tail, loads_tail = [], None
    for step in range(run.steps):
        set_lr(opt, schedule(step))
        loss, ce, loads = step_loss(run, model, moe, *next(data))
        if not torch.isfinite(loss):
            return ProxyResult(run, math.nan, math.nan, math.nan, time.perf_counter() - t0, diverged=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= run.steps - tail:
            ce_tail.append(ce.item())
            if loads is not None:
                loads_tail = loads if loads_tail is None else loads_tail + loads
    losses.record_router_stats(model, False)
    val = evaluate(model, val_windows())
    imb = float(losses.load_imbalance(loads_tail).max()) if loads_tail is not None else 1.0
    diverged = not math.isfinite(val)
    return ProxyResult(run, val if not diverged else math.nan, sum(ce_tail) / len(ce_tail), imb,
                       time.perf_counter() - t0, diverged)
