"""Llama 4 image preprocessing with Pillow and torch: best-fit tiling, resize without distortion,
pad, normalise (LLAMA4.md Part A "Tiling", §4.1).

    tiles = preprocess(load_image("photo.jpg"))   # Tiles(pixel_values (n, 3, 336, 336) bf16, grid (rows, cols))

1. The canvas: among all (rows, cols) tile grids with rows*cols <= max_num_chunks, the one that needs
   the least upscaling (or, when the image is larger than every canvas, the least downscaling); ties
   go to the smallest area. Upscaling is capped so the image's sides only grow up to one tile.
2. The image is resized (bilinear, antialiased) to fit the canvas without distortion, padded with
   black at the right and bottom, normalised to [-1, 1] (mean = std = 0.5, in bfloat16 as Meta and
   Hugging Face do), and cut into tiles row by row.
3. With more than one tile, a global thumbnail (the whole image squashed to one tile) comes last.

The result equals transformers' ``Llama4ImageProcessor`` bit for bit (tests/test_vision_preprocess.py
runs it as the oracle): the same torch kernels in the same order, the same float32 tie-breaking.
"""

from __future__ import annotations

import io
import math
import os
import platform
import threading
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

TILE_SIZE = 336
MAX_NUM_CHUNKS = 16
# The largest image we decode (width * height): Pillow's own decompression-bomb threshold.
MAX_PIXELS = 89_478_485
MEAN = STD = (0.5, 0.5, 0.5)


class ImageError(ValueError):
    """An input that is not a usable image: unreadable, not an image, truncated, or too large."""


@dataclass
class Tiles:
    """One preprocessed image: ``pixel_values`` (n_tiles, 3, S, S) bfloat16 in [-1, 1], local tiles
    row-major then the global thumbnail (only when rows*cols > 1); ``grid`` = (rows, cols)."""

    pixel_values: torch.Tensor
    grid: tuple[int, int]

    @property
    def n_tiles(self) -> int:
        return self.pixel_values.shape[0]


# --------------------------------------------------------------------------------------------
# decoding

_strict_lock = threading.Lock()


def load_image(src, max_pixels: int = MAX_PIXELS):
    """A fully decoded PIL image from a path, bytes, a binary file object or a PIL image.

    Files and bytes get their EXIF orientation applied (as transformers' ``load_image`` does).
    Raises `ImageError` for anything that is not a complete image of at most ``max_pixels``
    pixels: the size is checked from the header, before any pixel is decoded."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(src, Image.Image):
        _check_size(src.size, max_pixels, "image")
        try:
            _load_strict(src)  # a lazily opened image decodes here
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"image: cannot decode the image ({type(e).__name__}: {e})") from None
        return src
    if isinstance(src, (bytes, bytearray, memoryview)):
        name, fp = "image bytes", io.BytesIO(bytes(src))
    elif isinstance(src, (str, os.PathLike)):
        name, fp = str(src), Path(src)
        if not fp.is_file():
            raise ImageError(f"{name}: no such image file")
    elif hasattr(src, "read"):
        name, fp = getattr(src, "name", "image stream"), src
    else:
        raise ImageError(f"cannot read an image from a {type(src).__name__}")
    try:
        # Pillow's own bomb guard trips at 2x its limit; ours is checked below, from the header.
        with Image.open(fp) as img:
            _check_size(img.size, max_pixels, name)
            _load_strict(img)
            img = ImageOps.exif_transpose(img)
            return img.copy() if img is not None else img
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
        raise ImageError(f"{name}: cannot decode the image ({type(e).__name__}: {e})") from None


def _load_strict(img) -> None:
    """Decode the pixels; a truncated file is an error even where someone enabled Pillow's global
    LOAD_TRUNCATED_IMAGES (importing Meta's llama_models preprocess module does)."""
    from PIL import ImageFile

    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        img.load()
        return
    with _strict_lock:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = True


def _check_size(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"{name}: empty image ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(f"{name}: {w}x{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
                         "(a decompression bomb or simply too large)")


def to_rgb_tensor(img) -> torch.Tensor:
    """PIL image -> uint8 (3, H, W). Transparency is composited onto white, other modes go
    through Pillow's RGB conversion (as transformers' ``convert_to_rgb``)."""
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    else:
        img = img.convert("RGB")
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------
# the canvas

@lru_cache(maxsize=8)
def supported_canvases(max_num_chunks: int, tile: int) -> tuple[tuple[int, int], ...]:
    """Every (height, width) in pixels of a grid of at most ``max_num_chunks`` tiles, in Meta's
    order (grouped by aspect ratio, first seen from the most tiles down): the order breaks ties."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for n in range(max_num_chunks, 0, -1):
        for rows in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio[rows / (n // rows)].append((rows, n // rows))
    return tuple((r * tile, c * tile) for grids in by_ratio.values() for r, c in grids)


def best_fit(size: tuple[int, int], canvases, resize_to_max_canvas: bool = False) -> torch.Tensor:
    """The canvas (height, width) for an image of ``size`` = (height, width): the smallest upscale
    >= 1 if any canvas allows one (the largest with ``resize_to_max_canvas``), else the mildest
    downscale; among equal scales the smallest area. Scales are float32 tensors, as in Meta's and
    HF's code; the canvas comes back as an int64 tensor (2,) so `target_size` computes as they do."""
    c = torch.tensor(canvases)
    scale_h, scale_w = c[:, 0] / size[0], c[:, 1] / size[1]  # float32
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)  # the limiting side
    up = scales[scales >= 1]
    if len(up):
        chosen = up.max() if resize_to_max_canvas else up.min()
    else:
        chosen = scales[scales < 1].max()
    candidates = c[scales == chosen]
    return candidates[torch.argmin(candidates[:, 0] * candidates[:, 1])]


def fit_without_distortion(size: tuple[int, int], target) -> tuple[int, int]:
    """The largest (height, width) with the image's aspect ratio inside ``target`` (the limiting
    side takes the target's length, the other is floored; at least 1)."""
    (h, w), (th, tw) = size, target
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        new_h, new_w = min(math.floor(h * scale_w), th), tw
    else:
        new_h, new_w = th, min(math.floor(w * scale_h), tw)
    return max(int(new_h), 1), max(int(new_w), 1)


def target_size(size: tuple[int, int], canvas: torch.Tensor, tile: int,
                resize_to_max_canvas: bool = False) -> tuple[int, int]:
    """Where the image goes inside its canvas: upscaling is capped so a side only grows up to one
    tile (a small image is not blown up to fill many tiles).

    The canvas sides stay 0-d tensors and Python's min/max pick between them and plain ints exactly
    as transformers' code does, so the floor in `fit_without_distortion` sees the same float32 or
    float64 value as there (it decides an off-by-one pixel on some sizes)."""
    th, tw = canvas[0], canvas[1]
    if not resize_to_max_canvas:
        th, tw = min(max(size[0], tile), th), min(max(size[1], tile), tw)
    return fit_without_distortion(size, (th, tw))


# --------------------------------------------------------------------------------------------
# pixels

def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> uint8 (..., 3, h, w): antialiased bilinear, half-pixel centres.
    Uses torch's native uint8 kernel (Pillow's algorithm) where the CPU has it (AVX2/AVX512, ARM),
    else float32 and rounding: the same choice torchvision, and so transformers, makes."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    native = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or \
        platform.machine() in ("aarch64", "arm64")
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:])
    if native and x.device.type == "cpu":
        y = F.interpolate(x, size=list(size), mode="bilinear", align_corners=False, antialias=True)
    else:
        y = F.interpolate(x.float(), size=list(size), mode="bilinear", align_corners=False, antialias=True)
        y = y.round_().to(torch.uint8)
    return y.reshape(*lead, *y.shape[-3:])


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> bfloat16 in [-1, 1]: (x/255 - 0.5) / 0.5, each step rounded to bfloat16 (Meta
    normalises in bf16; transformers copies it)."""
    y = x.to(torch.bfloat16) * (1 / 255)
    mean = torch.tensor(MEAN, dtype=torch.bfloat16, device=x.device).view(-1, 1, 1)
    std = torch.tensor(STD, dtype=torch.bfloat16, device=x.device).view(-1, 1, 1)
    return y.sub(mean).div_(std)


def split_tiles(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(C, rows*S, cols*S) -> (rows*cols, C, S, S), row-major."""
    C, H, W = x.shape
    return x.view(C, rows, H // rows, cols, W // cols).permute(1, 3, 0, 2, 4).reshape(rows * cols, C, H // rows,
                                                                                     W // cols)


def preprocess(image, tile_size: int = TILE_SIZE, max_num_chunks: int = MAX_NUM_CHUNKS,
               resize_to_max_canvas: bool = False, max_pixels: int = MAX_PIXELS) -> Tiles:
    """An image (path, bytes, file object or PIL image) -> its tiles and tile grid."""
    if max_num_chunks < 1 or tile_size < 1:
        raise ValueError(f"max_num_chunks and tile_size must be >= 1, got {max_num_chunks}, {tile_size}")
    x = to_rgb_tensor(load_image(image, max_pixels))  # uint8 (3, H, W)
    size = (x.shape[1], x.shape[2])
    canvas = best_fit(size, supported_canvases(max_num_chunks, tile_size), resize_to_max_canvas)
    resized = resize_bilinear(x, target_size(size, canvas, tile_size, resize_to_max_canvas))
    H, W = int(canvas[0]), int(canvas[1])
    padded = F.pad(resized, (0, W - resized.shape[2], 0, H - resized.shape[1]), value=0)  # black, right/bottom
    rows, cols = H // tile_size, W // tile_size
    tiles = split_tiles(normalize(padded), rows, cols)
    if rows * cols > 1:
        thumb = normalize(resize_bilinear(x, (tile_size, tile_size)))
        tiles = torch.cat([tiles, thumb[None]], dim=0)
    return Tiles(pixel_values=tiles, grid=(rows, cols))
