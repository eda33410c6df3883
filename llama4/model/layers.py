"""Building blocks shared by the decoder: RMSNorm, the SwiGLU feed-forward, rotary embedding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llama4.model.args import ModelArgs, RopeScaling


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS norm in float32, cast back (Llama 4's QK-norm; HF calls it L2Norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Cast back to the input dtype before the weight multiply, as Meta and HF do.
        return rms_norm(x, self.eps) * self.weight

    def reset_parameters(self):
        nn.init.ones_(self.weight)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). The dense FFN and the MoE's shared expert."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# --------------------------------------------------------------------------------------------
# Rotary embedding: interleaved pairs (x[2j], x[2j+1]) rotated by pos * inv_freq[j], in float32.

def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with llama3-style scaling when given (HF's formula)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv
    s = scaling
    wavelen = 2 * math.pi / inv
    low_wl = s.original_max_position_embeddings / s.low_freq_factor
    high_wl = s.original_max_position_embeddings / s.high_freq_factor
    scaled = torch.where(wavelen > low_wl, inv / s.factor, inv)
    if s.high_freq_factor > s.low_freq_factor:  # else the smooth band is empty
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        scaled = torch.where(medium, smoothed, scaled)
    return scaled


class RotaryEmbedding(nn.Module):
    """Maps positions to the (cos, sin) pair every RoPE layer of one forward shares."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.hd
        self.theta = args.rope_theta
        self.scaling = args.rope_scaling
        self.register_buffer("inv_freq", rope_inv_freq(args.hd, args.rope_theta, args.rope_scaling),
                             persistent=False)

    def reset_parameters(self, device: torch.device | str | None = None):
        # Buffers built on the meta device need real values after materialisation.
        device = device or self.inv_freq.device
        self.inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: (T,) or (B, T) -> cos, sin: (1|B, T, 1, hd/2), float32
        pos = positions if positions.dim() == 2 else positions.unsqueeze(0)
        angles = pos.float().unsqueeze(-1) * self.inv_freq.float()
        return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, n_heads, hd); rotate each interleaved pair (x0, x1) in float32
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)
