"""Compiled decode over the compact weights: dequantizing reductions that torch.compile fuses.

A decode step multiplies a few rows by each weight, so its matmuls are matrix-vector products that
only have to stream the weight once. Under ``torch.compile`` (llama4.infer.step's decode backend)
the expression ``(x[:, None, :] * dequant(W)[None]).sum(-1)`` becomes ONE inductor reduction that
reads W in its stored width (16 or 8 bits), converts in registers and accumulates in fp32: the
weights stay compact in memory and the step reads 2-4x fewer bytes than over fp32 weights. Eager,
the same expression would materialize the dequantized weight; it is used only while compiling.

Forms (fresh, contiguous memory, reduction axis innermost):

    bf16 / fp16   w (N, K) 16-bit                         y = sum_k x_k * float(w_nk)
    int8          q (N, K) int8, s (N,)                   y = s_n * sum_k x_k * q_nk
    int4          q (N, K) int8 holding q - 8 (unpacked), y = sum_g sum_i x * (q * s_ng + z_ng)
                  s, z (N, K/G)
                  (the packed nibbles did not vectorize: unpacking to one byte each measured
                  1.4-1.9x fp32 where reductions over packed bytes measured 0.2-0.6x, so int4
                  computes from 8-bit memory, twice its file size and a quarter of fp32)

Routed experts (E, in, out) get the same forms laid out (E, out, in), and ``gather_experts``
returns the selected experts' dequantized weights as (…, in, out) views whose ``in`` is
contiguous: the decode backend lowers the MoE gather path's einsum to a reduction over it, which
inductor fuses with the index and the dequantization, so only the chosen experts' bytes are read.
"""

from __future__ import annotations

import itertools
import math

import torch

from llama4.quant.formats import FLOAT16, unpack_int4


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def linear_form(scheme: str, stored: dict, group_size: int | None) -> dict[str, torch.Tensor]:
    """Stored (N, K) form -> the fused reduction's tensors."""
    q = stored["q"]
    if scheme in FLOAT16:
        return {"w": _fresh(q)}
    if scheme == "int8":
        return {"q": _fresh(q), "s": _fresh(stored["scale"].float())}
    if scheme == "int4":
        u = (unpack_int4(q).to(torch.int16) - 8).to(torch.int8).contiguous()  # (N, K)
        return {"q": u, "s": _fresh(stored["scale"].float()), "z": _fresh(stored["zero"].float())}
    raise ValueError(f"no fused form for scheme {scheme!r}")


def linear(scheme: str, x: torch.Tensor, k: dict[str, torch.Tensor], group_size: int | None) -> torch.Tensor:
    """x (R, K) -> (R, N) float32, accumulation in fp32."""
    x = x.float()
    if scheme in FLOAT16:
        return (x[:, None, :] * k["w"][None].float()).sum(-1)
    if scheme == "int8":
        return (x[:, None, :] * k["q"][None].float()).sum(-1) * k["s"]
    if scheme == "int4":
        n, kdim = k["q"].shape
        w = k["q"].view(n, kdim // group_size, group_size).float() * k["s"][..., None] + k["z"][..., None]
        return (x.view(-1, 1, kdim // group_size, group_size) * w[None]).sum((-1, -2))
    raise ValueError(f"no fused form for scheme {scheme!r}")


def experts_form(scheme: str, stored: dict, group_size: int | None) -> dict[str, torch.Tensor]:
    """Stored (E, in, out) stack, quantized along ``in`` -> (E, out, in) tensors."""
    def t(v):
        return v.transpose(-1, -2).contiguous()
    q = stored["q"]
    if scheme in FLOAT16:
        return {"w": t(q)}
    if scheme == "int8":
        return {"q": t(q), "s": _fresh(stored["scale"].float())}  # scale (E, out)
    if scheme == "int4":
        u = (unpack_int4(q).to(torch.int16) - 8).to(torch.int8)  # (E, in, out)
        return {"q": t(u), "s": t(stored["scale"].float()), "z": t(stored["zero"].float())}  # (E, out, in/G)
    raise ValueError(f"no fused form for scheme {scheme!r}")


def gather_experts(scheme: str, k: dict[str, torch.Tensor], ids: torch.Tensor, group_size: int | None
                   ) -> torch.Tensor:
    """The float weights of experts ``ids`` (any shape) -> (*ids.shape, in, out), ``in`` contiguous."""
    if scheme in FLOAT16:
        w = k["w"][ids].float()
    elif scheme == "int8":
        w = k["q"][ids].float() * k["s"][ids][..., None]
    elif scheme == "int4":
        q = k["q"][ids]  # (..., out, in)
        g = q.unflatten(-1, (q.shape[-1] // group_size, group_size)).float()
        w = (g * k["s"][ids][..., None] + k["z"][ids][..., None]).flatten(-2)
    else:
        raise ValueError(f"no fused form for scheme {scheme!r}")
    return w.transpose(-1, -2)


# --- the measured choice -------------------------------------------------------------------------

MARGIN = 1.10  # as kernels.MARGIN: the fused reduction must beat fp32 by this much to be chosen
# Only one-row calls (batch-1 decode) take the fused reductions: measured here at 8 rows they
# lost to the compiled fp32 matmul on every shape but the int8 head (0.5-0.8x; each row streams the
# weight again), and a batch-8 step with the experts gathered fused ran 3x slower than fp32.
ROWS = 1
_CALL_BYTES = 4e6  # fp32 bytes of the layer copies one timed call multiplies (amortises the call)


def _copies(nbytes: int) -> int:
    return int(max(2, min(16, _CALL_BYTES // max(1, nbytes))))


def time_linear(scheme: str, stored: dict, group_size: int | None, dequantized: torch.Tensor, rows: int
                ) -> tuple[float, float]:
    """(fp32 seconds, fused seconds) per call of one (N, K) layer at ``rows`` rows, each compiled
    by the decode backend (where fp32 ``linear`` of up to 4 rows is itself a reduction). Each call
    multiplies ``c`` copies of the layer; successive calls cycle through enough such sets that the
    weights leave the caches between their reads, as in the model's step."""
    from llama4.infer.step import TIMING_BYTES, best_time, compile_for_decode

    n, kdim = dequantized.shape
    c = _copies(n * kdim * 4)
    sets = max(1, math.ceil(TIMING_BYTES / (c * n * kdim * 4)))  # cycled: out of L2, as in the model
    form = linear_form(scheme, stored, group_size)
    names = sorted(form)
    x = torch.randn(rows, kdim)
    f32 = [[x, *(dequantized.clone() for _ in range(c))] for _ in range(sets)]
    forms = [[x, *(form[k].clone() for _ in range(c) for k in names)] for _ in range(sets)]

    def fp32(x, *ws):
        return torch.cat([torch.nn.functional.linear(x, w) for w in ws], -1)

    def fused(x, *ts):
        outs = []
        for i in range(c):
            k = dict(zip(names, ts[i * len(names):(i + 1) * len(names)]))
            outs.append(linear(scheme, x, k, group_size))
        return torch.cat(outs, -1)

    def cycling(f, inputs):
        it = itertools.cycle(inputs)
        return lambda _: f(next(it))

    reps = max(5, sets, int(2e7 // (n * kdim * c)))
    with torch.no_grad():
        a = compile_for_decode(fp32, f32[0])
        b = compile_for_decode(fused, forms[0])
        t32 = best_time(cycling(a, f32), None, reps)
        tf = best_time(cycling(b, forms), None, reps)
    return t32 / c, tf / c
