"""Images in chat prompts: the token layout per computed tile grid (HF's `_prompt_split_image` as the
oracle of the layout; the rest of the chat format is checked against Meta's in tests/tokenizer),
several images per message, tiles in prompt order, and clear errors for inputs that are not usable
images."""

from __future__ import annotations

import base64
import io
import re
import warnings

import numpy as np
import pytest
import torch

from crafted_png import bilevel_png
from oracles import require

from llama4.tokenizer import load_tokenizer
from llama4.tokenizer.chat_format import encode_dialog_prompt
from llama4.vision import ImageError, load_image, preprocess
from llama4.vision.preprocess import MAX_PIXELS
from llama4.vision.prompt import ImageSpec, encode_prompt

Image = require("PIL.Image")
skdata = require("skimage.data")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def hf_layout_ids(tok, grid, n=144) -> list[int]:
    """transformers' Llama4Processor layout string for one image, spelled out as ids."""
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    s = Llama4Processor._prompt_split_image(None, grid, n)  # uses no processor state
    return [tok.special_tokens[t] for t in re.findall(r"<\|[a-z_]+\|>", s)]


def png_bytes(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_several_images_per_message_in_order(tok):
    cat = Image.fromarray(skdata.chelsea())  # 300 x 451 -> 1 x 2 tiles + global
    coffee = Image.fromarray(skdata.coffee())  # 400 x 600 -> 2 x 2 + global
    tiny = Image.fromarray(skdata.coffee()[:40, :60])  # one tile, no global
    messages = [
        {"role": "system", "content": "You describe images."},
        {"role": "user", "content": [{"type": "text", "text": "First:"}, {"type": "image", "image": cat},
                                     {"type": "text", "text": "second:"}, {"type": "image", "image": coffee}]},
        {"role": "assistant", "content": "A cat, then coffee."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(png_bytes(tiny)).decode()}}, "And this?"]},
    ]
    p = encode_prompt(tok, messages)
    assert p.grids == [(1, 2), (2, 2), (1, 1)]
    # tiles: every image's own preprocessing, concatenated in prompt order
    expect_px = torch.cat([preprocess(im).pixel_values for im in (cat, coffee, tiny)])
    assert torch.equal(p.pixel_values, expect_px) and p.pixel_values.shape == (3 + 5 + 1, 3, 336, 336)
    patch = tok.special_tokens["<|patch|>"]
    assert p.ids.count(patch) == 144 * p.pixel_values.shape[0]
    # each image block is HF's layout for its grid, at its place in the text
    blocks, i = [], 0
    start, end = tok.special_tokens["<|image_start|>"], tok.special_tokens["<|image_end|>"]
    while start in p.ids[i:]:
        a = p.ids.index(start, i)
        b = p.ids.index(end, a)
        blocks.append(p.ids[a:b + 1])
        i = b + 1
    assert blocks == [hf_layout_ids(tok, g) for g in p.grids]
    # and the whole prompt is the chat format with those grids (Meta-identical, tested in tests/tokenizer)
    with_grids = [dict(m) for m in messages]
    with_grids[1]["content"] = [{"type": "text", "text": "First:"}, {"type": "image", "grid": (1, 2)},
                                {"type": "text", "text": "second:"}, {"type": "image", "grid": (2, 2)}]
    with_grids[3]["content"] = [{"type": "image", "grid": (1, 1)}, "And this?"]
    assert p.ids == encode_dialog_prompt(tok, with_grids)
    assert tok.decode(p.ids[-4:]) == "<|header_start|>assistant<|header_end|>\n\n"  # generation prompt


def test_small_vision_spec_changes_tokens_per_tile(tok):
    spec = ImageSpec(tile_size=28, tokens_per_tile=4)
    camera = Image.fromarray(skdata.camera())
    p = encode_prompt(tok, [{"role": "user", "content": [{"type": "image", "image": camera}]}], spec)
    assert p.grids == [(4, 4)] and p.pixel_values.shape == (17, 3, 28, 28)
    assert p.ids.count(tok.special_tokens["<|patch|>"]) == 17 * 4


# --------------------------------------------------------------------------------------------
# bad input: a clear ImageError, never a crash

@pytest.mark.parametrize("name,data,match", [
    ("text", b"hello, I am not an image", "not an image"),
    ("empty", b"", "not an image"),
    # beyond 2x Pillow's limit, where Pillow's own DecompressionBombError would refuse it too
    ("bomb", bilevel_png(40000, 40000, complete=False), "exceeds the limit|too many pixels"),
    ("huge bomb", bilevel_png(100000, 100000, complete=False), "exceeds the limit|too many pixels"),
])
def test_bad_bytes(name, data, match):
    with pytest.raises(ImageError, match=match):
        preprocess(data)


def test_truncated_files(tmp_path):
    im = Image.fromarray(skdata.astronaut())
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
        with pytest.raises(ImageError, match="cannot decode|truncated|not an image"):
            preprocess(data)
        with pytest.raises(ImageError, match="cannot decode"):  # a lazily opened PIL image
            preprocess(Image.open(io.BytesIO(data)))
        p = tmp_path / f"half.{fmt.lower()}"
        p.write_bytes(data)
        with pytest.raises(ImageError, match=str(p)):
            load_image(p)


def test_truncated_is_an_error_even_when_pillow_is_lenient():
    from PIL import ImageFile

    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(buf, format="JPEG")
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # what importing Meta's preprocess module does
    try:
        with pytest.raises(ImageError):
            preprocess(buf.getvalue()[:5000])
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


def test_pixel_cap_refuses_what_pillow_only_warns_about():
    """Between Pillow's limit and twice it, Pillow only warns and decodes; only our cap refuses.
    The image is complete and valid (a black 1-bit PNG, 12 KB), so nothing else could refuse it."""
    assert MAX_PIXELS == Image.MAX_IMAGE_PIXELS == 89_478_485  # the README's 89.5 megapixels
    w = h = 10_000
    assert MAX_PIXELS < w * h < 2 * Image.MAX_IMAGE_PIXELS
    data = bilevel_png(w, h)
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow alone: a warning, then the pixels
        im = Image.open(io.BytesIO(data))
        im.load()
    assert im.size == (w, h) and im.getextrema() == (0, 0)
    del im
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="10000x10000 = 100,000,000 pixels exceeds the limit of 89,478,485"):
            preprocess(data)
        with pytest.raises(ImageError, match="exceeds the limit of 89,478,485"):
            load_image(io.BytesIO(data))
    assert preprocess(bilevel_png(64, 64)).grid == (1, 1)  # the same kind of file, small: accepted


def test_pixel_cap_is_configurable_and_checked_before_decoding():
    data = png_bytes(Image.fromarray(skdata.coffee()))
    with pytest.raises(ImageError, match="240,000 pixels exceeds the limit of 100,000"):
        preprocess(data, max_pixels=100_000)
    assert preprocess(data, max_pixels=240_000).grid == (2, 2)


def test_prompt_level_errors(tok):
    user = lambda part: [{"role": "user", "content": [part]}]  # noqa: E731
    with pytest.raises(ImageError, match="only data: URLs"):
        encode_prompt(tok, user({"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}))
    with pytest.raises(ImageError, match="invalid base64"):
        encode_prompt(tok, user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}))
    with pytest.raises(ImageError, match="file paths are not accepted"):
        encode_prompt(tok, user({"type": "image", "image": "/etc/passwd"}), allow_paths=False)
    with pytest.raises(ImageError, match="no such image file"):
        encode_prompt(tok, user({"type": "image", "path": "/nonexistent.png"}))
    with pytest.raises(ImageError, match="not an image"):
        encode_prompt(tok, user({"type": "image", "image": "/etc/hostname"}))
    black = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    tiny = "data:image/png;base64," + base64.b64encode(png_bytes(black)).decode()
    with pytest.raises(ImageError, match="too many images"):
        encode_prompt(tok, [{"role": "user", "content": [{"type": "image_url", "image_url": tiny}] * 3}],
                      ImageSpec(max_images=2))
