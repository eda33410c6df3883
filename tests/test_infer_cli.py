"""``llama4 generate`` / ``chat`` / ``serve`` as a user runs them, on a model directory without its
own tokenizer (so the official Llama 4 tokenizer is used) and on a training run's ``RUN/final``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from oracles import require

import llama4
from llama4.infer import generate
from llama4.infer.model_dir import load_model_dir
from llama4.model import ModelArgs, Transformer
from llama4.tokenizer.chat_format import encode_dialog_prompt

httpx = require("httpx")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def official_dir(tmp_path_factory):
    """Vocabulary 202,048 (the official tokenizer's), otherwise tiny."""
    d = tmp_path_factory.mktemp("official") / "run" / "final"
    args = ModelArgs(vocab_size=202048, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, n_experts=2,
                     top_k=1, expert_dim=16, dense_dim=32, interleave_moe_layer_step=2, nope_layer_interval=2,
                     attention_chunk_size=8, floor_scale=8.0, max_seq_len=2048)
    torch.manual_seed(0)
    m = Transformer(args)
    m.init_weights(std=0.5)
    llama4.save(m, d)
    return d


def run(*argv, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "llama4", *argv], input=stdin, capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def test_model_dir_uses_official_tokenizer_and_resolves_run_dirs(official_dir, tmp_path):
    model, tok, name = load_model_dir(official_dir.parent)  # RUN/ -> RUN/final
    assert name == "run" and tok.n_words == 202048 and tok.bos_id == 200000
    assert tok.encode("Hello world", bos=True) == [200000, 19873, 3817]
    small = tmp_path / "small"
    args = ModelArgs(vocab_size=1000, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, n_experts=0)
    llama4.save(Transformer(args), small)
    with pytest.raises(ValueError, match="tokenizer has 202048 tokens"):
        load_model_dir(small)
    with pytest.raises(FileNotFoundError):
        load_model_dir(tmp_path / "missing")


@pytest.mark.slow
def test_generate_and_chat_commands(official_dir):
    model, tok, _ = load_model_dir(official_dir)
    ids = generate(model, tok.encode("Hello", bos=True), 8, stop=tok.stop_tokens)
    want = tok.decode([i for i in ids if i not in tok.stop_tokens])
    r = run("generate", "--model", str(official_dir), "--prompt", "Hello", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout == want + "\n"

    # two turns; the second prompt carries the first exchange (chat format, system prompt)
    r = run("chat", "--model", str(official_dir), "--system", "You are terse.", "--temperature", "0",
            "--max-tokens", "6", stdin="hi\nand again\n")
    assert r.returncode == 0, r.stderr
    replies = r.stdout.split("\n")[:2]
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]
    ids = generate(model, encode_dialog_prompt(tok, msgs), 6, stop=tok.stop_tokens)
    first = tok.decode([i for i in ids if i not in tok.stop_tokens])
    assert replies[0] == first
    msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "and again"}]
    ids = generate(model, encode_dialog_prompt(tok, msgs), 6, stop=tok.stop_tokens)
    assert replies[1] == tok.decode([i for i in ids if i not in tok.stop_tokens])

    r = run("generate", "--model", str(official_dir / "nope"), "--prompt", "x")
    assert r.returncode == 2 and "not found" in r.stderr


@pytest.mark.slow
def test_serve_command_binds_loopback(official_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llama4", "serve", "--model", str(official_dir), "--port",
                             str(port), "--api-key", "k", "--log-level", "warning"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k"}, timeout=60,
                       json=dict(model="run", prompt="Hello", max_tokens=3, temperature=0))
        assert r.status_code == 200, r.text
        model, tok, _ = load_model_dir(official_dir)  # what the model says alone
        ids = generate(model, tok.encode("Hello", bos=True), 3, stop=[tok.eos_id])
        assert r.json()["choices"][0]["text"] == tok.decode([i for i in ids if i != tok.eos_id])
        assert r.json()["usage"]["completion_tokens"] == len(ids) >= 1

        # bound to 127.0.0.1 only. 127.0.0.2 is this host too (Linux routes 127/8 to lo): a socket
        # listening on every address answers there, the server must not.
        with socket.create_server(("0.0.0.0", 0)) as everywhere:
            socket.create_connection(("127.0.0.2", everywhere.getsockname()[1]), timeout=2).close()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.2:{port}/health", timeout=2)
        # and on the host's other addresses, where it has any
        others = {ai[4][0] for ai in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
        for host in others - {"127.0.0.1"}:
            with pytest.raises(httpx.TransportError):
                httpx.get(f"http://{host}:{port}/health", timeout=2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_has_the_commands(capsys):
    from llama4.cli import main

    for cmd in ("generate", "chat", "serve"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and f"llama4 {cmd}" in out and "--model" in out, (cmd, out)
