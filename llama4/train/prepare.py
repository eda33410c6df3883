"""A run's tokenizer and token shards: trained / prepared once into the run folder, reused on resume.

    OUT/tokenizer.model   our own byte-level BPE of ``model.vocab_size`` tokens, learned from the
                          embedded corpus (or a copy of ``TrainConfig.tokenizer``)
    OUT/data/             the embedded corpus tokenized with it (or ``TrainConfig.data_dir``)
"""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from llama4.data.packing import TokenStream
from llama4.data.shards import MANIFEST, prepare_embedded_corpus, read_manifest
from llama4.tokenizer import Tokenizer


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prepare_tokenizer(cfg, out: Path, say: Callable[[str], None]) -> Path:
    """-> path of the run's tokenizer file inside ``out``."""
    if cfg.tokenizer is not None:
        src = Path(cfg.tokenizer)
        if src.is_dir():
            src = next((src / n for n in ("tokenizer.model", "tokenizer.json") if (src / n).is_file()), src)
        if not src.is_file():
            raise FileNotFoundError(f"TrainConfig.tokenizer: no tokenizer file at {cfg.tokenizer}")
        dst = out / src.name
        if not dst.exists() or _sha256(dst) != _sha256(src):
            shutil.copyfile(src, dst)
        return dst
    dst = out / "tokenizer.model"
    if dst.is_file():
        return dst  # resume: the same tokenizer, not a re-trained one
    from llama4.data.corpus import iter_corpus
    from llama4.tokenizer.bpe import train_tokenizer_file

    t0 = time.perf_counter()
    docs = [d.text for d in iter_corpus("train")][:: cfg.tokenizer_doc_stride]
    train_tokenizer_file(docs, cfg.model.vocab_size, dst)
    say(f"trained a {cfg.model.vocab_size}-token BPE on {sum(map(len, docs)) / 1e6:.1f}M characters of the "
        f"embedded corpus in {time.perf_counter() - t0:.1f}s -> {dst}")
    return dst


def prepare_data(cfg, out: Path, tok_path: Path, tok: Tokenizer, say: Callable[[str], None]) -> Path:
    """-> a prepared shard folder tokenized with ``tok``."""
    if cfg.data_dir is not None:
        data = Path(cfg.data_dir)
        m = read_manifest(data)
        used = m["tokenizer"].get("path")
        if m["tokenizer"]["n_words"] != tok.n_words or (
                used and Path(used).is_file() and _sha256(Path(used)) != _sha256(tok_path)):
            raise ValueError(f"TrainConfig.data_dir: {data} was tokenized with {used} "
                             f"({m['tokenizer']['n_words']} tokens), not with this run's tokenizer {tok_path}")
        return data
    data = out / "data"
    if (data / MANIFEST).is_file():
        m = read_manifest(data)
        if m["tokenizer"].get("path") == str(tok_path) and m["tokenizer"]["n_words"] == tok.n_words:
            return data
    t0 = time.perf_counter()
    m = prepare_embedded_corpus(tok, data, progress=False)
    n = {s: sum(x["n_tokens"] for x in m["shards"] if x["split"] == s) for s in ("train", "val")}
    say(f"tokenized the embedded corpus: {n['train']:,} train / {n['val']:,} val tokens in "
        f"{time.perf_counter() - t0:.1f}s -> {data}")
    return data


def unigram_stats(data_dir: Path, vocab_size: int) -> dict:
    """Unigram entropy of the training tokens (nats/token), the model that knows token frequencies
    and nothing else, and its cross-entropy on the validation tokens (add-one smoothing)."""
    train = TokenStream(data_dir, "train")
    counts = np.zeros(vocab_size, dtype=np.int64)
    for mm in train._tokens:
        counts += np.bincount(np.asarray(mm), minlength=vocab_size)[:vocab_size]
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = float(-(nz * np.log(nz)).sum())
    smoothed = np.log((counts + 1) / (counts.sum() + vocab_size))
    val = TokenStream(data_dir, "val")
    vcounts = np.zeros(vocab_size, dtype=np.int64)
    for mm in val._tokens:
        vcounts += np.bincount(np.asarray(mm), minlength=vocab_size)[:vocab_size]
    val_ce = float(-(vcounts * smoothed).sum() / vcounts.sum())
    return {"unigram_entropy": entropy, "unigram_val_ce": val_ce, "log_probs": smoothed}
