"""Quantized stand-ins for the model's weight-holding modules, swapped in from outside.

``QuantLinear`` replaces an ``nn.Linear`` (attention projections, dense FFN, shared expert, head);
``QuantExperts`` replaces ``GroupedExperts`` and keeps the routed experts sparse: ``experts.w1[ids]``
(what MoE's gather and loop paths index) dequantizes only the experts asked for, and the grouped
path visits only experts that received tokens. Buffers hold the stored form (what the checkpoint
holds, so ``state_dict`` round-trips); ``k_*`` buffers, not saved, hold the form the chosen compute
path needs (see kernels.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from llama4.model.moe import GroupedExperts
from llama4.quant import fused, kernels
from llama4.quant.formats import FLOAT16, dequantize, parts


def _stored_shapes(scheme: str, shape: tuple, axis: int, group_size: int | None) -> dict[str, tuple]:
    """Shapes of the stored tensors of a float weight of ``shape`` (reduction axis ``axis``)."""
    axis = axis % len(shape)
    if scheme in FLOAT16:
        return {"q": shape}
    if scheme == "int8":
        return {"q": shape, "scale": shape[:axis] + shape[axis + 1:]}
    if scheme == "int4":
        grouped = shape[:axis] + (shape[axis] // group_size,) + shape[axis + 1:]
        return {"q": shape[:-1] + (shape[-1] // 2,), "scale": grouped, "zero": grouped}
    raise ValueError(f"unknown quantization scheme {scheme!r}")


_STORED_DTYPE = {"int8": torch.int8, "int4": torch.uint8}


def _empty(scheme: str, part: str, shape: tuple) -> torch.Tensor:
    if part == "q":
        dt = FLOAT16[scheme] if scheme in FLOAT16 else _STORED_DTYPE[scheme]
    else:
        dt = torch.float32
    return torch.empty(shape, dtype=dt)


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W (out, in) stored as ``weight`` (+ ``weight_scale``, ``weight_zero``)."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int | None = None,
                 bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.group_size = scheme, group_size
        for part, shape in _stored_shapes(scheme, (out_features, in_features), -1, group_size).items():
            self.register_buffer("weight" if part == "q" else f"weight_{part}", _empty(scheme, part, shape))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.path = "dequant"  # correct before any path is prepared: dequantize per call
        self.speedup = 1.0
        self.dequant_from: int | None = None
        self._kernel: list[str] = []
        self.fused_rows = 0  # compiled calls of up to this many rows run the fused reduction (fused.py)
        self.fused_speedup = 1.0
        self._fused: list[str] = []

    def stored(self) -> dict[str, torch.Tensor]:
        return {p: getattr(self, "weight" if p == "q" else f"weight_{p}") for p in parts(self.scheme)}

    def dequantized(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.stored(), self.scheme, -1, dtype)

    def set_path(self, path: str, speedup: float = 1.0, dequant_from: int | None = None) -> None:
        """Build ``path``'s tensors; inputs of ``dequant_from`` rows or more dequantize the weight
        per call instead (the kernels lose to fp32 GEMM on many rows)."""
        self.dequant_from = dequant_from
        for name in [n for n, _ in self.named_buffers(recurse=False) if n.startswith("k_")]:
            delattr(self, name)
        if path == "fp32":
            kernel = {"w": self.dequantized()}
        elif path == "dequant":
            kernel = {}
        else:
            kernel = kernels.kernel_form(path, self.weight, getattr(self, "weight_scale", None),
                                         getattr(self, "weight_zero", None), self.group_size)
        for k, t in kernel.items():
            self.register_buffer(f"k_{k}", t, persistent=False)
        self._kernel = list(kernel)
        self.path, self.speedup = path, speedup

    def set_fused(self, rows: int, speedup: float = 1.0) -> None:
        """Under torch.compile, inputs of up to ``rows`` rows (0: none) compute with the fused
        dequantizing reduction over the compact weight; everything else takes ``path``."""
        for name in self._fused:
            delattr(self, f"f_{name}")
        form = fused.linear_form(self.scheme, self.stored(), self.group_size) if rows else {}
        for k, t in form.items():
            self.register_buffer(f"f_{k}", t, persistent=False)
        self._fused = list(form)
        self.fused_rows, self.fused_speedup = rows, speedup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_rows and torch.compiler.is_compiling() and x.numel() // x.shape[-1] <= self.fused_rows:
            y = fused.linear(self.scheme, x.reshape(-1, x.shape[-1]),
                             {k: getattr(self, f"f_{k}") for k in self._fused}, self.group_size)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        if self.path == "fp32":
            w = self._buffers["k_w"]
            return F.linear(x, w if w.dtype == x.dtype else w.to(x.dtype), self.bias)
        if self.path == "dequant" or (self.dequant_from is not None
                                      and x.numel() // x.shape[-1] >= self.dequant_from):
            return F.linear(x, self.dequantized(x.dtype), self.bias)
        y = kernels.run(self.path, x, {k: getattr(self, f"k_{k}") for k in self._kernel}, self.group_size)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        d = f", dequant_from={self.dequant_from}" if self.dequant_from else ""
        d += f", compiled up to {self.fused_rows} row(s): fused" if self.fused_rows else ""
        return f"in={self.in_features}, out={self.out_features}, scheme={self.scheme}{g}, path={self.path}{d}"


def _several(idx) -> bool:
    """An index of more than one token's experts (an int or a 0-d index is one expert of the loop
    paths, which serve several tokens too)."""
    return not isinstance(idx, torch.Tensor) or idx.dim() == 0 or idx.shape[0] > 1


class _Stack:
    """``experts.w1[ids]``: the float weights of the experts ``ids`` selects, dequantized on demand
    (or, for several tokens, indexed from the fp32 copy where the module keeps one)."""

    def __init__(self, owner: "QuantExperts", name: str):
        self.owner, self.name = owner, name

    def __getitem__(self, idx) -> torch.Tensor:
        o = self.owner
        k32 = o._buffers.get(f"k_{self.name}")
        if k32 is not None and _several(idx):
            return k32[idx]
        sel = {p: t[idx] for p, t in o.stored(self.name).items()}
        return dequantize(sel, o.scheme, -2)

    @property
    def shape(self):
        return torch.Size(self.owner.dims[self.name])


class _FusedStack(_Stack):
    """Under torch.compile: the selected experts' weights from the fused (E, out, in) form, as
    (…, in, out) views with ``in`` contiguous (the decode backend reduces over it)."""

    def __getitem__(self, idx) -> torch.Tensor:
        o = self.owner
        if _several(idx):
            # several tokens (batch > 1): the load-time path, as for QuantLinear (measured: the
            # fused gather at batch 8 ran the whole compiled step 3x slower)
            return k32[idx] if (k32 := o._buffers.get(f"k_{self.name}")) is not None else \
                _Stack.__getitem__(self, idx)
        k = {p: getattr(o, f"f_{self.name}_{p}") for p in o._fused}
        return fused.gather_experts(o.scheme, k, idx, o.group_size)


class QuantExperts(nn.Module):
    """E SwiGLU experts as GroupedExperts, in ``x @ W`` layout (E, in, out), quantized along ``in``."""

    NAMES = ("w1", "w3", "w2")

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, scheme: str, group_size: int | None = None):
        super().__init__()
        self.scheme, self.group_size = scheme, group_size
        self.dims = {"w1": (n_experts, dim, hidden_dim), "w3": (n_experts, dim, hidden_dim),
                     "w2": (n_experts, hidden_dim, dim)}
        for name, shape in self.dims.items():
            for part, s in _stored_shapes(scheme, shape, -2, group_size).items():
                self.register_buffer(f"{name}_{part}", _empty(scheme, part, s))
        self.path = "dequant"  # correct before any path is prepared
        self.speedup = 1.0
        self.fused, self.fused_speedup = False, 1.0  # compiled: gather from the fused form
        self._fused: list[str] = []

    def _stack(self, name: str):
        # MoE's gather / loop paths index these like the float stacks: compiled with the fused form,
        # views that gather and dequantize inside the reduction; on the fp32 path the float stacks
        # (no indirection on the decode step); else views that dequantize what is indexed
        if self.fused and torch.compiler.is_compiling():
            return _FusedStack(self, name)
        return self._buffers.get(f"k_{name}") if self.path == "fp32" else _Stack(self, name)

    w1 = property(lambda self: self._stack("w1"))
    w2 = property(lambda self: self._stack("w2"))
    w3 = property(lambda self: self._stack("w3"))

    def set_fused(self, on: bool, speedup: float = 1.0) -> None:
        """Compiled calls gather the selected experts from compact (E, out, in) forms (fused.py)."""
        for name in self.NAMES:
            for p in self._fused:
                delattr(self, f"f_{name}_{p}")
        parts_ = []
        if on:
            for name in self.NAMES:
                form = fused.experts_form(self.scheme, self.stored(name), self.group_size)
                for p, t in form.items():
                    self.register_buffer(f"f_{name}_{p}", t, persistent=False)
                parts_ = list(form)
        self._fused = parts_
        self.fused, self.fused_speedup = on, speedup

    def relayout_for_decode(self) -> None:
        """The fp32 stacks [out, in]-contiguous with the same shapes (as llama4.infer.step does for
        the float model's experts), so a compiled decode reduces over contiguous memory."""
        for name in self.NAMES:
            t = self._buffers.get(f"k_{name}")
            if t is not None and t.stride(-2) != 1:
                self._buffers[f"k_{name}"] = t.transpose(-1, -2).contiguous().transpose(-1, -2)

    def stored(self, name: str) -> dict[str, torch.Tensor]:
        return {p: getattr(self, f"{name}_{p}") for p in parts(self.scheme)}

    def dequantized(self, name: str, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.stored(name), self.scheme, -2, dtype)

    def set_path(self, path: str, speedup: float = 1.0, fp32_for_several: bool = False) -> None:
        """``fp32``: dequantize the stacks once; ``dequant``: dequantize the selected experts per
        call, and with ``fp32_for_several`` keep an fp32 copy too for calls of several tokens
        (dequantizing per expert wins at one token and loses at batch 8: 0.79-0.84x measured)."""
        if path not in ("fp32", "dequant"):
            raise ValueError(f"unknown expert path {path!r}; use 'fp32' or 'dequant'")
        for name in self.NAMES:
            if hasattr(self, f"k_{name}"):
                delattr(self, f"k_{name}")
            if path == "fp32" or fp32_for_several:
                self.register_buffer(f"k_{name}", self.dequantized(name), persistent=False)
        self.path, self.speedup = path, speedup

    def forward(self, x: torch.Tensor, counts: torch.Tensor, impl: str = "grouped") -> torch.Tensor:
        # x: (M, D) rows sorted by expert; counts: (E,) -> (M, D). Only experts with rows compute.
        if "k_w1" in self._buffers:  # an fp32 copy: the float module's own grouped matmul over it
            f32 = SimpleNamespace(w1=self._buffers["k_w1"], w2=self._buffers["k_w2"], w3=self._buffers["k_w3"])
            return GroupedExperts.forward(f32, x, counts, impl)
        outs = []
        for e, xe in enumerate(x.split(counts.tolist())):
            if xe.shape[0] == 0:
                continue
            w1, w3, w2 = self.w1[e], self.w3[e], self.w2[e]
            outs.append((F.silu(xe @ w1.to(xe.dtype)) * (xe @ w3.to(xe.dtype))) @ w2.to(xe.dtype))
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])

    def extra_repr(self) -> str:
        e, d, f = self.dims["w1"]
        g = f", group_size={self.group_size}" if self.scheme == "int4" else ""
        c = ", compiled: fused" if self.fused else ""
        return f"experts={e}, dim={d}, hidden={f}, scheme={self.scheme}{g}, path={self.path}{c}"
