"""Supervised fine-tuning (``llama4 sft``): next-token cross-entropy on the assistant's tokens only.

    from llama4.posttrain.sft import sft
    sft("runs/base", "runs/sft", data="chats.jsonl", max_steps=200)

The data (TRL conversational JSONL, or the verifiable tasks' train split) is read and checked
first (:mod:`llama4.posttrain.chat_data`), then the run is built from the base model
(:mod:`llama4.posttrain.stage`) and trained by ``llama4.train.train_step`` with :func:`sft_loss`.
Batches are padded, one conversation per row (no packing: the model has no document mask, so
packed conversations would attend to each other). The loss of a micro-batch is the mean over its
assistant tokens (TRL's ``SFTTrainer`` with ``assistant_only_loss``); the padding positions still
pass through the MoE router, so they count in the (small) balance loss.
"""

from __future__ import annotations

import os
import time

import torch.nn.functional as F

from llama4.posttrain.chat_data import (IGNORE_INDEX, SFTLoader, build_examples, load_messages_jsonl, pad_id_of,
                                        task_conversations)
from llama4.posttrain.stage import build_stage_run, open_base, run_stage, stage_config
from llama4.train.step import LossOutput

# What a fine-tune of a small model wants (the pretraining recipes warm up over 50+ steps at 3e-3).
DEFAULTS = dict(lr=3e-4, batch_size=8, seq_len=512, max_steps=200, warmup_steps=10, weight_decay=0.0,
                schedule="cosine")


def sft_loss(run, batch) -> LossOutput:
    """Mean cross-entropy over the micro-batch's assistant tokens (labels != IGNORE_INDEX).

    Under data parallelism the mean is over the *global* micro-batch's assistant tokens (their
    count is summed over the data ranks; times ``world_size`` because the gradients are averaged
    over ranks), so N processes compute what one process reading the whole batch would."""
    rt = run.rt
    x, y = batch.inputs.to(rt.device), batch.labels.to(rt.device)
    with run.autocast():
        logits = run.model(x)  # (B, L, V)
    n = (y != IGNORE_INDEX).sum().float()
    if rt.dist is not None and rt.world_size > 1:
        rt.dist.dims.all_reduce_data(n)
    total = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return LossOutput(total / n.clamp(min=1) * rt.world_size, {"assistant_tokens": n.item()})


def next_sft_batch(run):
    return run.loader.next_batch()


def sft(base, out, data=None, tasks=None, *, max_steps=None, lr=None, batch_size=None, seq_len=None,
        resume: bool = False, seed: int = 0, n_per_task: int = 200, difficulty: int = 1, truncate: bool = False,
        group_by_length: bool = False, overrides: dict | None = None, parallel=None, lora=None) -> dict:
    """Fine-tune the model in ``base`` on ``data`` (a JSONL path) or ``tasks`` (task names) into
    ``out``. ``overrides`` sets any other TrainConfig field. ``parallel`` (a
    ``llama4.distributed.ParallelConfig``): run as this process's share of a torchrun job, with
    ``batch_size`` per data rank, as ``llama4 train`` does. ``group_by_length``: batches of similar
    lengths (:class:`~llama4.posttrain.chat_data.SFTLoader`). Returns the summary (``{}`` off rank 0)."""
    started = time.perf_counter()
    if (data is None) == (not tasks):
        raise ValueError("give exactly one of --data FILE.jsonl or --tasks NAME[,NAME]")
    fields = dict(DEFAULTS)
    for k, v in (("max_steps", max_steps), ("lr", lr), ("batch_size", batch_size), ("seq_len", seq_len)):
        if v is not None:
            fields[k] = v
    fields["seed"] = seed
    fields.update(overrides or {})
    if n_per_task < 1:
        raise ValueError(f"--n-per-task must be >= 1, got {n_per_task}")

    base_model = open_base(base)  # checks the base before anything is written
    cfg = stage_config(base_model, "sft", **fields)
    if cfg.seq_len > base_model.args.max_seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} exceeds the base model's max_seq_len {base_model.args.max_seq_len}")
    if data is not None:
        convs = load_messages_jsonl(data)
        source = {"data": os.path.abspath(data)}
    else:
        names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
        convs = task_conversations(names, n_per_task, seed=seed, difficulty=difficulty)
        source = {"tasks": names, "n_per_task": n_per_task, "difficulty": difficulty}
    tok = base_model.tokenizer
    examples = build_examples(tok, convs, cfg.seq_len, truncate=truncate)
    drun = parallelize = None
    if parallel is not None:
        from llama4.distributed.run import distributed_run

        drun = distributed_run(cfg, parallel)
        rt, parallelize = drun.runtime(), drun.parallelize
    else:
        from llama4.train.run import Runtime, pick_device

        rt = Runtime(pick_device(cfg.device))
    try:
        return _train(base_model, cfg, out, examples, source, rt, parallelize, resume, seed, started, lora,
                      group_by_length)
    finally:
        if drun is not None:
            drun.close()


def _train(base_model, cfg, out, examples, source, rt, parallelize, resume, seed, started, lora=None,
           group_by_length=False) -> dict:
    tok = base_model.tokenizer
    loader = SFTLoader(examples, cfg.batch_size, pad_id_of(tok), seed=seed, rank=rt.rank, world_size=rt.world_size,
                       group_by_length=group_by_length)
    run = build_stage_run(base_model, cfg, out, loader, resume=resume, runtime=rt, parallelize=parallelize,
                          lora=lora)
    n_tokens = sum(sum(y != IGNORE_INDEX for y in ys) for _, ys in examples)
    summary = {"base": str(base_model.dir), **source, "examples": len(examples), "assistant_tokens": n_tokens,
               "epochs": round(cfg.max_steps * cfg.batch_size * cfg.grad_accum * rt.world_size / len(examples), 2)}
    run.say(f"sft: {len(examples)} conversations ({n_tokens} assistant tokens) from "
            f"{source.get('data') or ','.join(source['tasks'])}; base {base_model.dir}")
    return run_stage(run, next_sft_batch, sft_loss, resume=resume, started=started, summary=summary)


__all__ = ["sft", "sft_loss", "next_sft_batch", "DEFAULTS"]
