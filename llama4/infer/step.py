"""The decode step: the model called on one new token per row, set up for speed.

Two choices are made here, outside the model:

* **MoE path.** The model's default ("grouped") sorts tokens by expert and runs one grouped
  matmul; that is best for prefill and wide batches. For a handful of decode tokens the
  "gather" path (each token multiplies its experts' weights, indexed directly, as gpt-fast does)
  skips the sort and the empty experts; off the CPU it also avoids reading expert counts back
  to the host (the grouped kernel exists only for bf16 on Hopper GPUs; the fallback loop syncs).
* **torch.compile** (optional, gpt-fast style). A decode step is ~100 small ops per layer; in
  eager mode their dispatch costs as much as the matmuls. Compiled, the elementwise ops fuse and
  the weights are frozen into the graph. It compiles once per cache shape: the KV cache runs in
  ``static`` mode (every step exposes the whole capacity, masked, over all rows), and the MoE
  uses the gather path (no data-dependent shapes).

The eager path with the model's own MoE is the reference; tests check they agree.
"""

from __future__ import annotations

import weakref

import torch

from torch.nn.attention import SDPBackend, sdpa_kernel

from llama4.model.moe import MoE

_NO_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

_compiled: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


class DecodeStep:
    """Called like the model: ``step(tokens, positions=, cache=) -> logits``."""

    def __init__(self, model: torch.nn.Module, compile: bool = False):
        self.model = model
        self.moe = [m for m in model.modules() if isinstance(m, MoE)]
        self.top_k = model.args.top_k
        self.on_cpu = next(model.parameters()).device.type == "cpu"
        self.fn = model
        if compile:
            fn = _compiled.get(model)  # compiling takes seconds: once per model
            if fn is None:
                fn = _compiled[model] = torch.compile(model, dynamic=False, options={"freezing": True})
            self.fn = fn
        self.compiled = compile

    def moe_impl(self, n_tokens: int) -> str | None:
        """The MoE path for a step of ``n_tokens`` tokens (None: keep the model's)."""
        if self.compiled or not self.on_cpu or n_tokens * self.top_k <= 2:
            return "gather"
        return None

    def __call__(self, tokens: torch.Tensor, *, positions, cache, **kw) -> torch.Tensor:
        impl = self.moe_impl(tokens.shape[0]) if self.moe else None
        saved = [m.impl for m in self.moe]
        if impl is not None:
            for m in self.moe:
                m.impl = impl
        try:
            if self.on_cpu:
                return self.fn(tokens, positions=positions, cache=cache, **kw)
            # cuDNN attention builds a new plan for every new key length, i.e. every decode step
            # (measured on an H100: 10 ms per call in bf16); the other kernels have no such cost.
            with sdpa_kernel(_NO_CUDNN):
                return self.fn(tokens, positions=positions, cache=cache, **kw)
        finally:
            for m, old in zip(self.moe, saved):
                m.impl = old
