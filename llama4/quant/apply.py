"""Which weights are quantized, swapping the quantized modules into a model, and picking each
layer's compute path (the model itself knows nothing of this, as with llama4.distributed).

Quantized: attention wq/wk/wv/wo, the dense FFN, the shared expert, the routed experts and, by
default, the output head. Kept in float: the token embedding (a row lookup: nothing to speed up),
the norms and the MoE router (tiny, and its top-k decides which expert runs).
"""

from __future__ import annotations

import re
import sys
from collections import Counter

import torch
from torch import nn

from llama4.model.moe import GroupedExperts
from llama4.quant import fused, kernels
from llama4.quant.formats import dequantize, quantize
from llama4.quant.layers import QuantExperts, QuantLinear

# module names (text decoder) whose weights are quantized
_LINEAR = re.compile(r"^layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123]|feed_forward\.shared_expert\.w[123])$")
_EXPERTS = re.compile(r"^layers\.\d+\.feed_forward\.experts$")
HEAD = "output"


def target_modules(model: nn.Module, head: bool = True) -> list[str]:
    """Names of the modules ``quantize_modules`` replaces, in model order."""
    out = []
    for name, m in model.named_modules():
        if (_LINEAR.match(name) or (head and name == HEAD)) and isinstance(m, nn.Linear):
            out.append(name)
        elif _EXPERTS.match(name) and isinstance(m, GroupedExperts):
            out.append(name)
    return out


def target_keys(model: nn.Module, head: bool = True) -> set[str]:
    """The float state-dict keys of the weights that get quantized (biases stay float)."""
    keys = set()
    for name in target_modules(model, head):
        m = model.get_submodule(name)
        if isinstance(m, nn.Linear):
            keys.add(f"{name}.weight")
        else:
            keys.update(f"{name}.{w}" for w in ("w1", "w2", "w3"))
    return keys


def module_of(key: str) -> str:
    """Float key -> its module name ("...wq.weight" -> "...wq", "...experts.w1" -> "...experts")."""
    return key.rsplit(".", 1)[0]


def quantize_modules(model: nn.Module, modules: list[str], scheme: str, group_size: int | None) -> None:
    """Replace each named module by its quantized stand-in (empty buffers, on the module's device;
    on ``meta`` for a skeleton that a checkpoint then fills)."""
    for name in modules:
        m = model.get_submodule(name)
        device = next(m.parameters()).device
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.device(device):
            if isinstance(m, nn.Linear):
                q = QuantLinear(m.in_features, m.out_features, scheme, group_size, bias=m.bias is not None)
            else:
                e, d, f = m.w1.shape
                q = QuantExperts(d, f, e, scheme, group_size)
        setattr(parent, child, q)


def _expert_choice(m: QuantExperts) -> kernels.Choice:
    """Dequantizing the one selected expert per token (memory kept small) vs gathering it from an
    fp32 copy, timed on MoE's decode gather at one token."""
    if m.scheme not in ("int8", "int4", "bf16", "fp16"):
        return kernels.Choice("fp32", 1.0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    f32 = m.dequantized("w1")
    stored = m.stored("w1")
    with torch.inference_mode():
        base = kernels._time(lambda: f32[ids], 200)
        t = kernels._time(lambda: dequantize({p: v[ids] for p, v in stored.items()}, m.scheme, -2), 200)
    speed = base / t
    return kernels.Choice("dequant", speed) if speed >= kernels.MARGIN else kernels.Choice("fp32", 1.0)


def prepare(model: nn.Module, path: str = "auto", quiet: bool = False) -> dict[str, str]:
    """Pick and build every quantized module's compute path. ``path="auto"`` times the candidates
    on this machine (once per distinct shape) and keeps fp32 where no kernel is faster; any other
    value forces that path (linear: "fp32", "dequant" or a kernel of kernels.py; experts: a kernel
    name means "fp32").
    Prints one line to stderr saying what was chosen (unless ``quiet``). -> {module: path}."""
    chosen, cache = {}, {}
    device = None
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            device = m.weight.device
            if path == "auto":
                key = ("linear", m.scheme, m.group_size, m.out_features, m.in_features)
                if key not in cache:
                    cache[key] = kernels.choose(m.scheme, m.stored(), m.group_size, m.dequantized(),
                                                kernels.available(m.scheme, m.weight.device))
                c = cache[key]
            else:
                c = kernels.Choice(path, 0.0)
            m.set_path(c.path, c.speedup, c.dequant_from)
            chosen[name] = c.path
        elif isinstance(m, QuantExperts):
            if path == "auto":
                key = ("experts", m.scheme, m.group_size, m.dims["w1"])
                if key not in cache:
                    cache[key] = _expert_choice(m) if m.w1_q.device.type == "cpu" else kernels.Choice("fp32", 1.0)
                c = cache[key]
            else:
                c = kernels.Choice(path if path in ("fp32", "dequant") else "fp32", 0.0)
            m.set_path(c.path, c.speedup, fp32_for_several=path == "auto" and c.path == "dequant")
            chosen[name] = c.path
    if chosen and not quiet:
        print(summary(model, chosen, device), file=sys.stderr)
    return chosen


def summary(model: nn.Module, chosen: dict[str, str], device=None) -> str:
    scheme = next(m.scheme for m in model.modules() if isinstance(m, (QuantLinear, QuantExperts)))
    counts = Counter(chosen.values())
    speed = {}
    for name, p in chosen.items():
        s = model.get_submodule(name).speedup
        if p != "fp32" and s:
            lo, hi = speed.get(p, (s, s))
            speed[p] = (min(lo, s), max(hi, s))
    rows = {}
    for name, p in chosen.items():
        d = getattr(model.get_submodule(name), "dequant_from", None)
        if d:
            rows[p] = min(rows.get(p, d), d)
    bits = []
    for p, n in counts.most_common():
        extra = f" ({speed[p][0]:.1f}-{speed[p][1]:.1f}x fp32 at 1 row" if p in speed else ""
        if p in rows:
            extra += f"; dequantized per call from {rows[p]} rows on"
        extra += ")" if extra else ""
        bits.append(f"{n} x {p}{extra}")
    note = ""
    if counts.get("fp32"):
        note = "; fp32 = dequantized at load, where no kernel beat fp32 at that size (memory saving on disk only)"
    return f"llama4 quant: {scheme} weights on {device or 'cpu'}, {torch.get_num_threads()} thread(s): " \
           + ", ".join(bits) + note


def prepare_compiled(model: nn.Module, quiet: bool = False) -> dict[str, str]:
    """Before a compiled decode (llama4.infer.step): per distinct layer shape, time the fused
    dequantizing reduction (fused.py) against the fp32 reduction, both compiled by the decode
    backend, at one row; where the fused one is ``fused.MARGIN`` faster, compiled one-row calls
    take it (the weight is read in its compact width), else they keep the layer's path (fp32:
    exactly the float model's compiled arithmetic). Calls of more rows (batch > 1, prefill)
    always keep it. Routed experts: their per-expert matrices are timed the same way, and the
    fp32 stacks are re-laid out [out, in] as the float model's are. Prints one line (unless
    ``quiet``). -> {module: "fused" | its path}."""
    chosen, cache = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            on_cpu = m.weight.device.type == "cpu"
            key = ("linear", m.scheme, m.group_size, m.out_features, m.in_features)
            if key not in cache:
                cache[key] = fused.time_linear(m.scheme, m.stored(), m.group_size, m.dequantized(), fused.ROWS) \
                    if on_cpu else (1.0, float("inf"))
            t32, tf = cache[key]
            win = t32 / tf >= fused.MARGIN
            m.set_fused(fused.ROWS if win else 0, t32 / tf)
            chosen[name] = "fused" if win else m.path
        elif isinstance(m, QuantExperts):
            m.relayout_for_decode()
            on_cpu = m.w1_q.device.type == "cpu"
            key = ("experts", m.scheme, m.group_size, m.dims["w1"])
            if key not in cache:
                t32 = tf = 0.0
                for w, mult in (("w1", 2), ("w2", 1)):  # w3 is w1's shape
                    deq = m.dequantized(w)[0].t().contiguous()  # expert 0 as an (out, in) weight
                    st = quantize(deq, m.scheme, m.group_size)  # the same bytes in Linear layout
                    a, b = fused.time_linear(m.scheme, st, m.group_size, deq, fused.ROWS) if on_cpu else (1.0, float("inf"))
                    t32, tf = t32 + mult * a, tf + mult * b
                cache[key] = (t32, tf)
            t32, tf = cache[key]
            win = t32 / tf >= fused.MARGIN
            m.set_fused(win, t32 / tf)
            chosen[name] = "fused" if win else m.path
    if chosen and not quiet:
        counts = Counter(chosen.values())
        sp = [s for n, p in chosen.items() if p == "fused"
              for s in [model.get_submodule(n).fused_speedup]]
        rng = f" ({min(sp):.1f}-{max(sp):.1f}x the compiled fp32 reduction at 1 row)" if sp else ""
        print(f"llama4 quant: compiled decode, {torch.get_num_threads()} thread(s): "
              + ", ".join(f"{n} x {p}" + (rng if p == "fused" else "") for p, n in counts.most_common())
              + "; batch > 1 and prefill keep the load-time paths", file=sys.stderr)
    return chosen


def dequantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The float state dict of a quantized model: its float parameters as they are, every quantized
    weight dequantized to float32 under the float model's name (``llama4 export gguf`` writes it;
    the tests compare a quantized model with the float model that holds it)."""
    state = {k: v.detach().float() for k, v in model.named_parameters()}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            state[f"{name}.weight"] = m.dequantized()
        elif isinstance(m, QuantExperts):
            for w in QuantExperts.NAMES:
                state[f"{name}.{w}"] = m.dequantized(w)
    return state
