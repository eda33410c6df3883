"""One tokenizer and one tokenized corpus for the whole study, then one training run per variant x seed.

A run is the training loop's own (``llama4.train.setup``: a fresh model of the variant's
ModelArgs, AdamW without decay on norms/embeddings, warmup 10% then cosine, clip 1.0; the
post-training stages' ``run_stage`` loop with the study's batches and loss), so its folder is an
ordinary run folder: ``metrics.jsonl``, ``loss.png``, ``summary.json`` and ``final/``, which every
``llama4`` command loads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from llama4.experiments.irope.passkey import StudyBatches, study_loss
from llama4.experiments.irope.spec import StudySpec, variant_args
from llama4.train.config import TrainConfig


def _config(spec: StudySpec, name: str, seed: int, model, shared: Path | None, progress: bool) -> TrainConfig:
    return TrainConfig(
        name=name, model=model, seed=seed, seq_len=spec.train_len, batch_size=spec.corpus_rows,
        max_steps=spec.steps, lr=spec.lr, warmup_steps=max(1, spec.steps // 10), schedule="cosine",
        min_lr_ratio=0.1, grad_clip=1.0, tokenizer_doc_stride=spec.tokenizer_doc_stride,
        tokenizer=str(shared / "tokenizer.model") if shared else None,
        data_dir=str(shared / "data") if shared else None, dtype="float32", checkpoint_every=spec.steps,
        keep_checkpoints=1, log_every=max(1, spec.steps // 50), eval_batches=0, final_eval_batches=0,
        load_eval_windows=0, sample_tokens=0, progress=progress)


def prepare_shared(shared: Path, spec: StudySpec, say) -> Path:
    """``shared/tokenizer.model`` (a BPE of ``spec.vocab_size``) and ``shared/data`` (the corpus in it)."""
    from llama4.tokenizer import Tokenizer
    from llama4.train.prepare import prepare_data, prepare_tokenizer

    shared.mkdir(parents=True, exist_ok=True)
    cfg = _config(spec, "shared", 0, variant_args("irope", spec), None, False)
    tok_path = prepare_tokenizer(cfg, shared, say)
    prepare_data(cfg, shared, tok_path, Tokenizer(tok_path), say)
    return shared


def train_variant(shared: Path, out: Path, spec: StudySpec, variant: str, seed: int, progress: bool) -> dict:
    """Train ``variant`` with ``seed`` into ``out`` (from scratch: a half-finished folder is
    cleared first, as the batches are a function of the step); returns its ``summary.json``."""
    from llama4.posttrain.stage import run_stage
    from llama4.train import setup

    if out.exists():
        shutil.rmtree(out)
    cfg = _config(spec, f"{variant}-s{seed}", seed, variant_args(variant, spec), shared, progress)
    run = setup(cfg, out)
    batches = StudyBatches(run.tokenizer, spec.train_len, spec.passkey_rows, seed, spec.repeat_rows)
    return run_stage(run, batches, study_loss, summary={"variant": variant, "seed": seed})


def _train_job(shared: str, out: str, spec: StudySpec, variant: str, seed: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    return train_variant(Path(shared), Path(out), spec, variant, seed, progress=False)


def train_all(runs_dir: Path, shared: Path, spec: StudySpec, jobs: list[tuple[str, int]], workers: int,
              threads: int, say) -> dict[tuple[str, int], dict]:
    """Train every (variant, seed) of ``jobs`` whose ``runs_dir/<variant>-s<seed>/final`` is missing,
    ``workers`` at a time (separate processes of ``threads`` threads each: at this model size two
    1-thread runs side by side finish sooner than two 2-thread runs one after the other)."""
    import json
    import time
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    def folder(v, s):
        return runs_dir / f"{v}-s{s}"

    todo = [(v, s) for v, s in jobs if not (folder(v, s) / "final" / "config.json").is_file()
            or not (folder(v, s) / "summary.json").is_file()]
    if todo:
        say(f"training {len(todo)} run(s) of {spec.steps} steps, {workers} at a time x {threads} thread(s): "
            + ", ".join(f"{v}-s{s}" for v, s in todo))
    t0 = time.perf_counter()
    if workers <= 1:
        for v, s in todo:
            _train_job(str(shared), str(folder(v, s)), spec, v, s, threads)
            say(f"  {v}-s{s} done ({time.perf_counter() - t0:.0f}s)")
    elif todo:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_train_job, str(shared), str(folder(v, s)), spec, v, s, threads): (v, s)
                       for v, s in todo}
            for f, (v, s) in futures.items():
                f.result()
                say(f"  {v}-s{s} done ({time.perf_counter() - t0:.0f}s)")
    return {(v, s): json.loads((folder(v, s) / "summary.json").read_text()) for v, s in jobs}
