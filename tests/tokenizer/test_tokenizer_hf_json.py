"""A Hugging Face tokenizer.json (read with the `tokenizers` library) gives the same ids as the
tiktoken path. The file is built from the official tokenizer.model by transformers' own
TikTokenConverter, the converter the hub's Llama 4 tokenizer.json comes from."""

from __future__ import annotations

import json

import pytest

from llama4.data.corpus import load_documents
from llama4.tokenizer import SPECIAL_TOKEN_NAMES, SPLIT_PATTERN, TokenizerFileError, load_tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tok):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    conv = TikTokenConverter(
        vocab_file=str(tok.path), pattern=SPLIT_PATTERN, extra_special_tokens=list(SPECIAL_TOKEN_NAMES)
    )
    d = tmp_path_factory.mktemp("hf_model")
    conv.converted().save(str(d / "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return load_tokenizer(hf_dir)  # a model folder with only tokenizer.json


def test_reads_tokenizer_json(hf_tok, tok):
    assert hf_tok.format == "hf_json"
    assert hf_tok.special_tokens == tok.special_tokens
    assert hf_tok.n_words == tok.n_words == 202048
    assert (hf_tok.bos_id, hf_tok.eot_id, hf_tok.pad_id) == (tok.bos_id, tok.eot_id, tok.pad_id)


def test_ids_identical_to_tiktoken(hf_tok, tok, multilingual):
    assert hf_tok.encode(multilingual, bos=True, eos=True) == tok.encode(multilingual, True, True)
    texts = [d.text[:2000] for d in load_documents()[::5]]
    assert hf_tok.encode_batch(texts) == tok.encode_batch(texts)
    long = ("ab" * 20_000 + " " * 30_000) * 2 + "q" * 26_000
    assert hf_tok.encode(long) == tok.encode(long)


def test_specials_not_injected_and_decode(hf_tok, tok, multilingual):
    ids = hf_tok.encode("x <|eot|><|image|> y")
    assert ids == tok.encode("x <|eot|><|image|> y")
    assert not any(hf_tok.is_special(i) for i in ids)
    ids = tok.encode(multilingual, bos=True) + [tok.eot_id]
    assert hf_tok.decode(ids) == tok.decode(ids)
    assert hf_tok.decode_bytes(ids[:-3]) == tok.decode_bytes(ids[:-3])


def test_not_a_llama4_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models

    t = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerFileError, match="not a Llama 4 tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "broken.json").write_text(json.dumps({"model": {"type": "nonsense"}}))
    with pytest.raises(TokenizerFileError, match="not a readable tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")
