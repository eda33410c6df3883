"""The OpenAI-compatible server, driven by the official ``openai`` client against a server this
test starts on a free loopback port: plain and streaming chat, completions, stop sequences,
max_tokens, 20 concurrent clients, and bad input answered with 4xx errors while it keeps serving.

The model directory is a tiny random checkpoint saved with ``llama4.save`` plus its own byte-level
``tokenizer.model`` (256 byte tokens + Llama 4's 2,048 special tokens = 2,304 ids).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from llama4.infer import generate
from llama4.infer.engine import Engine, EngineConfig
from llama4.infer.model_dir import load_model_dir
from llama4.tokenizer.chat_format import encode_dialog_prompt
from oracles import require
from serving import serving, write_tiny_model_dir

openai = require("openai")
httpx = require("httpx")
uvicorn = require("uvicorn")

KEY = "test-key"
MAX_CONTEXT = 384


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-chat")


@pytest.fixture(scope="module")
def server(model_dir):
    model, tok, name = load_model_dir(model_dir)
    engine = Engine(model, EngineConfig(max_batch=8, max_context=MAX_CONTEXT, prefill_chunk=64))
    with serving(engine, tok, name, api_key=KEY, default_max_tokens=16) as url:
        yield dict(url=url, name=name, model=model, tok=tok, engine=engine)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def offline_chat(server, messages, max_tokens):
    """What the model says alone, outside the server: greedy ``generate`` + the chat stop tokens."""
    tok = server["tok"]
    ids = generate(server["model"], encode_dialog_prompt(tok, messages), max_tokens, stop=tok.stop_tokens)
    finish = "stop" if ids and ids[-1] in tok.stop_tokens else "length"
    return tok.decode([i for i in ids if i not in tok.stop_tokens]), finish, len(ids)


def user(text):
    return [{"role": "user", "content": text}]


def test_health_and_models(server, client):
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"  # no key needed
    models = client.models.list()
    assert [m.id for m in models.data] == [server["name"]] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"


def test_chat_plain_and_streaming(server, client):
    msgs = [{"role": "system", "content": "be brief"}, *user("hello there")]
    want, finish, n = offline_chat(server, msgs, 20)
    r = client.chat.completions.create(model=server["name"], messages=msgs, max_tokens=20, temperature=0)
    assert r.choices[0].message.content == want
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == finish
    assert r.usage.completion_tokens == n
    assert r.usage.prompt_tokens == len(encode_dialog_prompt(server["tok"], msgs))
    chunks = list(client.chat.completions.create(model=server["name"], messages=msgs, max_tokens=20,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]
    assert chunks[-1].usage.completion_tokens == n
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed


def test_completions_plain_stream_and_token_prompt(server, client):
    tok, name = server["tok"], server["name"]
    prompt = "The quick brown fox"
    ids = generate(server["model"], tok.encode(prompt, bos=True), 12, stop=[tok.eos_id])
    want = tok.decode([i for i in ids if i != tok.eos_id])
    r = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    s = "".join(c.choices[0].text for c in client.completions.create(
        model=name, prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert s == want
    r = client.completions.create(model=name, prompt=tok.encode(prompt, bos=True), max_tokens=12, temperature=0)
    assert r.choices[0].text == want
    r = client.completions.create(model=name, prompt=["ab", "cd"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both samples of "ab" agree


def test_stop_sequences_and_max_tokens(server, client):
    name = server["name"]
    msgs = user("tell me a story")
    full, _, _ = offline_chat(server, msgs, 40)
    assert len(full) > 12
    stop = full[6:9]
    want = full[:full.find(stop)]
    r = client.chat.completions.create(model=name, messages=msgs, max_tokens=40, temperature=0, stop=[stop, "\x00\x01"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(model=name, messages=msgs, max_tokens=40, temperature=0,
                                                   stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want
    assert streamed[-1].choices[0].finish_reason == "stop"
    for n in (1, 5):
        r = client.chat.completions.create(model=name, messages=msgs, max_tokens=n, temperature=0)
        assert r.usage.completion_tokens == n and r.choices[0].finish_reason in ("length", "stop")
    r = client.chat.completions.create(model=name, messages=msgs, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3
    r = client.chat.completions.create(model=name, messages=msgs, temperature=0)  # server default: 16
    assert r.usage.completion_tokens <= 16


def test_sampling_params_reach_the_engine(server, client):
    name, msgs = server["name"], user("roll the dice")
    a = client.chat.completions.create(model=name, messages=msgs, max_tokens=10, temperature=1.0, seed=42)
    b = client.chat.completions.create(model=name, messages=msgs, max_tokens=10, temperature=1.0, seed=42)
    g = client.chat.completions.create(model=name, messages=msgs, max_tokens=10, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != g.choices[0].message.content
    # n > 1 (distinct, reproducible samples by index): test_server_guards.py


@pytest.mark.slow
def test_twenty_concurrent_clients(server):
    name = server["name"]
    prompts = [user(f"question number {i}: " + "why? " * (i % 5)) for i in range(20)]
    want = [offline_chat(server, m, 24)[0] for m in prompts]
    engine = server["engine"]
    engine.stats["max_running"] = 0

    def ask(i):
        c = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=300)
        if i % 2:
            stream = c.chat.completions.create(model=name, messages=prompts[i], max_tokens=24, temperature=0,
                                               stream=True)
            return "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        return c.chat.completions.create(model=name, messages=prompts[i], max_tokens=24,
                                         temperature=0).choices[0].message.content

    with ThreadPoolExecutor(20) as pool:
        got = list(pool.map(ask, range(20)))
    assert got == want
    assert engine.stats["max_running"] >= 4  # requests were batched, not served one at a time


BAD = [
    # (description, method body or raw bytes, expected status, expected error param/code fragment)
    ("malformed JSON", b'{"model": "tiny-chat", "messages": [', 400, "invalid_json"),
    ("not an object", b'[1, 2, 3]', 400, None),
    ("unknown model", dict(model="gpt-17", messages=user("hi")), 404, "model_not_found"),
    ("missing messages", dict(model="tiny-chat"), 400, "missing_required_parameter"),
    ("empty messages", dict(model="tiny-chat", messages=[]), 400, None),
    ("unknown role", dict(model="tiny-chat", messages=[{"role": "wizard", "content": "x"}]), 400, None),
    ("content wrong type", dict(model="tiny-chat", messages=[{"role": "user", "content": 5}]), 400, None),
    ("temperature wrong type", dict(model="tiny-chat", messages=user("hi"), temperature="hot"), 400, None),
    ("temperature out of range", dict(model="tiny-chat", messages=user("hi"), temperature=9), 400, None),
    ("max_tokens zero", dict(model="tiny-chat", messages=user("hi"), max_tokens=0), 400, "invalid_value"),
    ("max_tokens negative", dict(model="tiny-chat", messages=user("hi"), max_tokens=-5), 400, "invalid_value"),
    ("max_tokens absurd", dict(model="tiny-chat", messages=user("hi"), max_tokens=10**12), 400,
     "context_length_exceeded"),
    ("max_tokens wrong type", dict(model="tiny-chat", messages=user("hi"), max_tokens="many"), 400, None),
    ("prompt too long", dict(model="tiny-chat", messages=user("x" * 1000)), 400, "context_length_exceeded"),
    ("stream wrong type", dict(model="tiny-chat", messages=user("hi"), stream="yes please"), 400, None),
    ("too many stops", dict(model="tiny-chat", messages=user("hi"), stop=list("abcde")), 400, None),
    ("image input", dict(model="tiny-chat", messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), 400, "unsupported_content"),
    ("top_logprobs above 20", dict(model="tiny-chat", messages=user("hi"), logprobs=True, top_logprobs=21), 400,
     "integer_above_max_value"),
    ("top_logprobs without logprobs", dict(model="tiny-chat", messages=user("hi"), top_logprobs=2), 400,
     "invalid_value"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_is_answered(server, case):
    _, body, status, code = case
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server["url"] + "/v1/chat/completions", content=data, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err


def test_bad_completions_input(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    url = server["url"] + "/v1/completions"
    for body, code in [(dict(model="tiny-chat", prompt=[1, 99999]), "invalid_value"),
                       (dict(model="tiny-chat", prompt="x" * 500), "context_length_exceeded"),
                       (dict(model="tiny-chat", prompt="hi", echo=True, stream=True), "unsupported_parameter"),
                       (dict(model="tiny-chat", prompt=[]), "invalid_value")]:
        r = httpx.post(url, json=body, headers=headers, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, r.text
    r = httpx.get(server["url"] + "/v1/nothing-here", headers=headers)
    assert r.status_code == 404 and "error" in r.json()


def test_api_key_is_enforced_and_server_keeps_serving(server, client):
    url = server["url"] + "/v1/chat/completions"
    body = dict(model="tiny-chat", messages=user("hi"), max_tokens=2)
    r = httpx.post(url, json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    for bad in ("Bearer nope", "nope", f"Basic {KEY}"):
        r = httpx.post(url, json=body, headers={"Authorization": bad})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    # after all the bad requests above, a normal one is still answered
    r = client.chat.completions.create(model="tiny-chat", messages=user("still there?"), max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4 or r.choices[0].finish_reason == "stop"
    assert server["engine"].running == 0 and not server["engine"].waiting


def test_client_disconnect_mid_stream_frees_the_row(server, monkeypatch):
    engine = server["engine"]
    aborted = engine.stats["aborted"]
    # 300 tokens of a tiny model decode in well under a second: on a loaded machine the request
    # could finish before the disconnect is seen. 20 ms per step leaves it >= 6 s to be aborted.
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (time.sleep(0.02), step())[1])
    body = dict(model="tiny-chat", messages=user("a long answer please"), max_tokens=300, temperature=0,
                stream=True)
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in got)
    deadline = time.monotonic() + 30
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.running == 0 and engine.stats["aborted"] == aborted + 1  # aborted, not decoded to the end
