"""What the quantization tests share (a plain module: tests/quant/ is on sys.path for its files)."""

from __future__ import annotations

import torch

from llama4.quant.layers import QuantExperts, QuantLinear


def float_twin(model_q, model_f):
    """Copy dequantized weights of every quantized module of model_q into the float model_f."""
    with torch.no_grad():
        for name, m in model_q.named_modules():
            if isinstance(m, QuantLinear):
                model_f.get_submodule(name).weight.copy_(m.dequantized())
            elif isinstance(m, QuantExperts):
                for w in QuantExperts.NAMES:
                    getattr(model_f.get_submodule(name), w).copy_(m.dequantized(w))
