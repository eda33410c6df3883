"""What the quantization tests share (a plain module: tests/quant/ is on sys.path for its files)."""

from __future__ import annotations

import torch

from llama4.quant.apply import dequantized_state


def float_twin(model_q, model_f):
    """Copy dequantized weights of every quantized module of model_q into the float model_f."""
    with torch.no_grad():
        for k, v in dequantized_state(model_q).items():
            model_f.get_parameter(k).copy_(v)
