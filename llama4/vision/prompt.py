"""Images in chat prompts: each image part is preprocessed, its tile grid laid out by the chat format
(``<|image_start|>`` ... ``<|image_end|>``, `llama4.tokenizer.chat_format.encode_image_tokens`), and
its tiles appended to one ``pixel_values`` tensor in prompt order, the order in which the model
fills the ``<|patch|>`` slots.

    prompt = encode_prompt(tok, [{"role": "user", "content": [
        {"type": "image", "image": "cat.jpg"}, {"type": "image", "image": pil_image},
        {"type": "text", "text": "What differs between these two?"}]}])
    logits = model(torch.tensor([prompt.ids]), pixel_values=prompt.pixel_values)

An image part names its image with ``image`` (a path, bytes, a file object or a PIL image), ``path``,
or OpenAI's ``image_url`` (``{"url": "data:image/png;base64,..."}`` or the URL string). Only
``data:`` URLs are read (nothing is fetched); ``allow_paths=False`` (the server) refuses file paths.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

import torch

from llama4.tokenizer.chat_format import encode_dialog
from llama4.vision.preprocess import MAX_NUM_CHUNKS, MAX_PIXELS, TILE_SIZE, ImageError, preprocess


@dataclass(frozen=True)
class ImageSpec:
    """What the prompt needs to know about the vision tower: the tile side and the tokens per tile."""

    tile_size: int = TILE_SIZE
    tokens_per_tile: int = 144
    max_num_chunks: int = MAX_NUM_CHUNKS
    max_pixels: int = MAX_PIXELS
    max_images: int | None = None  # per prompt; None: no limit

    @classmethod
    def for_model(cls, model, **kw) -> "ImageSpec":
        """From a `MultimodalTransformer` (its ``vision_args``)."""
        v = model.vision_args
        return cls(tile_size=v.image_size, tokens_per_tile=v.tokens_per_tile, **kw)


@dataclass
class MultimodalPrompt:
    ids: list[int]
    pixel_values: torch.Tensor | None  # (n_tiles, 3, S, S) bfloat16, every image's tiles in prompt order
    grids: list[tuple[int, int]] = field(default_factory=list)  # one per image
    loss_mask: list[bool] = field(default_factory=list)  # True on tokens the assistant wrote (SFT)


def _image_source(part: dict, allow_paths: bool):
    if "image_url" in part:
        url = part["image_url"]
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise ImageError("image_url needs a 'url' string")
        if not url.startswith("data:"):
            raise ImageError("only data: URLs are accepted for images (base64-encoded; nothing is fetched)")
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise ImageError("an image data: URL must be base64-encoded (data:image/...;base64,...)")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("the image data: URL holds invalid base64") from None
    src = part.get("image", part.get("path"))
    if src is None:
        raise ImageError("an image part needs 'image', 'path' or 'image_url'")
    if isinstance(src, str) and src.startswith("data:"):
        return _image_source({"image_url": src}, allow_paths)
    if not allow_paths and isinstance(src, str):
        raise ImageError("file paths are not accepted here; send the image as a base64 data: URL")
    return src


def prepare_images(messages, spec: ImageSpec = ImageSpec(), allow_paths: bool = True):
    """Messages whose image parts carry their tile ``grid`` instead of the image, and the tiles of
    every image in order: ``(messages, [Tiles, ...])``."""
    out, tiles = [], []

    def convert(content):
        if not isinstance(content, list):
            return content
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("image", "image_url") and "grid" not in part:
                if spec.max_images is not None and len(tiles) >= spec.max_images:
                    raise ImageError(f"too many images: at most {spec.max_images} per prompt")
                t = preprocess(_image_source(part, allow_paths), tile_size=spec.tile_size,
                               max_num_chunks=spec.max_num_chunks, max_pixels=spec.max_pixels)
                tiles.append(t)
                part = {"type": "image", "grid": t.grid}
            parts.append(part)
        return parts

    for m in messages:
        m = dict(m)
        m["content"] = convert(m.get("content"))
        if m.get("context") is not None:
            m["context"] = convert(m["context"])
        out.append(m)
    return out, tiles


def encode_prompt(tok, messages, spec: ImageSpec = ImageSpec(), add_generation_prompt: bool = True,
                  allow_paths: bool = True, tool_prompt_format: str = "json") -> MultimodalPrompt:
    """Token ids (Llama 4's chat format, images laid out by their tile grids) and pixel tiles."""
    messages, tiles = prepare_images(messages, spec, allow_paths)
    ids, mask = encode_dialog(tok, messages, tool_prompt_format, spec.tokens_per_tile, add_generation_prompt)
    pixels = torch.cat([t.pixel_values for t in tiles]) if tiles else None
    return MultimodalPrompt(ids=ids, pixel_values=pixels, grids=[t.grid for t in tiles], loss_mask=mask)
