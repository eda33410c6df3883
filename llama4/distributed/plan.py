"""Memory per GPU on paper: what a parallel layout costs before anything is allocated.

Everything is counted from the ModelArgs (parameter groups by how each layout splits them) and
from what *our* code keeps for backward, term by term (tests/distributed/test_distributed_plan.py
measures the same quantities on debug-size models and holds the two within a few percent):

* weights / grads / optimizer: FSDP2 keeps fp32 master weights, fp32 gradients (reduce dtype)
  and AdamW's two fp32 moments, each sharded: attention, dense FFN and shared expert over
  ``tp x dp`` ranks, norms / router / embedding / head over ``dp`` (replicated across tp), the
  routed experts over all ``dp_replicate x dp`` data ranks (``ep`` split x ``edp`` FSDP shards).
* FSDP buffers: the gathered compute-dtype weights of the running block and the prefetched one,
  one block's unsharded gradient (compute dtype) plus its fp32 reduce-scatter input, and the
  root group (embedding, head) which stays gathered through forward.
* activations, per token of the micro-batch, per layer (``a`` = compute-dtype bytes; RMSNorm
  and QK-norm work in fp32):
      each RMSNorm          4D + 4 + 2aD          (fp32 input copy, 1/rms, normed, scaled)
      QK-norm (RoPE layers) 4(H+K)hd + 4(H+K)     (fp32 copies of q, k after RoPE)
      attention (SDPA)      a(2H+2K)hd + 4H       (q, k, v, output, logsumexp)
      dense FFN             4aF                   (gate, silu, up, product)
      MoE                   aE + 40k + 3akD + 4akF + 4aF_shared  (router, dispatch, k experts, shared)
                            + 4akD under EP (the rows the all-to-alls keep)
  with H, K, F divided by tp where TP splits them; activation checkpointing keeps aD per layer
  and recomputes one layer at a time (counted twice: its activations and their gradients). The head adds its RMSNorm, the fp32 log-softmax (4V),
  the logits (aV) and, when backward starts, their gradients ((4+a)V): the peak.
* KV cache (serving): 2 K hd bytes per token per layer; chunked (RoPE) layers hold at most one
  chunk, global (NoPE) layers the whole context: the global layers dominate long contexts.

Peak per GPU = weights + optimizer + FSDP buffers + max(activations at the loss, gradients);
with AC the activations peak is the larger of the loss moment and a block's recompute.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from llama4.model import ModelArgs

GiB = 1 << 30


def parse_gpus(text: str) -> tuple[int, float]:
    """"8x80GB" -> (8, 80 GiB in bytes). GPU memory is quoted in GiB-sized "GB" (H100 80GB = 80 GiB)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+(?:\.\d+)?)\s*(G|GB|GiB)?\s*", text)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"--gpus: expected COUNTxMEMORY such as 8x80GB, got {text!r}")
    return int(m.group(1)), float(m.group(2)) * GiB


@dataclass(frozen=True)
class ParamSplit:
    """Parameter counts grouped by how the parallel layouts split them."""

    tp_split: int  # attention q/k/v/o, dense FFN, shared expert: split over tp
    replicated: int  # embedding, head, norms, router: whole on every tp rank
    experts: int  # routed experts: split over ep (and FSDP over edp)
    block_tp_split: int  # the largest block's share of each group (FSDP gathers one block at a time)
    block_replicated: int
    block_experts: int
    root: int  # embedding + head + final norm (FSDP's root group)

    @property
    def total(self) -> int:
        return self.tp_split + self.replicated + self.experts


def split_params(args: ModelArgs) -> ParamSplit:
    D, hd = args.dim, args.hd
    bias = 1 if args.attention_bias else 0
    attn = D * (args.n_heads + 2 * args.n_kv_heads) * hd + args.n_heads * hd * D
    attn += bias * ((args.n_heads + 2 * args.n_kv_heads) * hd + D)
    root = 2 * args.vocab_size * D + D
    tp_split, replicated, experts = 0, root, 0
    blocks = []
    for i in range(args.n_layers):
        if args.is_moe_layer(i):
            b = (attn + 3 * D * args.expert_dim, 2 * D + args.n_experts * D, args.n_experts * 3 * D * args.expert_dim)
        else:
            b = (attn + 3 * D * args.dense_dim, 2 * D, 0)
        tp_split, replicated, experts = tp_split + b[0], replicated + b[1], experts + b[2]
        blocks.append(b)
    return ParamSplit(tp_split, replicated, experts, *max(blocks, key=sum), root=root)


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    ep: int = 1
    tp: int = 1
    dp_replicate: int = 1
    activation_checkpoint: bool = False

    @property
    def gpus(self) -> int:
        return self.dp_replicate * self.dp * self.tp

    @property
    def data(self) -> int:
        return self.dp_replicate * self.dp

    def name(self) -> str:
        s = f"dp{self.dp}"
        if self.dp_replicate > 1:
            s = f"rep{self.dp_replicate}x" + s
        return s + (f" ep{self.ep}" if self.ep > 1 else "") + (f" tp{self.tp}" if self.tp > 1 else "")


def valid(args: ModelArgs, layout: Layout) -> str | None:
    """Why ``layout`` cannot split ``args`` (None when it can)."""
    t, e = layout.tp, layout.ep
    if args.n_heads % t or args.n_kv_heads % t:
        return f"tp {t} does not divide the heads ({args.n_heads} q, {args.n_kv_heads} kv)"
    if args.n_experts and args.expert_dim % t:
        return f"tp {t} does not divide expert_dim"
    if e > 1 and (not args.n_experts or args.n_experts % e):
        return f"ep {e} does not divide n_experts ({args.n_experts})"
    if layout.data % e:
        return f"ep {e} does not divide the data ranks ({layout.data})"
    return None


# --------------------------------------------------------------------------------------------
# activations

def layer_activation_bytes(args: ModelArgs, layer: int, a: int, tp: int = 1, ep: int = 1) -> float:
    """Bytes our code saves for backward per token in ``layer`` (compute dtype of ``a`` bytes)."""
    D, hd, k = args.dim, args.hd, args.top_k
    H, K = args.n_heads // tp, args.n_kv_heads // tp
    norm = 4 * D + 4 + 2 * a * D
    b = 2 * norm
    rope = not args.is_nope_layer(layer)
    if rope:
        b += 4 * hd  # cos/sin of the positions (shared across the batch; an upper bound)
        if args.use_qk_norm:
            b += 4 * (H + K) * hd + 4 * (H + K)
    b += a * (2 * H + 2 * K) * hd + 4 * H
    if args.is_moe_layer(layer):
        b += a * args.n_experts + 40 * k + 3 * a * k * D + 4 * a * k * args.expert_dim
        b += 4 * a * args.expert_dim // tp
        if ep > 1:  # dispatched / combined rows the all-to-all autograd keeps (measured: 4 per routed row)
            b += 4 * a * k * D
    else:
        b += 4 * a * args.dense_dim // tp
    return b


@dataclass
class Activations:
    layers: float  # saved by the blocks (per micro-batch); with AC, only the block inputs
    head_saved: float  # final norm + fp32 log-softmax
    logits: float  # the logits tensor, alive from the end of forward into backward
    backward_temp: float  # gradients of the log-softmax and logits when backward starts
    # AC: a block's activations rebuilt in backward, plus as much again in the gradients flowing
    # through them while that block's backward runs (H100, bf16: measured 1.5x, planned 2x)
    recompute: float = 0.0

    @property
    def at_loss(self) -> float:
        return self.layers + self.head_saved + self.logits + self.backward_temp

    @property
    def peak(self) -> float:
        return max(self.at_loss, self.layers + self.recompute)


def activation_bytes(args: ModelArgs, tokens: int, a: int, tp: int = 1, ac: bool = False, ep: int = 1) -> Activations:
    """Per GPU, for ``tokens`` tokens of micro-batch on the rank (all tp ranks see them all; under
    EP a rank runs the rows routed to its experts, on average as many as its own)."""
    per_layer = [layer_activation_bytes(args, i, a, tp, ep) for i in range(args.n_layers)]
    # AC: block inputs kept; one block's activations live again while it is recomputed
    layers = args.n_layers * a * args.dim if ac else sum(per_layer)
    V, D = args.vocab_size, args.dim
    return Activations(layers=layers * tokens, head_saved=(4 * D + 4 + 2 * a * D + 4 * V) * tokens,
                       logits=a * V * tokens, backward_temp=(4 + a) * V * tokens,
                       recompute=2 * max(per_layer) * tokens if ac else 0.0)


# --------------------------------------------------------------------------------------------
# training memory

@dataclass
class TrainMemory:
    layout: Layout
    params: float  # parameters held per GPU (count)
    weights: float  # bytes: fp32 master shards
    grads: float
    optimizer: float
    fsdp_buffers: float
    activations: Activations
    peak: float
    extras: dict = field(default_factory=dict)

    def fits(self, budget: float) -> bool:
        return self.peak <= budget


def train_memory(args: ModelArgs, layout: Layout, seq: int, micro_batch: int = 1, compute_bytes: int = 2,
                 master_bytes: int = 4, grad_bytes: int = 4, optim_bytes: int = 8, fsdp: bool = True) -> TrainMemory:
    """Per-GPU training memory of ``layout`` for ``micro_batch`` sequences of ``seq`` tokens per
    data rank (AdamW; FSDP2 mixed precision with compute dtype of ``compute_bytes``). ``fsdp=False``:
    a plain single-process model (no gathered copies)."""
    s = split_params(args)
    t, D = layout.tp, layout.data
    params = s.tp_split / (t * layout.dp) + s.replicated / layout.dp + s.experts / D
    block = s.block_tp_split / t + s.block_replicated + s.block_experts / layout.ep
    buffers = 2 * block * compute_bytes + block * (compute_bytes + 4) + s.root * compute_bytes if fsdp else 0.0
    acts = activation_bytes(args, micro_batch * seq, compute_bytes, t, layout.activation_checkpoint, layout.ep)
    weights, grads, optim = params * master_bytes, params * grad_bytes, params * optim_bytes
    peak = weights + optim + buffers + max(acts.peak, grads)
    return TrainMemory(layout, params, weights, grads, optim, buffers, acts, peak)


def candidate_layouts(args: ModelArgs, gpus: int, max_tp: int = 8) -> list[Layout]:
    """FSDP over every data rank, TP within a node (<= 8), EP over a divisor of the data ranks;
    each with and without activation checkpointing."""
    out = []
    for tp in (1, 2, 4, 8):
        if tp > max_tp or gpus % tp:
            continue
        data = gpus // tp
        eps = [e for e in range(1, data + 1) if data % e == 0 and (e == 1 or (args.n_experts and args.n_experts % e == 0))]
        for ep in eps:
            for ac in (False, True):
                lay = Layout(dp=data, ep=ep, tp=tp, activation_checkpoint=ac)
                if valid(args, lay) is None:
                    out.append(lay)
    return out


# --------------------------------------------------------------------------------------------
# serving memory

def kv_cache_bytes(args: ModelArgs, context: int, kv_bytes: int = 2) -> dict:
    """KV bytes of one sequence of ``context`` tokens: chunked layers keep one chunk, global keep all."""
    per_token_layer = 2 * args.n_kv_heads * args.hd * kv_bytes
    glob = sum(1 for i in range(args.n_layers) if args.is_nope_layer(i) or args.attention_chunk_size is None)
    local = args.n_layers - glob
    window = min(context, args.attention_chunk_size or context)
    return {"global": glob * per_token_layer * context, "local": local * per_token_layer * window,
            "naive": args.n_layers * per_token_layer * context}


@dataclass
class ServeMemory:
    gpus: int
    tp: int  # attention / dense / shared expert split (<= n_kv_heads)
    cp: int  # context parallel: the sequence's KV split over cp groups of tp GPUs
    weights: float  # bytes per GPU
    kv: float  # bytes per GPU for one sequence of the context
    workspace: float
    total: float


def serve_memory(args: ModelArgs, gpus: int, context: int, weight_bytes: float = 2, kv_bytes: int = 2,
                 batch: int = 1) -> ServeMemory:
    """One model replica on ``gpus`` GPUs: experts split over all of them (EP = gpus), attention /
    dense / shared expert TP over tp = the largest power of two <= min(gpus, n_kv_heads) dividing
    both, replicated over the cp = gpus / tp groups, which split each sequence's KV (context
    parallel). ``batch`` sequences of ``context`` tokens."""
    s = split_params(args)
    tp = 1
    while tp * 2 <= min(gpus, args.n_kv_heads) and gpus % (tp * 2) == 0 and args.n_heads % (tp * 2) == 0:
        tp *= 2
    cp = gpus // tp
    # E experts over the GPUs: the fullest GPU holds ceil(E / gpus) of them
    experts = s.experts * math.ceil(args.n_experts / gpus) / args.n_experts if args.n_experts else 0
    weights = (s.tp_split / tp + s.replicated + experts) * weight_bytes
    kv = kv_cache_bytes(args, context, kv_bytes)
    kv_gpu = batch * (kv["global"] / (tp * cp) + kv["local"] / tp)
    # prefill in 8192-token chunks: one chunk's hidden states, logits and attention workspace
    workspace = 8192 * (args.dim * 2 * 8 + args.vocab_size * 4) / tp
    return ServeMemory(gpus, tp, cp, weights, kv_gpu, workspace, weights + kv_gpu + workspace)


def min_gpus_for_context(args: ModelArgs, context: int, gpu_bytes: float, reserve: float,
                         weight_bytes: float = 2, kv_bytes: int = 2, limit: int = 4096) -> ServeMemory | None:
    """The smallest replica (1, 2, 4 GPUs or a multiple of 8) that holds one sequence of ``context`` tokens."""
    for g in [1, 2, 4, *range(8, limit + 1, 8)]:
        m = serve_memory(args, g, context, weight_bytes, kv_bytes)
        if m.total <= gpu_bytes - reserve:
            return m
    return None


# --------------------------------------------------------------------------------------------
# report

def _gib(x: float) -> str:
    return f"{x / GiB:7.1f}"


def report(args: ModelArgs, name: str, gpus: int, gpu_bytes: float, seq: int, micro_batch: int = 1,
           layouts: list[Layout] | None = None, context: int | None = None, reserve: float = 6 * GiB,
           compute_bytes: int = 2, top: int = 12, serve_weight_bytes: float = 2) -> str:
    s = split_params(args)
    budget = gpu_bytes - reserve
    lines = [f"{name}: {s.total / 1e9:.2f}B parameters ({s.experts / 1e9:.2f}B in routed experts); "
             f"{gpus} GPUs x {gpu_bytes / GiB:.0f} GiB, budget {budget / GiB:.0f} GiB each after a "
             f"{reserve / GiB:.0f} GiB reserve (CUDA context, NCCL, fragmentation)",
             f"training: AdamW, fp32 master/grads/moments, {8 * compute_bytes}-bit compute, "
             f"micro-batch {micro_batch} x {seq} tokens per data rank; GiB per GPU:",
             f"  {'layout':<18} {'AC':>3} {'weights':>7} {'grads':>7} {'optim':>7} {'fsdp':>7} "
             f"{'acts':>7} {'logits':>7} {'peak':>7}  fits"]
    plans = [train_memory(args, lay, seq, micro_batch, compute_bytes) for lay in
             (layouts or candidate_layouts(args, gpus))]
    if not layouts:  # the cheapest first, a bounded list
        plans.sort(key=lambda p: (not p.fits(budget), p.layout.activation_checkpoint, p.peak))
        plans = plans[:top]
    for p in plans:
        a = p.activations
        lines.append(f"  {p.layout.name():<18} {'on' if p.layout.activation_checkpoint else 'off':>3} "
                     f"{_gib(p.weights)} {_gib(p.grads)} {_gib(p.optimizer)} {_gib(p.fsdp_buffers)} "
                     f"{_gib(a.layers + a.recompute)} {_gib(a.head_saved + a.logits + a.backward_temp)} {_gib(p.peak)}  "
                     f"{'yes' if p.fits(budget) else 'no'}")
    fitting = [p for p in plans if p.fits(budget)]
    lines.append(f"  -> {len(fitting)} of the {len(plans)} layouts shown fit" +
                 (f"; e.g. {fitting[0].layout.name()} (AC {'on' if fitting[0].layout.activation_checkpoint else 'off'})"
                  if fitting else ""))
    least = min_gpus_to_train(args, gpu_bytes, reserve, seq, micro_batch, compute_bytes)
    if least:
        lines.append(f"  fewest GPUs of this size that train it (multiples of 8): {least.layout.gpus} with "
                     f"{least.layout.name()}, AC {'on' if least.layout.activation_checkpoint else 'off'}, "
                     f"peak {_gib(least.peak).strip()} GiB")
    wname = {2: "bf16", 1: "fp8", 0.5: "int4"}.get(serve_weight_bytes, f"{serve_weight_bytes} B")
    m = serve_memory(args, gpus, 0, serve_weight_bytes)
    free = budget - m.weights - m.workspace
    kv_tok = kv_cache_bytes(args, 1 << 20)["global"] / (1 << 20) / (m.tp * m.cp)
    lines.append(f"serving on these {gpus} GPUs ({wname} weights, TP {m.tp} x CP {m.cp}, EP {gpus}): weights "
                 f"{_gib(m.weights).strip()} GiB per GPU" +
                 (f", room for ~{free / kv_tok / 1e6:.1f}M tokens of bf16 KV (global layers; sequences together)"
                  if free > 0 else ": the weights alone do not fit"))
    if context:
        kv = kv_cache_bytes(args, context)
        lines.append(f"serving, {wname} weights, bf16 KV, one sequence of {context:,} tokens: KV "
                     f"{(kv['global'] + kv['local']) / GiB:.1f} GiB (global layers {kv['global'] / GiB:.1f}, "
                     f"chunked layers {kv['local'] / GiB:.2f}; a cache of every layer would be "
                     f"{kv['naive'] / GiB:.1f})")
        m = serve_memory(args, gpus, context, serve_weight_bytes)
        lines.append(f"  on these {gpus} GPUs (TP {m.tp} x CP {m.cp}, EP {gpus}): weights {_gib(m.weights).strip()} "
                     f"+ KV {_gib(m.kv).strip()} + workspace {_gib(m.workspace).strip()} = "
                     f"{_gib(m.total).strip()} GiB per GPU: {'fits' if m.total <= budget else 'does not fit'}")
        best = min_gpus_for_context(args, context, gpu_bytes, reserve, serve_weight_bytes)
        if best:
            lines.append(f"  fewest GPUs of this size that hold it: {best.gpus} (TP {best.tp} x CP {best.cp}, "
                         f"{_gib(best.total).strip()} GiB each)")
    return "\n".join(lines)


def min_gpus_to_train(args: ModelArgs, gpu_bytes: float, reserve: float, seq: int, micro_batch: int = 1,
                      compute_bytes: int = 2, limit: int = 4096) -> TrainMemory | None:
    """The smallest multiple of 8 GPUs with a layout that trains (lowest peak at that count)."""
    for g in range(8, limit + 1, 8):
        plans = [train_memory(args, lay, seq, micro_batch, compute_bytes) for lay in candidate_layouts(args, g)]
        fit = [p for p in plans if p.fits(gpu_bytes - reserve)]
        if fit:
            return min(fit, key=lambda p: (p.layout.activation_checkpoint, p.peak))
    return None


def parse_tokens(text: str) -> int:
    """"8192", "128k", "1M", "10M" -> tokens (k = 1024, M = 1024^2, as context lengths are quoted)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise ValueError(f"expected a token count such as 8192, 128k or 10M, got {text!r}")
    mult = {"": 1, "k": 1024, "m": 1 << 20}[m.group(2).lower()]
    return int(math.floor(float(m.group(1)) * mult))
