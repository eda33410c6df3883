"""A ``llama4.save(..., tokenizer=...)`` folder (what ``OUT/final`` is) is a complete Hugging Face
model for transformers (the oracle, code no one here wrote), for our own BPE and for the
official Llama 4 tokenizer alike:

* ``AutoTokenizer.from_pretrained(DIR)`` gives our ids, BOS included, on held-out text in many
  scripts (the corpus's validation split, ~600 languages);
* its ``apply_chat_template(messages, add_generation_prompt=True)`` gives the ids of our
  ``encode_dialog_prompt`` (system, user, assistant, tool results, tool calls, RAG context);
* ``pipeline("text-generation", model=DIR)`` decoding greedily continues exactly as
  ``llama4 generate --temperature 0``, stopping at the same token.

And the CLI honours the folder's generation_config.json (temperature, top_p, eos) when no flag is
given, flags override it, and ``--help`` says so.
"""

from __future__ import annotations

import json

import pytest
import torch

from oracles import require

import llama4
from llama4.cli import main
from llama4.model import ModelArgs, Transformer
from llama4.tokenizer import Tokenizer, load_tokenizer
from llama4.tokenizer.chat_format import encode_dialog_prompt

transformers = require("transformers")
require("llama_models")

pytestmark = pytest.mark.usefixtures("one_thread")
N_NEW = 24


def _tiny(vocab: int, dim: int = 64) -> Transformer:
    args = ModelArgs(vocab_size=vocab, dim=dim, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, n_experts=4,
                     top_k=1, expert_dim=64, dense_dim=128, interleave_moe_layer_step=2, nope_layer_interval=2,
                     attention_chunk_size=16, floor_scale=8.0, max_seq_len=512)
    torch.manual_seed(0)
    m = Transformer(args)
    m.init_weights(std=0.3)
    return m


@pytest.fixture(scope="module")
def texts():
    from llama4.data.corpus import iter_corpus

    docs = list(iter_corpus("val"))
    return [d.text[:300] for d in docs[::7]]  # ~90 languages, many scripts


@pytest.fixture(scope="module", params=["own_bpe", "official"])
def export(request, tmp_path_factory, texts):
    d = tmp_path_factory.mktemp(request.param) / "model"
    if request.param == "own_bpe":
        from llama4.data.corpus import iter_corpus
        from llama4.tokenizer.bpe import train_bpe

        tok = Tokenizer.from_ranks(train_bpe([x.text for x in iter_corpus("train")][::5], 2048 + 1024))
        model = _tiny(tok.n_words)
    else:
        tok = load_tokenizer()  # llama-models' tokenizer.model, no network
        model = _tiny(tok.n_words, dim=32)
    llama4.save(model, d, tokenizer=tok)
    return d, tok, model


def test_files_written(export):
    d, tok, _ = export
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "tokenizer.model", "config.json", "model.safetensors"):
        assert (d / name).is_file(), name
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["bos_token_id"] == tok.bos_id and gen["eos_token_id"] == tok.stop_tokens
    assert gen["pad_token_id"] == tok.pad_id and gen["temperature"] == 0.6 and gen["top_p"] == 0.9
    assert load_tokenizer(d).encode("héllo wörld", bos=True) == tok.encode("héllo wörld", bos=True)


def test_auto_tokenizer_ids(export, texts):
    d, tok, _ = export
    hf = transformers.AutoTokenizer.from_pretrained(d)
    assert hf.bos_token_id == tok.bos_id and hf.eos_token_id == tok.eos_id and hf.pad_token_id == tok.pad_id
    assert hf.chat_template
    bad = [t for t in texts + ["", " ", "  two  spaces\n\n\tand\r\nlines", "1234567 numbers, 3.14!"]
           if hf(t)["input_ids"] != tok.encode(t, bos=True)]
    assert not bad, f"{len(bad)} of {len(texts) + 4} texts differ, e.g. {bad[0][:80]!r}"
    assert all(hf.decode(tok.encode(t)) == t for t in texts)
    # a special token's spelling is that token, as the server's /tokenize reads it
    from llama4.server.tokenize import encode_with_special_tokens

    s = "a <|eot|> b<|header_start|>"
    assert hf(s)["input_ids"] == encode_with_special_tokens(tok, s, True)


DIALOGS = [
    [{"role": "user", "content": "Hello, ça va? 日本語で答えて。"}],
    [{"role": "system", "content": "You are terse.\n"}, {"role": "user", "content": " What is 2+2? "},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "Und 3+3?"}],
    # (the template renders one string, Meta encodes content, "\n\n" and context apart: their seam
    # tokenizes alike unless the content ends in punctuation that merges with "\n\n", e.g. "?\n\n")
    [{"role": "user", "content": [{"type": "text", "text": "Weather in Paris"}],
      "context": "Paris is in France."},
     {"role": "assistant", "content": "", "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "tool_call_id": "c1", "content": "{\"temp_c\": 21}"},
     {"role": "assistant", "content": "21 °C."},
     {"role": "user", "content": "And Zürich?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"id": "c2", "type": "function",
          "function": {"name": "get_weather", "arguments": json.dumps({"city": "Zürich"})}}]},
     {"role": "ipython", "content": "18"}],
]


def test_chat_template_gives_our_prompt_ids(export):
    d, tok, _ = export
    hf = transformers.AutoTokenizer.from_pretrained(d)
    for dialog in DIALOGS:
        got = hf.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert got == encode_dialog_prompt(tok, dialog), hf.decode(got)
    text = hf.apply_chat_template(DIALOGS[0], tokenize=False)
    assert text.endswith("<|eot|>") and "<|header_start|>assistant" not in text


def test_pipeline_greedy_equals_llama4_generate(export, capsys):
    d, tok, model = export
    gen = transformers.pipeline("text-generation", model=str(d), dtype=torch.float32, device="cpu")
    stops = set(tok.stop_tokens)
    for prompt in ("The quick brown fox", "Привет, как дела"):
        out = gen(prompt, max_new_tokens=N_NEW, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
        prompt_ids = tok.encode(prompt, bos=True)
        assert out[:len(prompt_ids)] == prompt_ids
        new = out[len(prompt_ids):]
        assert new == llama4.generate(model.eval(), prompt_ids, N_NEW, stop=tok.stop_tokens)
        capsys.readouterr()
        assert main(["generate", "--model", str(d), "--prompt", prompt, "--temperature", "0",
                     "--max-tokens", str(N_NEW)]) == 0
        printed = capsys.readouterr().out
        assert printed == tok.decode([i for i in new if i not in stops]) + "\n"


def test_cli_uses_generation_config(export, capsys, tmp_path):
    d, tok, model = export
    prompt = tok.encode("Once upon a time", bos=True)

    def cli(*flags) -> str:
        capsys.readouterr()
        assert main(["generate", "--model", str(d), "--prompt", "Once upon a time", "--max-tokens", "16",
                     "--seed", "7", *flags]) == 0
        return capsys.readouterr().out

    def ours(**kw) -> str:
        kw = {"temperature": 0.6, "top_p": 0.9, "stop": tok.stop_tokens, **kw}
        ids = llama4.generate(model.eval(), prompt, 16, seed=7, **kw)
        return tok.decode([i for i in ids if i not in kw["stop"]]) + "\n"

    assert cli() == ours() != ours(temperature=0.0)  # generation_config.json: temperature 0.6, top_p 0.9
    assert cli("--temperature", "1.3", "--top-p", "0.5") == ours(temperature=1.3, top_p=0.5)  # flags win
    assert cli("--temperature", "0") == ours(temperature=0.0)
    # eos_token_id from the file: stop at whatever greedy decoding makes third
    greedy = llama4.generate(model, prompt, 16)
    cfg_file = d / "generation_config.json"
    saved = cfg_file.read_text()
    try:
        cfg_file.write_text(json.dumps({**json.loads(saved), "do_sample": False, "eos_token_id": greedy[2]}))
        assert cli() == tok.decode(greedy[:greedy.index(greedy[2])]) + "\n"
    finally:
        cfg_file.write_text(saved)


def test_help_states_effective_defaults(capsys):
    for cmd in ("generate", "chat", "serve"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "generation_config.json" in out, cmd
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    assert "else 0.7" in " ".join(capsys.readouterr().out.split())


def test_server_defaults_from_generation_config(export):
    from llama4.infer.engine import Engine, EngineConfig
    from llama4.infer.model_dir import generation_defaults
    from llama4.server.app import Server
    from llama4.server.protocol import ChatCompletionRequest

    d, tok, model = export
    srv = Server(Engine(model, EngineConfig(max_batch=1)), tok, "m", generation=generation_defaults(d))
    req = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    p = srv._params(req)
    assert (p.temperature, p.top_p) == (0.6, 0.9) and srv.chat_stops == tok.stop_tokens
    p = srv._params(ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0))
    assert p.temperature == 0
