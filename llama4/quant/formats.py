"""Weight formats: pure tensor functions, no modules, no I/O.

Every format quantizes along the *reduction* axis ``axis`` of a weight (the input features): an
nn.Linear weight (N, K) reduces over its last axis, an expert stack (E, D, F) in ``x @ W`` layout
over axis -2. Scales and zeros keep the weight's shape with the reduction axis shrunk to the
number of groups (int8: one group, i.e. per output channel).

    int8 (symmetric, per output channel):  w = q * scale,                 q in [-127, 127] (int8)
    int4 (asymmetric, group of G inputs):  w = (q - 8) * scale + zero,    q in [0, 15]
                                           two q per byte along the LAST axis: low nibble first
    bf16 / fp16:                           the weight cast, nothing else

The int4 convention is the one torch's ``_weight_int4pack_mm_for_cpu`` uses (zero = the group's
value at q = 8), so the kernel form is a re-layout, not a re-quantization; GGUF's q4_1 (d, m) is
(scale, zero - 8 * scale) for G = 32.
"""

from __future__ import annotations

import torch

SCHEMES = ("bf16", "fp16", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
FLOAT16 = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _groups(w: torch.Tensor, axis: int, g: int) -> torch.Tensor:
    # (..., K, ...) -> (..., K/g, g, ...) along axis; the caller checked K % g == 0
    axis = axis % w.dim()
    return w.unflatten(axis, (w.shape[axis] // g, g))


def check_group(shape, axis: int, group_size: int, what: str) -> None:
    k = shape[axis]
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group size {group_size} is not supported; use one of {GROUP_SIZES}")
    if k % group_size:
        raise ValueError(f"{what}: group size {group_size} does not divide its input dimension {k} "
                         f"(shape {tuple(shape)}); pick a group size that divides it")


def quantize_int8(w: torch.Tensor, axis: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """-> q int8 (w's shape), scale float32 (w's shape without ``axis``)."""
    wf = w.float()
    scale = wf.abs().amax(dim=axis, keepdim=True).clamp(min=1e-12) / 127.0
    q = torch.round(wf / scale).clamp(-127, 127).to(torch.int8)
    return q, scale.squeeze(axis)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, axis: int = -1,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(dtype) * scale.to(dtype).unsqueeze(axis))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 (any int dtype), last axis even -> uint8 with half the last axis."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got shape {tuple(q.shape)}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """uint8 (..., n) -> uint8 values 0..15 (..., 2n)."""
    return torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)


def quantize_int4(w: torch.Tensor, group_size: int, axis: int = -1
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> packed uint8 (last axis halved), scale and zero float32 (``axis`` -> groups)."""
    axis = axis % w.dim()
    g = _groups(w.float(), axis, group_size)  # group members on axis + 1
    lo, hi = g.amin(dim=axis + 1, keepdim=True), g.amax(dim=axis + 1, keepdim=True)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    zero = lo + 8.0 * scale
    q = torch.round((g - lo) / scale).clamp(0, 15).flatten(axis, axis + 1)
    return pack_int4(q), scale.squeeze(axis + 1), zero.squeeze(axis + 1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, axis: int = -1,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(packed)
    axis = axis % q.dim()
    g = _groups(q.to(dtype), axis, q.shape[axis] // scale.shape[axis])  # (..., K/G, G, ...)
    s, z = scale.to(dtype).unsqueeze(axis + 1), zero.to(dtype).unsqueeze(axis + 1)
    return torch.addcmul(z - 8.0 * s, g, s).flatten(axis, axis + 1)  # (q - 8) * s + z


def quantize(w: torch.Tensor, scheme: str, group_size: int | None = None, axis: int = -1,
             what: str = "weight") -> dict[str, torch.Tensor]:
    """One weight -> its stored tensors: {"q": ...} plus "scale" / "zero" where the scheme has them."""
    if scheme in FLOAT16:
        return {"q": w.to(FLOAT16[scheme])}
    if scheme == "int8":
        q, s = quantize_int8(w, axis)
        return {"q": q, "scale": s}
    if scheme == "int4":
        check_group(w.shape, axis, group_size, what)
        if w.shape[-1] % 2:
            raise ValueError(f"{what}: int4 packs two values per byte along the last dimension, which is "
                             f"odd ({tuple(w.shape)})")
        p, s, z = quantize_int4(w, group_size, axis)
        return {"q": p, "scale": s, "zero": z}
    raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {SCHEMES}")


def dequantize(t: dict[str, torch.Tensor], scheme: str, axis: int = -1,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if scheme in FLOAT16:
        return t["q"].to(dtype)
    if scheme == "int8":
        return dequantize_int8(t["q"], t["scale"], axis, dtype)
    if scheme == "int4":
        return dequantize_int4(t["q"], t["scale"], t["zero"], axis, dtype)
    raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {SCHEMES}")


def parts(scheme: str) -> tuple[str, ...]:
    """The stored tensors of one weight: "q" under the weight's own name, the rest suffixed."""
    return {"int8": ("q", "scale"), "int4": ("q", "scale", "zero")}.get(scheme, ("q",))
