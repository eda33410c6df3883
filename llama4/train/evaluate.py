"""Validation loss per language, expert load on held-out text, samples, and a language check.

Everything here is read-only on the model and uses no random state of the training run (the
samples use their own seeded generator), so evaluating never changes what training computes.
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from llama4.data.loader import val_batches, val_languages
from llama4.train.losses import moe_layers, record_router_stats

# In-domain prompts (the corpus's main languages are LibreOffice help pages).
PROMPTS = {
    "eng": "To insert a new table,",
    "deu": "Um eine neue Tabelle einzufügen,",
    "fra": "Pour insérer un nouveau tableau,",
    "spa": "Para insertar una tabla nueva,",
    "ita": "Per inserire una nuova tabella,",
    "por": "Para inserir uma nova tabela,",
    "pol": "Aby wstawić nową tabelę,",
    "tur": "Yeni bir tablo eklemek için",
    "vie": "Để chèn một bảng mới,",
    "rus": "Чтобы вставить новую таблицу,",
    "ell": "Για να εισαγάγετε έναν νέο πίνακα,",
    "jpn": "新しい表を挿入するには、",
    "kor": "새 표를 삽입하려면",
    "cmn": "要插入新表格，",
}


@torch.no_grad()
def evaluate(model, data_dir: Path, batch_size: int, seq_len: int, max_batches: int, device,
             autocast=contextlib.nullcontext, unigram_logp: np.ndarray | None = None,
             tokenizer=None) -> dict:
    """Per-language validation loss on the first ``max_batches`` batches of each language.

    Returns ``{"val_loss": {lang: nats/token}, "val_loss_mean": over all evaluated tokens,
    "loads": (n_moe, E) tokens per expert, and, when given a unigram table / tokenizer,
    "unigram": {lang: nats/token on the same targets}, "bits_per_byte": {lang: ...}}``."""
    layers = moe_layers(model)
    record_router_stats(model)
    loads = None
    out = {"val_loss": {}, "unigram": {}, "bits_per_byte": {}}
    total_loss, total_n = 0.0, 0
    for lang in val_languages(data_dir):
        loss_sum, n, uni_sum, n_bytes = 0.0, 0, 0.0, 0
        for b in val_batches(data_dir, batch_size, seq_len, lang, max_batches):
            x, y = b.inputs.to(device), b.targets.to(device)
            with autocast():
                logits = model(x)
            loss_sum += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                                          reduction="sum").item()
            n += y.numel()
            if layers:
                step_loads = torch.stack([m.tokens_per_expert for _, m in layers]).cpu()
                loads = step_loads if loads is None else loads + step_loads
                for _, m in layers:
                    m.router_logits = None
            if unigram_logp is not None:
                uni_sum -= float(unigram_logp[b.targets.numpy()].sum())
            if tokenizer is not None:
                n_bytes += sum(len(tokenizer.decode_bytes(row)) for row in b.targets.tolist())
        if n == 0:
            continue
        out["val_loss"][lang] = loss_sum / n
        if unigram_logp is not None:
            out["unigram"][lang] = uni_sum / n
        if n_bytes:
            out["bits_per_byte"][lang] = loss_sum / math.log(2) / n_bytes
        total_loss += loss_sum
        total_n += n
    out["val_loss_mean"] = total_loss / total_n if total_n else float("nan")
    out["loads"] = loads.tolist() if loads is not None else None
    return out


@torch.no_grad()
def expert_load(model, data_dir: Path, split: str, seq_len: int, n_windows: int, batch_size: int, device,
                autocast=contextlib.nullcontext) -> list[list[int]] | None:
    """Tokens per expert (n_moe, E) on ``n_windows`` sequences spread evenly over the whole
    ``split`` stream, i.e. in that split's mixture of languages (the per-language validation
    batches weigh every language equally instead). On ``"train"`` this measures the balance on
    the distribution the balancing targets; on ``"val"``, on held-out pages (the same help pages
    in every main language, so topically narrower than the training text)."""
    from llama4.data.packing import TokenStream

    layers = moe_layers(model)
    if not layers:
        return None
    record_router_stats(model)
    stream = TokenStream(data_dir, split)
    last = stream.n_tokens - seq_len - 1
    starts = np.linspace(0, last, num=n_windows).astype(np.int64)
    loads = None
    for lo in range(0, len(starts), batch_size):
        b = stream.batch(starts[lo:lo + batch_size], seq_len)
        with autocast():
            model(b.inputs.to(device))
        step = torch.stack([m.tokens_per_expert for _, m in layers]).cpu()
        loads = step if loads is None else loads + step
        for _, m in layers:
            m.router_logits = None
    return loads.tolist()


@torch.no_grad()
def samples(model, tokenizer, langs, max_new_tokens: int, seed: int = 0, temperature: float = 0.7,
            top_k: int = 40) -> list[dict]:
    """One continuation of :data:`PROMPTS` per language (sampled, seeded; stops at end of text)."""
    from llama4.infer.generation import generate

    langs = [lang for lang in langs if lang in PROMPTS]
    prompts = [tokenizer.encode(PROMPTS[lang], bos=True) for lang in langs]
    stop = [tokenizer.eos_id, getattr(tokenizer, "eot_id", tokenizer.eos_id)]
    outs = generate(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, stop=stop)
    res = []
    for lang, ids in zip(langs, outs):
        ids = [t for t in ids if not tokenizer.is_special(t)]
        res.append({"lang": lang, "prompt": PROMPTS[lang], "text": tokenizer.decode(ids)})
    return res


class LanguageID:
    """Naive Bayes over character 1-3-grams, fitted on the training split of the main languages:
    a cheap, objective check that a sample is written in the language it was prompted in."""

    def __init__(self, langs=tuple(PROMPTS), chars_per_lang: int = 60_000):
        from llama4.data.corpus import iter_corpus

        self.langs = list(langs)
        self.logp: dict[str, dict[str, float]] = {}
        self.floor: dict[str, float] = {}
        for lang in self.langs:
            text, n = [], 0
            for d in iter_corpus("train", langs=(lang,)):
                text.append(d.text)
                n += len(d.text)
                if n >= chars_per_lang:
                    break
            counts = Counter(self._grams("\n".join(text)[:chars_per_lang]))
            total = sum(counts.values()) + len(counts) + 1
            self.logp[lang] = {g: math.log((c + 1) / total) for g, c in counts.items()}
            self.floor[lang] = math.log(1 / total)

    @staticmethod
    def _grams(text: str):
        text = " ".join(text.lower().split())
        for k in (1, 2, 3):
            for i in range(len(text) - k + 1):
                yield text[i:i + k]

    def __call__(self, text: str) -> str:
        grams = list(self._grams(text))
        if not grams:
            return "?"
        scores = {lang: sum(self.logp[lang].get(g, self.floor[lang]) for g in grams) for lang in self.langs}
        return max(scores, key=scores.get)


@torch.no_grad()
def routing_agreement(model, data_dir: Path, batch_size: int, seq_len: int, max_batches: int, device) -> float:
    """Fraction of validation tokens whose routed experts are the same with and without the
    trained selection bias: how faithfully a bias-free export (the HF layout) routes."""
    layers = moe_layers(model)
    if not layers:
        return 1.0
    saved = [m.expert_bias.clone() for _, m in layers]
    same, total = 0, 0
    for lang in val_languages(data_dir):
        for b in val_batches(data_dir, batch_size, seq_len, lang, max_batches):
            picks = []
            for use_bias in (True, False):
                for (_, m), bias in zip(layers, saved):
                    m.expert_bias.copy_(bias if use_bias else torch.zeros_like(bias))
                got = []
                hooks = [m.router.register_forward_hook(
                    lambda mod, inp, out, m=m, got=got: got.append(
                        torch.topk(out + m.expert_bias, m.top_k, -1).indices.sort(-1).values))
                    for _, m in layers]
                model(b.inputs.to(device))
                for h in hooks:
                    h.remove()
                picks.append(got)
            for a, c in zip(*picks):
                same += (a == c).all(-1).sum().item()
                total += a.shape[0]
    for (_, m), bias in zip(layers, saved):
        m.expert_bias.copy_(bias)
    return same / max(total, 1)
