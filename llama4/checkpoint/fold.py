"""Fold MetaP's forward multipliers into the weights, so a MetaP-trained model exports as a plain
Llama 4 checkpoint that transformers and Meta's code run unchanged.

Every multiplier sits next to a linear map, so scaling that map's weights gives the same function:

* ``embed_mult`` -> the embedding table;  ``logit_mult`` -> the output head;
* ``residual_mult`` -> the last projection of each branch (``wo``, and ``w2`` of the dense FFN,
  the shared expert and every routed expert: the MoE output is a sum of those);
* ``softmax_scale`` -> ``wq`` (RoPE and temperature tuning are linear in q). Not possible where
  a weightless QK-norm follows ``wq``: the norm divides any scale out again.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from llama4.checkpoint.common import CheckpointError
from llama4.model.args import ModelArgs


def fold_forward_multipliers(args: ModelArgs, state: Mapping[str, torch.Tensor], prefix: str = ""
                             ) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """-> (args with every multiplier at its default, state with the multipliers in the weights).
    Tensors that need no scaling are passed through, not copied."""
    out = dict(state)
    if not args.has_forward_multipliers:
        return args, out

    def scale(name: str, factor: float) -> None:
        if factor != 1.0 and prefix + name in out:
            out[prefix + name] = out[prefix + name] * factor

    scale("tok_embeddings.weight", args.embed_mult)
    scale("output.weight", args.logit_mult)
    q_mult = 1.0 if args.softmax_scale is None else args.softmax_scale * math.sqrt(args.hd)
    for i in range(args.n_layers):
        layer = f"layers.{i}."
        for name in ("attention.wo.weight", "attention.wo.bias", "feed_forward.w2.weight",
                     "feed_forward.shared_expert.w2.weight", "feed_forward.experts.w2"):
            scale(layer + name, args.residual_mult)
        if q_mult != 1.0:
            if args.use_qk_norm and not args.is_nope_layer(i):
                raise CheckpointError(
                    f"cannot export: softmax_scale={args.softmax_scale} differs from 1/sqrt(head_dim) and "
                    f"layer {i}'s QK-norm would undo it in the exported model; keep head_dim at the "
                    "MetaP base's or turn use_qk_norm off")
            scale(layer + "attention.wq.weight", q_mult)
            scale(layer + "attention.wq.bias", q_mult)
    plain = args.replace(embed_mult=1.0, residual_mult=1.0, logit_mult=1.0, softmax_scale=None)
    return plain, out
