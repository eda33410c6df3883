"""Images through inference: ``llama4.generate(..., pixel_values=)`` with the KV cache equals greedy
decoding by full forwards; ``llama4 generate --image``; the server's ``/v1/chat/completions`` with
OpenAI ``image_url`` data-URL parts, and a clear 400 for bad images while it keeps serving.

The model directory is a tiny random multimodal checkpoint (debug vision tower: 28 px tiles, 4 tokens
per tile; chunked attention with a chunk of 16 so image tokens straddle chunks and prefill pieces)
with its own byte-level tokenizer.model (2,304 ids, ``<|patch|>`` = 348).
"""

from __future__ import annotations

import base64
import io
import subprocess
import sys

import numpy as np
import pytest
import torch

from crafted_png import bilevel_png
from oracles import require
from serving import serving, write_tiny_model_dir

import llama4
from llama4.infer.engine import Engine, EngineConfig
from llama4.infer.generation import full_forward_greedy
from llama4.infer.model_dir import load_model_dir
from llama4.vision.prompt import ImageSpec, encode_prompt

Image = require("PIL.Image")
openai = require("openai")
uvicorn = require("uvicorn")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("mm") / "tiny-vlm", multimodal=True)


def photo(seed: int, h: int, w: int) -> "Image.Image":
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def data_url(im, fmt="PNG") -> str:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def test_generate_with_images_equals_full_forward(model_dir):
    model, tok, _ = load_model_dir(model_dir)
    p = encode_prompt(tok, user({"type": "image", "image": photo(1, 20, 60)}, "Describe:",
                                {"type": "image", "image": photo(2, 20, 20)}), ImageSpec.for_model(model))
    assert p.grids == [(1, 3), (1, 1)] and len(p.ids) > 32  # several chunks and prefill pieces
    got = llama4.generate(model, p.ids, 12, pixel_values=p.pixel_values, prefill_chunk=8)

    with torch.no_grad():  # reference: the whole sequence re-run each step, images merged every time
        ids = torch.tensor([p.ids])
        ref = []
        for _ in range(12):
            nxt = model(ids, pixel_values=p.pixel_values)[:, -1].argmax(-1)
            ref.append(int(nxt))
            ids = torch.cat([ids, nxt[None]], 1)
    assert got == ref
    assert got != llama4.generate(model, p.ids, 12)  # the images matter (<|patch|> as plain tokens)
    assert full_forward_greedy(model, [1, 2, 3], 4) == llama4.generate(model, [1, 2, 3], 4)  # text path intact
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        llama4.generate(model, p.ids, 2, pixel_values=[p.pixel_values, None])


def test_cli_generate_with_image(model_dir, tmp_path):
    img = tmp_path / "pic.png"
    photo(3, 50, 50).save(img)
    model, tok, _ = load_model_dir(model_dir)
    p = encode_prompt(tok, user({"type": "image", "image": str(img)}, {"type": "text", "text": "What is it?"}),
                      ImageSpec.for_model(model))
    want = tok.decode([t for t in llama4.generate(model, p.ids, 6, stop=tok.stop_tokens) if t not in tok.stop_tokens])
    want_img = tok.decode([t for t in llama4.generate(model, p.ids, 6, pixel_values=p.pixel_values,
                                                      stop=tok.stop_tokens) if t not in tok.stop_tokens])
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "llama4", "generate", "--model", str(model_dir), "--prompt", "What is it?",
         "--max-tokens", "6", "--threads", "1", *extra], capture_output=True, text=True, timeout=300)
    r = run("--image", str(img))
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == want_img and want_img != want
    bad = tmp_path / "bad.png"
    bad.write_bytes(img.read_bytes()[:100])
    r = run("--image", str(bad))
    assert r.returncode == 2 and "cannot decode the image" in r.stderr and "Traceback" not in r.stderr


def test_server_accepts_data_url_images_and_rejects_bad_ones(model_dir):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok, name = load_model_dir(model_dir)
    engine = Engine(model, EngineConfig(max_batch=4, max_context=512, prefill_chunk=16))
    try:
        with serving(engine, tok, name, default_max_tokens=8) as url:
            _serve_images(openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0), name, model, tok)
    finally:
        engine.shutdown()
        torch.set_num_threads(n)


def _serve_images(client, name, model, tok):
    im = photo(4, 60, 30)
    r = client.chat.completions.create(model=name, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(im, "JPEG")}},
                                     {"type": "text", "text": "What is it?"}]}])
    # the same as generating locally from the same prompt and tiles
    from PIL import Image as PILImage
    local = PILImage.open(io.BytesIO(base64.b64decode(data_url(im, "JPEG").split(",", 1)[1])))
    p = encode_prompt(tok, user({"type": "image", "image": local}, {"type": "text", "text": "What is it?"}),
                      ImageSpec.for_model(model))
    want = llama4.generate(model, p.ids, 8, pixel_values=p.pixel_values, stop=tok.stop_tokens)
    assert r.choices[0].message.content == tok.decode([t for t in want if t not in tok.stop_tokens])
    assert r.usage.prompt_tokens == len(p.ids)

    png = data_url(im)
    bomb = "data:image/png;base64," + base64.b64encode(bilevel_png(30000, 30000, complete=False)).decode()
    cases = {
        "not an image": "data:image/png;base64," + base64.b64encode(b"plain text, not pixels").decode(),
        "truncated": png[: len(png) // 2],
        "decompression bomb": bomb,
        "remote URL": "http://127.0.0.1:9/cat.png",
        "bad base64": "data:image/png;base64,***",
    }
    for why, url in cases.items():
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=name, max_tokens=4, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "hi"}]}])
        assert e.value.status_code == 400 and "image" in e.value.message, (why, e.value.message)
    with pytest.raises(openai.BadRequestError, match="too many images"):
        client.chat.completions.create(model=name, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}}] * 9}])
    # and it still serves
    r2 = client.chat.completions.create(model=name, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(im, "JPEG")}},
                                     {"type": "text", "text": "What is it?"}]}])
    assert r2.choices[0].message.content == r.choices[0].message.content

