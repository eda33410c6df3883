"""The study's training batches: pretraining text plus passkey prompts in the needle probe's format.

A model can only be asked to retrieve what it was taught to retrieve, so every step mixes
``corpus_rows`` windows of the pretraining corpus with ``passkey_rows`` prompts built by the needle
probe's own ``build_prompt`` (completion format: the instruction, a haystack with "The special
magic number is 4728193." at a uniform random depth, the question, and the primer "The special
magic number is"), each followed by its answer. Half the haystacks are the probe's random
sentences, half the corpus's training text (any language). The loss is next-token cross-entropy on
every token of every row (a haystack is text too, and its repeats teach copying) plus the mean
cross-entropy of the answers' tokens alone: the few tokens that need retrieval are not drowned by
the thousands that do not. (A first run that scored the passkey rows on their answers only had not
begun to retrieve after 740 of 1,000 steps: its answer loss sat at the no-retrieval floor, about
7 ln 10 / 9 nats per answer token.) Everything is a function of ``(seed, step)``: a run is
reproducible from its seed.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from llama4.eval.needle import Needle, build_prompt, filler_ids
from llama4.train.step import LossOutput

def passkey_row(tok, length: int, rng: random.Random, corpus) -> tuple[list[int], int]:
    """(``length`` + 1 ids: prompt then answer, index of the answer's first id)."""
    needle = Needle.make("passkey", rng)
    answer = tok.encode(f" {needle.answer}.")
    prompt_len = length + 1 - len(answer)
    if rng.random() < 0.5:
        filler = filler_ids(tok, "random", prompt_len, seed=rng.randrange(1 << 30))
    else:  # a window of the training split's tokens
        start = rng.randrange(0, len(corpus) - prompt_len)
        filler = corpus.read(start, prompt_len).tolist()
    ids = build_prompt(tok, filler, needle, prompt_len, 100.0 * rng.random(), fmt="completion")
    return ids + answer, prompt_len


def repeat_row(length: int, rng: random.Random, corpus) -> list[int]:
    """``length`` + 1 ids: a random corpus segment of 16-64 tokens, repeated. Past its first copy every
    token is predictable only by copying from one segment back: the induction heads retrieval is built on."""
    n = rng.randint(16, 64)
    seg = corpus.read(rng.randrange(0, len(corpus) - n), n).tolist()
    return (seg * (length // n + 2))[:length + 1]


class StudyBatches:
    """``batch_fn`` of the training loop: (inputs, targets, answer mask)."""

    def __init__(self, tok, seq_len: int, passkey_rows: int, seed: int, repeat_rows: int = 0):
        self.tok, self.seq_len, self.passkey_rows, self.seed = tok, seq_len, passkey_rows, seed
        self.repeat_rows = repeat_rows
        self.step = 0

    def __call__(self, run):
        corpus = run.loader.next_batch()
        rng = random.Random(f"passkey/{self.seed}/{self.step}")
        self.step += 1
        rows, answers = [], []
        for _ in range(self.passkey_rows):
            ids, at = passkey_row(self.tok, self.seq_len, rng, run.loader.stream)
            rows.append(torch.tensor(ids))
            answer = torch.zeros(self.seq_len, dtype=torch.bool)
            answer[at - 1:] = True  # targets[i] = ids[i + 1]: the answer's ids
            answers.append(answer)
        for _ in range(self.repeat_rows):
            rows.append(torch.tensor(repeat_row(self.seq_len, rng, run.loader.stream)))
            answers.append(torch.zeros(self.seq_len, dtype=torch.bool))
        rows = torch.stack(rows)
        x = torch.cat([corpus.inputs, rows[:, :-1]])
        y = torch.cat([corpus.targets, rows[:, 1:]])
        mask = torch.cat([torch.zeros_like(corpus.inputs, dtype=torch.bool), torch.stack(answers)])
        return x, y, mask


def study_loss(run, batch) -> LossOutput:
    """Next-token loss on every token + loss on the passkey answers; logs both and answer-token accuracy."""
    x, y, answer = (t.to(run.rt.device) for t in batch)
    with run.autocast():
        logits = run.model(x).float()
    lm = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    key_logits, key_y = logits[answer], y[answer]
    key = F.cross_entropy(key_logits, key_y)
    acc = (key_logits.argmax(-1) == key_y).float().mean()
    return LossOutput(lm + key, {"lm_loss": lm.detach(), "passkey_loss": key.detach(), "passkey_token_acc": acc})
