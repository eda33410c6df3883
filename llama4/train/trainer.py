"""The training loop: flat, top to bottom, nanoGPT-style; its pieces in their own files.

    from llama4.recipes import get_recipe
    from llama4.train import train
    summary = train(get_recipe("debug"), "runs/debug")

Run folder: ``train_config.json`` (not config.json: ``OUT/`` must keep resolving to ``OUT/final``
for ``llama4 serve --model OUT``), ``tokenizer.model``, ``data/``, ``checkpoints/``,
``metrics.jsonl``, ``loss.png``, ``expert_load.png``, ``summary.json``, ``final/``.

The pieces (torchtitan's separation), each usable on its own:

    run.py     setup(cfg, out, ...) -> Run     tokenizer, shards, loader, model, optimizer groups, schedule,
                                               autocast, MoE layers, metrics log, distributed runtime
               resume(run, state), save(run, state)   one checkpoint payload for both savers
    state.py   TrainState                      step, tokens, bad steps, meters, elapsed; state_dict()
    step.py    train_step(run, state) -> StepStats    accumulation, MoE balance, clipping, non-finite skip
    finish.py  finish(run, state) -> summary    final evaluation, samples, plots, HF export, report

Plugging in another stage (SFT, DPO, RL): build the run with ``setup`` (replace ``run.loader``
with the stage's own loader if it checkpoints a position: anything with ``next_batch`` /
``state_dict`` / ``load_state_dict``), and run a loop like :func:`train`'s below with

    stats = train_step(run, state, batch_fn=my_batches, loss_fn=my_loss)

``batch_fn(run) -> batch`` reads one micro-batch; ``loss_fn(run, batch) -> LossOutput(loss,
metrics)`` runs ``run.model`` under ``run.autocast()`` once (the MoE balance and z-losses are taken
from that forward's router stats and added by the step; a pair of sequences, as DPO's chosen and
rejected, go through as one batch) and returns the scalar to minimise plus any numbers to log
(averaged over the logging interval into each ``metrics.jsonl`` record, e.g. a reward margin).
Accumulation, clipping, the non-finite skip, the bias update, ``TrainState`` and the checkpoints
stay the same for every stage.

Seams for the distributed room: ``parallelize(model, cfg) -> model`` is applied after the model
is built and before the optimizer sees it (FSDP2 / EP / TP wrap from outside), the loader takes
``rank`` / ``world_size`` from :class:`Runtime`, and only rank 0 logs, prints and writes files.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import torch

from llama4.train.config import TrainConfig
from llama4.train.finish import export_final, finish
from llama4.train.log import Progress
from llama4.train.run import (FAULT_ENV, Run, Runtime, apply_compile, build_model, die, fault, pick_autocast,
                              pick_device, resume as resume_run, save, setup)
from llama4.train.state import Meter, TrainState
from llama4.train.step import LossOutput, StepStats, TrainingDiverged, lm_loss, next_lm_batch, train_step

__all__ = ["train", "setup", "save", "train_step", "finish", "Run", "Runtime", "TrainState", "Meter",
           "StepStats", "LossOutput", "lm_loss", "next_lm_batch", "TrainingDiverged", "export_final", "build_model",
           "apply_compile", "pick_autocast", "pick_device", "FAULT_ENV"]


def train(cfg: TrainConfig, out: str | os.PathLike, resume: bool = False,
          parallelize: Callable[[torch.nn.Module, TrainConfig], torch.nn.Module] | None = None,
          runtime: Runtime | None = None) -> dict:
    """Run (or continue, with ``resume``) the training described by ``cfg`` in folder ``out``.
    Returns the summary also written to ``OUT/summary.json`` (``{}`` on ranks other than 0)."""
    started = time.perf_counter()  # data preparation counts towards the run's time
    run = setup(cfg, out, resume=resume, parallelize=parallelize, runtime=runtime)
    state = TrainState(meter=Meter(len(run.moe), cfg.model.n_experts), started=started)
    if resume:
        resume_run(run, state)
    if run.rt.is_main:
        (run.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    run.say(run.describe())

    run.bar = Progress(cfg.max_steps, state.step, cfg.progress and run.rt.is_main)
    t_log = time.perf_counter()
    while state.step < cfg.max_steps:
        stats = train_step(run, state)
        if fault("kill-after-step", state.step):
            die()

        step = state.step
        t_log = run.log_step(state, stats.lr, t_log)
        if step % cfg.eval_every == 0 and step < cfg.max_steps and cfg.eval_batches:
            res = run.log_eval(state, cfg.eval_batches)
            run.say(f"step {step}: val loss {res['val_loss_mean']:.3f}")
            t_log = time.perf_counter()  # evaluation time is not training throughput
        if (step % cfg.checkpoint_every == 0 or step == cfg.max_steps) and state.bad_steps == 0:
            save(run, state)
            t_log = time.perf_counter()
    run.bar.close()
    return finish(run, state)
