"""Image preprocessing against transformers' Llama4ImageProcessor (the oracle), on real photos.

The photos are the samples scikit-image and scikit-learn ship (no network), plus crops, rotations and
mode changes of them that reach the other branches: tall and wide strips, images smaller than a tile
(upscaling capped at one tile), larger than the 16-tile canvas (downscaling), grey, 1-bit, palette,
and transparent images (composited onto white).

The oracle needs torchvision, whose PyPI wheels are CUDA builds: importing one beside the CPU torch
fails (it registers fake kernels for operators its unloadable C++ library should have defined), and
once it is importable at all, every ``import transformers`` tries it. So it never goes into the venv:
scripts/setup.sh installs it with pip into .venv/oracles/ (or set $LLAMA4_TORCHVISION_DIR), and the
test runs the processor in a subprocess that defines the two missing operator schemas first. The processor's own
code and torchvision's resize/pad/normalize run unmodified.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from oracles import require

from llama4.vision import preprocess
from llama4.vision.preprocess import best_fit, supported_canvases

Image = require("PIL.Image")
skdata = require("skimage.data")
sklearn_datasets = require("sklearn.datasets")
require("transformers")

REPO = Path(__file__).resolve().parents[1]

ORACLE = textwrap.dedent("""
    import sys, torch
    lib = torch.library.Library("torchvision", "DEF")  # what the CUDA wheel's C++ library would define
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    from PIL import Image
    from transformers import Llama4ImageProcessor
    proc = Llama4ImageProcessor()
    out = []
    for path in sys.argv[2:]:
        r = proc(images=[Image.open(path)], return_tensors="pt")
        out.append((r["pixel_values"], tuple(r["aspect_ratios"][0].tolist())))
    torch.save(out, sys.argv[1])
""")


def _torchvision_dir() -> Path:
    """A torchvision matching our torch, outside the venv's import path (scripts/setup.sh)."""
    env = os.environ.get("LLAMA4_TORCHVISION_DIR")
    target = Path(env) if env else REPO / ".venv" / "oracles" / "torchvision"
    if not (target / "torchvision" / "__init__.py").is_file():
        pytest.fail(f"the torchvision oracle is missing at {target}: run scripts/setup.sh")
    return target


def photos() -> dict[str, "Image.Image"]:
    sk = {n: getattr(skdata, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "camera", "page", "text",
                                           "hubble_deep_field", "retina", "colorwheel", "logo", "horse")}
    china, flower = sklearn_datasets.load_sample_images().images
    ims = {n: Image.fromarray(a) for n, a in sk.items()}  # camera/page/text: L; horse: 1-bit; logo: RGBA
    ims["china"], ims["flower"] = Image.fromarray(china), Image.fromarray(flower)
    ims["astronaut_tall_strip"] = Image.fromarray(sk["astronaut"][:, 200:290])  # 512 x 90
    ims["retina_tall_strip"] = Image.fromarray(sk["retina"][:, 600:640])  # 1411 x 40: beyond the canvas
    ims["hubble_wide_strip"] = Image.fromarray(sk["hubble_deep_field"][400:431])  # 31 x 1000
    ims["rocket_rotated"] = ims["rocket"].transpose(Image.Transpose.ROTATE_90)  # 640 x 427
    ims["coffee_tiny"] = Image.fromarray(sk["coffee"][100:123, 200:251])  # 23 x 51: upscaled, capped
    ims["chelsea_one_tile"] = Image.fromarray(sk["chelsea"][:300, :300])
    ims["china_palette"] = ims["china"].convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal = ims["chelsea"].convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    pal.info["transparency"] = 3
    ims["chelsea_palette_transparent"] = pal
    la = ims["camera"].convert("LA")
    la.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 512, dtype=np.uint8), (512, 1))))
    ims["camera_alpha_gradient"] = la
    rng = np.random.default_rng(0)  # crops of the big photo at random sizes and aspect ratios
    big = sk["retina"]
    for k in range(6):
        h, w = int(rng.integers(40, 1400)), int(rng.integers(40, 1400))
        y, x = int(rng.integers(0, 1411 - h + 1)), int(rng.integers(0, 1411 - w + 1))
        ims[f"retina_crop_{h}x{w}"] = Image.fromarray(big[y:y + h, x:x + w])
    return ims


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    tv = _torchvision_dir()
    d = tmp_path_factory.mktemp("photos")
    ims = photos()
    paths = []
    for name, im in ims.items():
        p = d / f"{name}.png"  # lossless: both sides decode the same pixels
        im.save(p)
        paths.append(str(p))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tv), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", ORACLE, str(d / "out.pt"), *paths], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = torch.load(d / "out.pt")
    return {name: (Image.open(p), ref) for (name, p), ref in zip(zip(ims, paths), out)}


def test_equals_transformers_on_real_photos(oracle, record_property):
    grids, worst = {}, 0.0
    for name, (im, (ref_pixels, ref_grid)) in oracle.items():
        got = preprocess(im)
        grids[name] = got.grid
        assert got.grid == ref_grid, name
        assert got.pixel_values.dtype == ref_pixels.dtype == torch.bfloat16
        assert got.pixel_values.shape == ref_pixels.shape, name
        diff = (got.pixel_values.float() - ref_pixels.float()).abs().max().item()
        worst = max(worst, diff)
        assert torch.equal(got.pixel_values, ref_pixels), f"{name}: max |ours - HF| {diff}"
    record_property("max_abs_diff", worst)
    print(f"{len(oracle)} images, max |ours - HF| = {worst}; grids: {grids}")
    # the set reaches every kind of canvas: one tile, a row, a column, square grids, the 16-tile cap
    shapes = set(grids.values())
    assert {(1, 1), (4, 4)} <= shapes and any(r == 1 < c for r, c in shapes) and any(c == 1 < r for r, c in shapes)
    assert any(r * c > 4 for r, c in shapes)


def test_tiles_layout_and_thumbnail():
    im = Image.fromarray(skdata.coffee())  # 400 x 600 -> 2 x 2 canvas (672 x 672), image 448 x 672
    t = preprocess(im)
    assert t.grid == (2, 2) and t.n_tiles == 5
    px = t.pixel_values.float()
    assert px.min() >= -1 and px.max() <= 1
    # the padding (bottom 224 rows of the lower tiles) is black = -1; the image fills the top rows
    assert (px[2:4, :, 112:] == -1).all() and (px[2:4, :, :112] > -1).any()
    assert not (px[4] == -1).all(dim=0).any(dim=1).all()  # the thumbnail is the whole image, unpadded


def test_best_fit_rules():
    canv = supported_canvases(16, 336)
    assert len(canv) == len(set(canv)) and all(r * c <= 16 * 336 * 336 for r, c in canv)
    assert [tuple(best_fit(s, canv).tolist()) for s in ((336, 336), (100, 100), (336, 700), (2000, 2000))] == \
        [(336, 336), (336, 336), (336, 1008), (1344, 1344)]
    assert tuple(best_fit((100, 100), canv, resize_to_max_canvas=True).tolist()) == (1344, 1344)
