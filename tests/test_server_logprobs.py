"""Log-probabilities and the tokenizer routes of ``llama4 serve``, through the official ``openai``
client and lm-eval's own remote tokenizer, against a server this test starts on loopback.

* completions: ``echo`` + ``logprobs`` (the prompt's tokens, the first without a log-prob, then the
  generated ones), ``top_logprobs``, ``tokens``, ``text_offset``; prompts as strings, one list of
  token ids or several; ``max_tokens: 0`` with ``echo``; streamed log-probabilities;
* chat: ``logprobs`` / ``top_logprobs`` as OpenAI defines them;
* every log-prob equals the model's plain forward (no KV cache, the reference path) on the same
  tokens, so the engine thread's scoring and the decode's sampling distribution are both checked;
* ``/tokenizer_info``, ``/tokenize``, ``/detokenize`` as vLLM serves them;
* malformed requests: 400 with OpenAI's ``param`` and ``code``.

The model: tiny, random, with a byte-level ``tokenizer.model`` (256 bytes + 2,048 special tokens),
so "é" is two tokens that are not UTF-8 on their own.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from oracles import require
from serving import serving, write_tiny_model_dir

from llama4.infer import generate
from llama4.infer.engine import Engine, EngineConfig
from llama4.infer.model_dir import load_model_dir
from llama4.tokenizer.chat_format import encode_dialog_prompt

openai = require("openai")
httpx = require("httpx")
uvicorn = require("uvicorn")
lm_eval_utils = require("lm_eval.utils")

KEY = "logprob-key"
MAX_CONTEXT = 512
TOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model, tok, name = load_model_dir(write_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-lp"))
    engine = Engine(model, EngineConfig(max_batch=4, max_context=MAX_CONTEXT, prefill_chunk=32))
    with serving(engine, tok, name, api_key=KEY, default_max_tokens=16) as url:
        yield dict(url=url, name=name, model=model, tok=tok, engine=engine)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def reference(model, ids: list[int], k: int = 0):
    """log p(ids[i] | ids[:i]) for i >= 1 from the plain forward, and the top-k (ids, logprobs)."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).float()[0, :-1], -1)  # (T-1, V)
    chosen = logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
    top = logp.topk(k, -1) if k else None
    return chosen.tolist(), top


def text_of(tok, i: int) -> str:
    b = tok.decode_bytes([i])
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


def test_completion_echo_logprobs_are_the_models(server, client):
    tok, model = server["tok"], server["model"]
    prompt = "Grüße, señor"
    ids = tok.encode(prompt, bos=True)
    gen = generate(model, ids, 5, stop=[tok.eos_id])
    r = client.completions.create(model=server["name"], prompt=prompt, echo=True, logprobs=3, max_tokens=5,
                                  temperature=0)
    c = r.choices[0]
    assert c.text == prompt + tok.decode([i for i in gen if i != tok.eos_id])
    lp = c.logprobs
    every = ids + gen
    assert lp.tokens == [text_of(tok, i) for i in every]
    assert lp.tokens[:5] == ["<|begin_of_text|>", "G", "r", "bytes:\\xc3", "bytes:\\xbc"]  # "ü": two bytes
    want, top = reference(model, every, 3)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) <= TOL
    for i, entry in enumerate(lp.top_logprobs[1:]):
        best = {text_of(tok, t): v for t, v in zip(top.indices[i].tolist(), top.values[i].tolist())}
        assert text_of(tok, every[i + 1]) in entry and 3 <= len(entry) <= 4  # the top 3 + the chosen one
        assert all(abs(entry[t] - v) <= TOL for t, v in best.items())
    for j in range(len(ids), len(every)):  # greedy: each generated token is its position's best
        assert lp.token_logprobs[j] == max(lp.top_logprobs[j].values())
    # text offsets: the BOS the server added has no text; each token starts where its text does
    assert lp.text_offset[:2] == [0, 0] and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[len(ids)] == len(prompt)
    for t, off in zip(lp.tokens[1:], lp.text_offset[1:]):
        if not t.startswith("bytes:") and t != "<|end_of_text|>":
            assert c.text[off:off + len(t)] == t
    assert lp.text_offset[3] == lp.text_offset[4] == prompt.index("ü") and lp.text_offset[5] == prompt.index("ß")


def test_token_id_prompts_max_tokens_zero_and_lm_eval_request(server, client):
    """What lm-eval's local-completions sends: token-id prompts, echo, logprobs=1, max_tokens=1;
    and OpenAI's max_tokens=0 with echo (the prompt scored, nothing generated)."""
    tok, model, name = server["tok"], server["model"], server["name"]
    a, b = tok.encode("The cat sat"), tok.encode("on the mat, ça va")
    r = client.completions.create(model=name, prompt=[a, b], echo=True, logprobs=1, max_tokens=0)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 0
    for c, ids in zip(r.choices, (a, b)):
        assert c.text == tok.decode(ids) and c.finish_reason == "length"
        assert len(c.logprobs.token_logprobs) == len(ids) and c.logprobs.token_logprobs[0] is None
        want, _ = reference(model, ids)
        assert max(abs(x - y) for x, y in zip(c.logprobs.token_logprobs[1:], want)) <= TOL
    r = client.completions.create(model=name, prompt=a, echo=True, max_tokens=0)  # one list of ids
    assert r.choices[0].text == tok.decode(a) and r.choices[0].logprobs is None
    # lm-eval: sum(token_logprobs[ctxlen:-1]) is the continuation's log-likelihood
    ctx, cont = tok.encode("Once upon"), tok.encode(" a time")
    body = {"model": name, "prompt": [ctx + cont], "temperature": 0, "max_tokens": 1, "logprobs": 1,
            "seed": 1234, "echo": True}
    got = httpx.post(server["url"] + "/v1/completions", json=body, timeout=60,
                     headers={"Authorization": f"Bearer {KEY}"}).json()["choices"][0]["logprobs"]
    assert len(got["token_logprobs"]) == len(ctx + cont) + 1
    want, _ = reference(model, ctx + cont)
    assert abs(sum(got["token_logprobs"][len(ctx):-1]) - sum(want[len(ctx) - 1:])) <= TOL


def test_scoring_beside_generation_is_consistent(server):
    """Echo requests scored on the engine thread while other requests decode: every answer is the
    one it gets alone (no forward ever runs on the model from two threads)."""
    tok, name = server["tok"], server["name"]
    prompts = [tok.encode(f"sentence number {i} " * (1 + i % 4)) for i in range(12)]

    def ask(i):
        c = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)
        if i % 3 == 0:
            return c.completions.create(model=name, prompt="tell me more", max_tokens=20, temperature=0).choices[0].text
        return c.completions.create(model=name, prompt=prompts[i], echo=True, logprobs=2,
                                    max_tokens=1, temperature=0).choices[0].logprobs.token_logprobs

    alone = [ask(i) for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(ask, range(12)))
    for x, y in zip(alone, together):
        if isinstance(x, str):
            assert x == y
        else:
            assert x[0] is None and max(abs(p - q) for p, q in zip(x[1:], y[1:])) <= TOL


def test_generated_logprobs_streamed_and_cut_at_stop(server, client):
    tok, model, name = server["tok"], server["model"], server["name"]
    ids = tok.encode("abc", bos=True)
    full = client.completions.create(model=name, prompt="abc", logprobs=2, max_tokens=12, temperature=0)
    lp = full.choices[0].logprobs
    gen = generate(model, ids, 12, stop=[tok.eos_id])
    assert lp.tokens == [text_of(tok, i) for i in gen]
    want, _ = reference(model, ids + gen)
    assert max(abs(x - y) for x, y in zip(lp.token_logprobs, want[len(ids) - 1:])) <= TOL
    assert lp.text_offset[0] == len("abc")  # offsets count from the prompt's start, as OpenAI's
    chunks = list(client.completions.create(model=name, prompt="abc", logprobs=2, max_tokens=12, temperature=0,
                                            stream=True))
    got = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for g in got for t in g.tokens] == lp.tokens
    assert [o for g in got for o in g.text_offset] == lp.text_offset
    assert [v for g in got for v in g.token_logprobs] == lp.token_logprobs
    text = full.choices[0].text
    if len(text) > 4:  # a stop string: the tokens after the cut are not reported
        stop = text[2:4]
        r = client.completions.create(model=name, prompt="abc", logprobs=0, max_tokens=12, temperature=0, stop=stop)
        cut = r.choices[0]
        assert cut.text == text[:2] and cut.finish_reason == "stop"
        assert all(o < len("abc") + len(cut.text) for o in cut.logprobs.text_offset)
        assert cut.logprobs.tokens == lp.tokens[:len(cut.logprobs.tokens)]


def test_chat_logprobs(server, client):
    tok, model, name = server["tok"], server["model"], server["name"]
    msgs = [{"role": "user", "content": "hello there"}]
    prompt = encode_dialog_prompt(tok, msgs)
    gen = generate(model, prompt, 10, stop=tok.stop_tokens)
    r = client.chat.completions.create(model=name, messages=msgs, max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    kept = [i for i in gen if i not in tok.stop_tokens]  # the end-of-turn token is not in the message
    assert [c.token for c in content] == [text_of(tok, i) for i in kept]
    assert [bytes(c.bytes) for c in content] == [tok.decode_bytes([i]) for i in kept]
    assert b"".join(bytes(c.bytes) for c in content).decode("utf-8", "replace") == r.choices[0].message.content
    want, _ = reference(model, prompt + gen)
    assert max(abs(c.logprob - w) for c, w in zip(content, want[len(prompt) - 1:])) <= TOL
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob
        assert c.top_logprobs[0].logprob == c.logprob  # greedy
    streamed = list(client.chat.completions.create(model=name, messages=msgs, max_tokens=10, temperature=0,
                                                   logprobs=True, top_logprobs=2, stream=True))
    got = [e for ch in streamed if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in got] == [(c.token, c.logprob) for c in content]
    plain = client.chat.completions.create(model=name, messages=msgs, max_tokens=10, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content
    r = client.chat.completions.create(model=name, messages=msgs, max_tokens=3, temperature=0, logprobs=True)
    assert all(c.top_logprobs == [] for c in r.choices[0].logprobs.content)


def test_tokenizer_routes_and_lm_eval_remote_tokenizer(server):
    tok, url = server["tok"], server["url"]
    info = httpx.get(url + "/tokenizer_info").json()
    assert (info["eos_token"], info["bos_token"], info["pad_token"]) == \
        ("<|end_of_text|>", "<|begin_of_text|>", "<|finetune_right_pad|>")
    assert info["model_max_length"] == MAX_CONTEXT
    r = httpx.post(url + "/tokenize", json={"prompt": "hé<|eot|>x"}).json()
    assert r["tokens"] == [tok.bos_id] + tok.encode("hé") + [tok.eot_id] + tok.encode("x")
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == MAX_CONTEXT
    r = httpx.post(url + "/tokenize", json={"prompt": "hé", "add_special_tokens": False,
                                           "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("hé") and r["token_strs"] == ["h", "bytes:\\xc3", "bytes:\\xa9"]
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"] + [tok.eot_id]}).json() == {"prompt": "hé<|eot|>"}
    # lm-eval's own client of these routes, as its tokenizer_backend=auto finds and uses it
    base = url + "/v1/completions"
    assert lm_eval_utils.check_remote_tokenizer_support(base)
    remote = lm_eval_utils.RemoteTokenizer(base)
    assert (remote.eos_token_id, remote.bos_token_id) == (tok.eos_id, tok.bos_id)
    assert remote.encode("Grüße") == tok.encode("Grüße") and remote.decode(tok.encode("Grüße")) == "Grüße"


MALFORMED = [
    # (route, body, param, code)
    ("/v1/completions", dict(prompt="hi", logprobs=6), "logprobs", "integer_above_max_value"),
    ("/v1/completions", dict(prompt="hi", logprobs=-1), "logprobs", "integer_below_min_value"),
    ("/v1/completions", dict(prompt="hi", echo=True, stream=True), "echo", "unsupported_parameter"),
    ("/v1/completions", dict(prompt=[[1, 2], [3, 99999]]), "prompt.1", "invalid_value"),
    ("/v1/completions", dict(prompt=[5, -1]), "prompt", "invalid_value"),
    ("/v1/completions", dict(prompt=[[]]), "prompt", "invalid_value"),
    ("/v1/completions", dict(prompt=[]), "prompt", "invalid_value"),
    ("/v1/completions", dict(prompt=[1.5, 2]), "prompt", "invalid_value"),
    ("/v1/completions", dict(prompt="hi", max_tokens=0), "max_tokens", "invalid_value"),
    ("/v1/completions", dict(prompt="hi", max_tokens=-1, echo=True), "max_tokens", "invalid_value"),
    ("/v1/completions", dict(prompt="hi", best_of=2), "best_of", "unsupported_parameter"),
    ("/v1/completions", dict(prompt=[7] * MAX_CONTEXT, echo=True, logprobs=1, max_tokens=1), "prompt",
     "context_length_exceeded"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=21),
     "top_logprobs", "integer_above_max_value"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=-1),
     "top_logprobs", "integer_below_min_value"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "x"}], top_logprobs=1), "top_logprobs",
     "invalid_value"),
    ("/tokenize", dict(add_special_tokens=False), "prompt", "missing_required_parameter"),
    ("/tokenize", dict(prompt=5), "prompt", "invalid_value"),
    ("/detokenize", dict(tokens=[5, 99999]), "tokens.1", "invalid_value"),
    ("/detokenize", dict(tokens="abc"), "tokens", "invalid_value"),
]


@pytest.mark.parametrize("route,body,param,code", MALFORMED, ids=[f"{m[0]}:{m[2]}:{m[3]}" for m in MALFORMED])
def test_malformed_requests(server, route, body, param, code):
    if route.startswith("/v1"):
        body = {"model": server["name"], **body}
    r = httpx.post(server["url"] + route, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code), err
    assert err["type"] == "invalid_request_error" and err["message"]


def test_api_key_is_compared_in_constant_time(server, monkeypatch):
    import hmac

    import llama4.server.app as app_module

    seen = []
    real = hmac.compare_digest
    monkeypatch.setattr(app_module.hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
    h = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server["url"] + "/v1/models", headers=h).status_code == 200
    assert httpx.get(server["url"] + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert seen == [(f"Bearer {KEY}".encode(), f"Bearer {KEY}".encode()), (b"Bearer nope", f"Bearer {KEY}".encode())]
    assert json.loads(httpx.get(server["url"] + "/tokenizer_info").text)["eos_token"]  # open, as vLLM's


def test_scores_in_pieces_equal_the_plain_forward(server):
    """``sequence_logprobs`` (what the engine thread and the in-process lm-eval model score with):
    right-padded rows through a KV cache in pieces equal each row's plain forward, whatever the
    piece (across the 16-token attention chunks) and the neighbours."""
    from llama4.infer.score import sequence_logprobs

    model = server["model"]
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 2304, (n,), generator=g).tolist() for n in (1, 2, 23, 70)]
    alone = [sequence_logprobs(model, [s], top_k=3)[0] for s in seqs]
    for piece in (7, 16, 64):
        together = sequence_logprobs(model, seqs, top_k=3, piece=piece)
        for s, a, t in zip(seqs, alone, together):
            assert len(t) == len(s) - 1 == len(a)
            if len(s) < 2:
                continue
            want, top = reference(model, s, 3)
            assert (t.logprobs - torch.tensor(want)).abs().max() <= TOL
            assert (t.logprobs - a.logprobs).abs().max() <= TOL
            assert torch.equal(t.top_ids, top.indices) and (t.top_logprobs - top.values).abs().max() <= TOL
            assert torch.equal(t.greedy, top.indices[:, 0] == torch.tensor(s[1:]))
