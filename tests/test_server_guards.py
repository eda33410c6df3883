"""The server's guards and multi-choice requests, through the official ``openai`` client.

* The image pixel cap where only it protects: a complete, valid PNG of 100 megapixels, above
  Pillow's limit (89,478,485, where Pillow only warns) and below twice it (where Pillow's own
  DecompressionBombError would refuse it). Without our cap the server would decode and tile it.
* ``n=3``: three distinct samples, in index order, each reproducible from the seed, the streamed
  deltas of each index adding up to that index's text, and greedy choices equal to the model alone.
"""

from __future__ import annotations

import base64
import warnings

import pytest

from crafted_png import bilevel_png
from oracles import require
from serving import write_tiny_model_dir, serving

import llama4
from llama4.infer.model_dir import load_model_dir
from llama4.tokenizer.chat_format import encode_dialog_prompt
from llama4.vision.preprocess import MAX_PIXELS

Image = require("PIL.Image")
openai = require("openai")
uvicorn = require("uvicorn")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from llama4.infer.engine import Engine, EngineConfig

    model, tok, name = load_model_dir(write_tiny_model_dir(tmp_path_factory.mktemp("mm") / "tiny-vlm",
                                                           multimodal=True))
    engine = Engine(model, EngineConfig(max_batch=4, max_context=512, prefill_chunk=32))
    with serving(engine, tok, name, default_max_tokens=8) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
        yield dict(client=client, name=name, model=model, tok=tok)


def _image_message(png: bytes) -> list[dict]:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is it?"}]}]


def test_pixel_cap_refuses_an_image_pillow_would_decode(server):
    client, name = server["client"], server["name"]

    def ask(png: bytes):
        return client.chat.completions.create(model=name, max_tokens=2, temperature=0, messages=_image_message(png))

    side = 10_000
    assert MAX_PIXELS < side * side < 2 * Image.MAX_IMAGE_PIXELS  # Pillow: a warning, not an error
    ok = ask(bilevel_png(64, 64))  # the same kind of PNG, small: served
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's, in the server thread
        with pytest.raises(openai.BadRequestError) as e:
            ask(bilevel_png(side, side))
    err = e.value
    assert (err.status_code, err.code, err.param, err.type) == (400, "invalid_image", "messages",
                                                                "invalid_request_error")
    assert ask(bilevel_png(64, 64)).choices[0].message.content == ok.choices[0].message.content  # still serving


def test_n_choices_are_distinct_reproducible_samples_and_stream_by_index(server):
    client, name, tok = server["client"], server["name"], server["tok"]
    msgs = [{"role": "user", "content": "roll the dice"}]
    kw = dict(model=name, messages=msgs, max_tokens=10, temperature=1.0, seed=7)
    r = client.chat.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.message.content for c in r.choices]
    assert len(set(texts)) == 3, texts  # three samples, not one sample three times
    assert [c.message.content for c in client.chat.completions.create(n=3, **kw).choices] == texts  # seeded
    streamed = {0: "", 1: "", 2: ""}
    finish = {}
    for chunk in client.chat.completions.create(n=3, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
            if c.finish_reason:
                assert c.index not in finish
                finish[c.index] = c.finish_reason
    assert [streamed[i] for i in range(3)] == texts
    assert sorted(finish) == [0, 1, 2] and [finish[i] for i in range(3)] == [c.finish_reason for c in r.choices]

    # greedy: every choice is what the model says alone, and usage counts every choice's tokens
    ids = llama4.generate(server["model"], encode_dialog_prompt(tok, msgs), 10, stop=tok.stop_tokens)
    want = tok.decode([i for i in ids if i not in tok.stop_tokens])
    g = client.chat.completions.create(model=name, messages=msgs, max_tokens=10, temperature=0, n=3)
    assert [c.message.content for c in g.choices] == [want] * 3
    assert g.usage.completion_tokens == 3 * len(ids)
