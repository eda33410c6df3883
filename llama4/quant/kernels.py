"""Compute paths for a quantized weight, and the measurement that picks one per machine.

A path is a way to compute ``x @ W.T`` (Linear) from the stored form. The candidates:

    fp32         dequantize once when the model is loaded, then the fp32 matmul (always as fast
                 as fp32, since it is fp32; the memory saving stays on disk only)
    int8mm       torch.ops.aten._weight_int8pack_mm, fp32 activations
    int8mm-bf16  the same with bf16 activations (the kernel's vectorized AVX-512 path)
    int4mm       torch.ops.aten._weight_int4pack_mm_for_cpu, fp32 activations
    int4mm-bf16  the same with bf16 activations
    linear16     F.linear in the weight's 16-bit dtype (bf16 / fp16 weights)
    dequant      dequantize per call, then the fp32 matmul (keeps the memory saving; slow, the
                 state before a path is chosen, and what a kernel path does for many rows)

Accumulation is fp32 in every kernel; "-bf16" paths round the activations to bf16 on the way in
and the output comes back as fp32. ``choose`` times each candidate against the fp32 matmul on the
layer's own shape at one row (decode) and keeps a kernel only when it is clearly faster
(``MARGIN``); otherwise fp32: a quantized model never decodes slower than the fp32 one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llama4.quant.formats import FLOAT16, unpack_int4

MARGIN = 1.10  # a kernel must beat fp32 by this factor to be chosen (timings on a shared machine are noisy)

CANDIDATES = {
    "int8": ("int8mm-bf16", "int8mm"),
    "int4": ("int4mm-bf16", "int4mm"),
    "bf16": ("linear16",),
    "fp16": ("linear16",),
}


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def kernel_form(path: str, q: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None,
                group_size: int | None) -> dict[str, torch.Tensor]:
    """The tensors ``path`` computes with, made from the stored (N, K) form, always in fresh
    memory: tensors read from a safetensors file can start at any byte, and the int8 kernel's
    vectorized path crashes the process (SIGSEGV) on such a weight at 16 rows and more."""
    if path.startswith("int8mm"):
        dt = torch.bfloat16 if path.endswith("bf16") else torch.float32
        return {"w": q.clone(memory_format=torch.contiguous_format),
                "s": scale.to(dt).clone(memory_format=torch.contiguous_format)}
    if path.startswith("int4mm"):
        dt = torch.bfloat16 if path.endswith("bf16") else torch.float32
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(q).to(torch.int32).contiguous(), 1)
        sz = torch.stack((scale.t(), zero.t()), dim=-1).to(dt).contiguous()  # (K/G, N, 2)
        return {"w": w, "sz": sz}
    if path == "linear16":
        return {"w": q.clone(memory_format=torch.contiguous_format)}
    raise ValueError(f"unknown quantized compute path {path!r}")


def run(path: str, x: torch.Tensor, k: dict[str, torch.Tensor], group_size: int | None) -> torch.Tensor:
    """x: (..., K) float -> (..., N) in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if path.startswith("int8mm"):
        xin = x2.to(k["s"].dtype)
        y = torch.ops.aten._weight_int8pack_mm(xin, k["w"], k["s"])
    elif path.startswith("int4mm"):
        xin = x2.to(k["sz"].dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xin, k["w"], group_size, k["sz"])
    elif path == "linear16":
        y = F.linear(x2.to(k["w"].dtype), k["w"])
    else:
        raise ValueError(f"unknown quantized compute path {path!r}")
    return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])


def available(scheme: str, device: torch.device) -> tuple[str, ...]:
    """The kernel candidates this torch build offers for ``scheme`` on ``device``."""
    if device.type != "cpu":
        return ()  # untested off the CPU: the fp32 path is used there
    out = []
    for p in CANDIDATES.get(scheme, ()):
        if p.startswith("int8mm") and not _has("_weight_int8pack_mm"):
            continue
        if p.startswith("int4mm") and not (_has("_weight_int4pack_mm_for_cpu")
                                           and _has("_convert_weight_to_int4pack_for_cpu")):
            continue
        out.append(p)
    return tuple(out)


def _time(fn, reps: int, n_rounds: int = 5) -> float:
    """Median of ``n_rounds`` rounds of ``reps`` calls, seconds per call."""
    fn()
    rounds = []
    for _ in range(n_rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - t) / reps)
    return sorted(rounds)[n_rounds // 2]


@dataclass(frozen=True)
class Choice:
    path: str
    speedup: float  # fp32 time / chosen path time at one row (1.0 for fp32)
    # from this many rows on, dequantizing the weight per call and the fp32 matmul beat the kernel
    # (the kernels are made for few rows: prefill and scoring take this route); None: never
    dequant_from: int | None = None


def dequant_crossover(path: str, stored: dict, group_size: int | None, scheme: str, kdim: int) -> int | None:
    """The smallest row count in (16, 64, 256) where dequantize-then-fp32 beats ``path``."""
    from llama4.quant.formats import dequantize

    k = kernel_form(path, stored["q"], stored.get("scale"), stored.get("zero"), group_size)
    for rows in ROW_STEPS:
        x = torch.randn(rows, kdim)
        t_kernel = _time(lambda: run(path, x, k, group_size), 1, 3)
        t_deq = _time(lambda: F.linear(x, dequantize(stored, scheme)), 1, 3)
        if t_deq < t_kernel:
            return rows
    return None


ROW_STEPS = (16, 64, 256)


def choose(scheme: str, stored: dict[str, torch.Tensor], group_size: int | None, dequantized: torch.Tensor,
           candidates: tuple[str, ...], rows: int = 1) -> Choice:
    """Time fp32 ``F.linear`` with ``dequantized`` (N, K) against every candidate at ``rows`` rows
    and return the fastest that beats fp32 by ``MARGIN``, else fp32."""
    if not candidates:
        return Choice("fp32", 1.0)
    n, kdim = dequantized.shape
    reps = max(5, min(200, int(2e7 // max(1, n * kdim))))
    x = torch.randn(rows, kdim, dtype=torch.float32, device=dequantized.device)
    with torch.inference_mode():
        base = _time(lambda: F.linear(x, dequantized), reps)
        best = Choice("fp32", 1.0)
        for p in candidates:
            try:
                k = kernel_form(p, stored["q"], stored.get("scale"), stored.get("zero"), group_size)
                t = _time(lambda: run(p, x, k, group_size), reps)
            except RuntimeError:  # a kernel that refuses this shape on this build: not a candidate
                continue
            if base / t >= MARGIN and base / t > best.speedup:
                best = Choice(p, base / t)
        if best.path != "fp32":
            best = Choice(best.path, best.speedup, dequant_crossover(best.path, stored, group_size, scheme, kdim))
    return best


def float16_dtype(scheme: str) -> torch.dtype | None:
    return FLOAT16.get(scheme)
