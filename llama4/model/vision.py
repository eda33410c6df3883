"""Llama 4's vision tower and the early-fusion merge (LLAMA4.md Part B §4, quirks 10-11).

    tiles (N, 3, S, S)
      -> patches: unfold p x p, linear (no bias)                      (N, G*G, Dv)
      -> append CLS **last**, + learned positional embedding, LayerNorm (N, G*G+1, Dv)
      -> ViT blocks: x += attn(LN(x)) [biased q/k/v/o, 2D RoPE, no mask]; x += fc2(gelu(fc1(LN(x))))
      -> LayerNorm, drop CLS                                           (N, G*G, Dv)
      -> pixel shuffle: each k x k block of patches -> one token        (N, (G/k)^2, Dv*k*k)
      -> adapter: gelu(fc2(gelu(fc1(x)))), no biases                   (N, (G/k)^2, Do)
    projector: linear Do -> text width, no bias; the result replaces the ``<|patch|>`` embeddings in order.

G = S / p patches per tile side, k = 1 / pixel_shuffle_ratio. The GELUs are exact (erf) and the
LayerNorms use eps from ``VisionArgs.norm_eps`` (1e-5, the torch default HF uses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama4.model.args import VisionArgs


def vision_rope_angles(args: VisionArgs) -> torch.Tensor:
    """Rotation angles (G*G + 1, hd/2) of the 2D RoPE, float32.

    Pair m < hd/4 turns by (x+1) * f_m and pair hd/4 + m by (y+1) * f_m, where (x, y) is the
    patch's column and row (row-major patch order) and f_m = theta^(-2m/(hd/2)). The last row is
    the CLS token: angle 0, so it is not rotated. Every head uses the same angles.
    """
    g, quarter = args.grid, args.hd // 4
    f = 1.0 / (args.rope_theta ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float32) / (args.hd // 2)))
    n = torch.arange(g * g)
    x, y = (n % g + 1).float(), (n // g + 1).float()
    angles = torch.cat([x[:, None] * f, y[:, None] * f], dim=1)  # (G*G, hd/2)
    return torch.cat([angles, torch.zeros(1, 2 * quarter)], dim=0)


def apply_rope_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2j], x[2j+1]) of x (N, T, H, hd) by the angles behind cos/sin
    (T, hd/2), in float32."""
    xf = x.float().unflatten(-1, (-1, 2))  # (N, T, H, hd/2, 2)
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2).type_as(x)


class VisionRope(nn.Module):
    """The (cos, sin) tables of the 2D RoPE; buffers only (no checkpoint holds them)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        angles = vision_rope_angles(args)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def reset_parameters(self, device: torch.device | str | None = None):
        angles = vision_rope_angles(self.args).to(device or self.cos.device)
        self.cos, self.sin = angles.cos(), angles.sin()


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases and the 2D RoPE on q and k."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.n_heads, self.hd = args.n_heads, args.hd
        self.wq = nn.Linear(args.dim, args.dim, bias=True)
        self.wk = nn.Linear(args.dim, args.dim, bias=True)
        self.wv = nn.Linear(args.dim, args.dim, bias=True)
        self.wo = nn.Linear(args.dim, args.dim, bias=True)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        N, T, _ = x.shape
        q = apply_rope_2d(self.wq(x).view(N, T, self.n_heads, self.hd), cos, sin)  # (N, T, H, hd)
        k = apply_rope_2d(self.wk(x).view(N, T, self.n_heads, self.hd), cos, sin)
        v = self.wv(x).view(N, T, self.n_heads, self.hd)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.wo(out.transpose(1, 2).reshape(N, T, -1))  # scale hd^-0.5, no mask


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.attention_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.attention = VisionAttention(args)
        self.ffn_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.mlp = VisionMLP(args.dim, args.mlp_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.mlp(self.ffn_norm(x))


class VisionEncoder(nn.Module):
    """The ViT: tiles (N, C, S, S) -> patch features (N, G*G, Dv), CLS dropped."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        p = args.patch_size
        self.patch_embedding = nn.Linear(args.n_channels * p * p, args.dim, bias=False)  # (c, ky, kx) order
        self.class_embedding = nn.Parameter(torch.empty(args.dim))
        self.positional_embedding = nn.Parameter(torch.empty(args.grid ** 2 + 1, args.dim))  # last row: CLS
        self.ln_pre = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.rope = VisionRope(args)
        self.layers = nn.ModuleList(VisionBlock(args) for _ in range(args.n_layers))
        self.ln_post = nn.LayerNorm(args.dim, eps=args.norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        a = self.args
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (a.n_channels, a.image_size, a.image_size):
            raise ValueError(f"pixel tiles must be (N, {a.n_channels}, {a.image_size}, {a.image_size}), "
                             f"got {tuple(pixels.shape)}")
        p = a.patch_size
        x = F.unfold(pixels.to(self.patch_embedding.weight.dtype), kernel_size=p, stride=p)  # (N, C*p*p, G*G)
        x = self.patch_embedding(x.transpose(1, 2))  # (N, G*G, Dv), patches row-major
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([x, cls], dim=1) + self.positional_embedding.to(x.dtype)  # (N, G*G+1, Dv)
        x = self.ln_pre(x)
        for layer in self.layers:
            x = layer(x, self.rope.cos, self.rope.sin)
        return self.ln_post(x)[:, :-1]  # (N, G*G, Dv)


def pixel_shuffle(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, G*G, C) row-major patches -> (N, (G/k)^2, C*k*k): token (i, j) is the concatenation of
    the k x k block x[k*i + di, k*j + dj], di major, dj minor (HF's and Meta's ``pixel_shuffle``)."""
    N, T, C = x.shape
    g = int(round(T ** 0.5))
    if g * g != T or g % k:
        raise ValueError(f"pixel_shuffle: {T} patches are not a square grid divisible by {k}")
    x = x.view(N, g // k, k, g // k, k, C).permute(0, 1, 3, 2, 4, 5)  # (N, i, j, di, dj, C)
    return x.reshape(N, (g // k) ** 2, k * k * C)


class VisionAdapter(nn.Module):
    """Pixel shuffle, then ``gelu(fc2(gelu(fc1(x))))`` without biases (note the GELU after fc2)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.k = args.shuffle_factor
        self.fc1 = nn.Linear(args.shuffled_dim, args.output_dim, bias=False)
        self.fc2 = nn.Linear(args.output_dim, args.output_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc2(F.gelu(self.fc1(pixel_shuffle(x, self.k)))))


class VisionModel(nn.Module):
    """Tiles (N, C, S, S) -> image features (N, tokens_per_tile, output_dim), before the projector."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.encoder = VisionEncoder(args)
        self.adapter = VisionAdapter(args)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.encoder(pixels))

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """N(0, std) matrices, zero biases, unit LayerNorms; CLS and positional embedding at
        dim^-0.5 (as Meta and HF initialise them). Works after ``to_empty()``."""
        self.init_buffers()
        enc = self.encoder
        scale = self.args.dim ** -0.5
        nn.init.normal_(enc.class_embedding, std=scale)
        nn.init.normal_(enc.positional_embedding, std=scale)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                m.reset_parameters()

    @torch.no_grad()
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        self.encoder.rope.reset_parameters(device or self.encoder.patch_embedding.weight.device)


def merge_image_features(h: torch.Tensor, tokens: torch.Tensor, features: torch.Tensor,
                         image_token_id: int) -> torch.Tensor:
    """Early fusion: the embeddings h (B, T, D) with the positions where ``tokens == image_token_id``
    replaced by ``features`` (n, D) in order (batch-major, then sequence; tiles in order). The other
    image tokens (``<|image_start|>``, separators, ``<|image|>``, ``<|image_end|>``) keep their
    embeddings."""
    mask = tokens == image_token_id  # (B, T)
    n = int(mask.sum())
    if n != features.shape[0]:
        raise ValueError(f"the prompt has {n} image-patch tokens (id {image_token_id}) but the images give "
                         f"{features.shape[0]} features; the token layout and the pixel tiles disagree")
    return h.index_put((mask,), features.to(h.dtype))
