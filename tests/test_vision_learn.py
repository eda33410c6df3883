"""Smoke test of the learns-to-see recipe (the full run is a recorded measurement, see README): the
data set, the SFT masks, a few training steps that lower the loss, evaluation, and a saved model
directory that `llama4.load` reads back as the same multimodal model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oracles import require

require("sklearn")

import llama4  # noqa: E402
from llama4.model import MultimodalTransformer  # noqa: E402
from llama4.vision.digits import LANGUAGES, NUMBER_WORDS, DigitsVQA, answer  # noqa: E402
from llama4.vision.learn import Prompts, SeeConfig, build_model, build_tokenizer, evaluate, greedy, train  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("see")
    data = DigitsVQA.build(tile_size=28)
    tok = build_tokenizer(data, d / "tokenizer.model", merges=200)
    torch.manual_seed(0)
    model = build_model(tok)
    return d, data, tok, model, Prompts(tok, data, model.vision_args.tokens_per_tile)


def test_data_set(setup):
    _, data, tok, _, prompts = setup
    assert data.pixel_values.shape == (1797, 3, 28, 28) and data.pixel_values.dtype == torch.bfloat16
    assert len(set(data.train) & set(data.test)) == 0 and len(data.train) + len(data.test) == 1797
    assert sorted(np.unique(data.labels[data.test]).tolist()) == list(range(10))  # every digit held out
    assert len(LANGUAGES) >= 2 and answer(7, "fr") == "Le chiffre sept." and NUMBER_WORDS["de"][5] == "fünf"
    ids, mask = prompts.train["es", 0, 3]
    patch = tok.special_tokens["<|patch|>"]
    assert ids.count(patch) == 4  # one 28 px tile, 4 tokens after the pixel shuffle
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert trained == "El dígito tres.<|eot|>"  # the loss sees the answer only


def test_a_few_steps_lower_the_loss_and_the_model_round_trips(setup):
    d, data, tok, model, prompts = setup
    logs = []
    hist = train(SeeConfig(steps=12, batch=16, warmup=3, lr=3e-3), model, data, prompts, log=logs.append)
    assert hist[-1]["loss"] < hist[0]["loss"] - 1.0, hist
    res = evaluate(model, tok, data, prompts, indices=data.test[:3])
    assert set(res["accuracy"]) == set(LANGUAGES) and len(res["samples"]) == 3 * sum(3 for _ in LANGUAGES)

    llama4.save(model, d / "model")
    back = llama4.load(d / "model")
    assert isinstance(back, MultimodalTransformer) and back.image_token_id == tok.special_tokens["<|patch|>"]
    prompt = torch.tensor(prompts.ask("de", 1)).expand(2, -1)
    px = data.pixel_values[data.test[:2]].float()
    assert greedy(back, prompt, px, 5, set(tok.stop_tokens)) == greedy(model, prompt, px, 5, set(tok.stop_tokens))
