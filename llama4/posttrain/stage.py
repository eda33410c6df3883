"""What every post-training stage shares: a training :class:`~llama4.train.Run` built from an
existing model directory (not from scratch), the loop around ``train_step``, and the end of the run.

``llama4.train.setup`` builds a *new* model from its config and tokenizes the pretraining corpus;
a stage instead starts from a checkpoint and reads its own data. Everything else is the training
loop's own: optimizer groups (AdamW, no decay on norms/embeddings), LR schedule, ``train_step``
(accumulation, MoE balance/z-losses, clipping, non-finite skip), ``TrainState``, ``save`` /
``resume`` (one checkpoint payload; bit-identical continuation), ``metrics.jsonl``, the loss plot
and the ``OUT/final`` export. A stage is::

    from llama4.posttrain.stage import open_base, stage_config, build_stage_run, run_stage

    base = open_base("runs/base")                     # weights + the base's tokenizer.model, checked
    loader = MyLoader(..., base.tokenizer, ...)       # next_batch / state_dict / load_state_dict
    cfg = stage_config(base, "dpo", lr=5e-6, max_steps=100, batch_size=4, seq_len=512)
    run = build_stage_run(base, cfg, "runs/dpo", loader, resume=False)
    summary = run_stage(run, batch_fn=lambda run: run.loader.next_batch(), loss_fn=my_loss,
                        resume=False, summary={"stage": "dpo", ...})

Build the loader (which validates the data) *before* ``build_stage_run``: nothing is written to
``OUT`` until the data and the base have been checked, so bad input leaves no half-made folder.
``loss_fn(run, batch) -> LossOutput`` runs ``run.model`` under ``run.autocast()`` once per
micro-batch (see ``llama4/train/trainer.py``). A stage that needs a frozen reference model (DPO, RL's
KL) gets one with :func:`reference_model`. ``on_step(run, state, stats)`` is called after every
optimizer step (RL re-filters its prompts there); anything it changes that must survive a resume
belongs in the loader's ``state_dict``.

The run folder is the pretraining one: ``train_config.json`` (the stage's TrainConfig; ``--resume``
refuses a different one), ``tokenizer.model`` (the base's), ``checkpoints/``, ``metrics.jsonl``,
``loss.png``, ``summary.json`` and ``final/`` (HF layout + the base's tokenizer: ``llama4.load``,
``llama4 chat --model OUT``, ``llama4 serve --model OUT``). The optimizer state starts fresh
(the base's is not kept by ``llama4.save``) and the parametrization is the standard one.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from llama4.model import ModelArgs, Transformer, count_params
from llama4.tokenizer import Tokenizer
from llama4.tokenizer.files import atomic_write_bytes
from llama4.train.checkpointing import list_checkpoints
from llama4.train.config import TrainConfig
from llama4.train.finish import export_final
from llama4.train.log import MetricsLog, Progress, plot_losses, read_metrics
from llama4.train.optim import Schedule, build_optimizer
from llama4.train.run import Run, Runtime, die, fault, pick_autocast, pick_device, prepare_model, resume as resume_run
from llama4.train.state import Meter, TrainState
from llama4.train.step import LossOutput, StepStats, train_step

TOKENIZER_FILE = "tokenizer.model"


@dataclass
class BaseModel:
    """A checked starting point: the model (float32, CPU, train mode) and the tokenizer it keeps."""

    dir: Path  # the resolved HF-layout directory (``RUN/final`` for a run folder)
    model: Transformer
    tokenizer: Tokenizer
    tokenizer_path: Path

    @property
    def args(self) -> ModelArgs:
        return self.model.args


def open_base(path) -> BaseModel:
    """Load the model a stage starts from: a ``llama4.save`` directory or a training run folder
    (``RUN/final``). It must hold config.json, safetensors weights and its own ``tokenizer.model``
    (a stage keeps the base's tokenizer; falling back to another one would scramble every id)."""
    from llama4.checkpoint import CheckpointError
    from llama4.infer.model_dir import resolve_model_dir

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"base model directory not found: {p}")
    p = resolve_model_dir(p)
    if not p.is_dir():
        raise ValueError(f"base model {p} is not a directory")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"base model {p} has no config.json (nor final/config.json): expected a "
                                "`llama4.save` / Hugging Face directory or a training run folder")
    if not any(p.glob("*.safetensors")):
        raise FileNotFoundError(f"base model {p} has config.json but no *.safetensors weights")
    tok_path = p / TOKENIZER_FILE
    if not tok_path.is_file():
        raise FileNotFoundError(f"base model {p} has no {TOKENIZER_FILE}: a stage keeps the base's tokenizer; "
                                "copy the one it was trained with into the directory")
    import llama4

    try:
        model = llama4.load(p, dtype=torch.float32)
    except CheckpointError as e:
        raise ValueError(f"base model {p}: {e}") from None
    if not isinstance(model, Transformer):
        raise ValueError(f"base model {p} is multimodal ({type(model).__name__}); post-training takes a text model")
    tok = Tokenizer(tok_path)
    if tok.n_words > model.args.vocab_size:
        raise ValueError(f"base model {p}: its tokenizer has {tok.n_words} tokens but the model's vocabulary is "
                         f"{model.args.vocab_size}")
    return BaseModel(p, model.train(), tok, tok_path)


def stage_config(base: BaseModel, name: str, **overrides) -> TrainConfig:
    """The stage's TrainConfig: the base's model args and tokenizer, the pretraining evaluation
    and sampling switched off (a stage measures itself), plus ``overrides`` (any TrainConfig field)."""
    fields = dict(name=name, model=base.args, tokenizer=str(base.tokenizer_path.resolve()), warmup_steps=0,
                  eval_batches=0, final_eval_batches=0, load_eval_windows=0, sample_tokens=0, log_every=1,
                  checkpoint_every=50)
    fields.update(overrides)
    return TrainConfig(**fields)


def build_stage_run(base: BaseModel, cfg: TrainConfig, out, loader, resume: bool = False,
                    runtime: Runtime | None = None,
                    parallelize: Callable[[nn.Module, TrainConfig], nn.Module] | None = None,
                    lora=None) -> Run:
    """A :class:`Run` in ``out`` that trains ``base.model`` (moved to the run's device) on ``loader``
    with the training loop's optimizer and schedule. Refuses a folder that already holds checkpoints
    unless ``resume`` (then :func:`run_stage` continues from the newest). ``parallelize`` is the
    distributed room's hook, as in ``llama4.train.setup``. ``lora``: the parsed ``--lora-*`` flags
    (``llama4.posttrain.lora_args``); adapters go on before anything is written."""
    out = Path(out)
    rt = runtime or Runtime(pick_device(cfg.device))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and parallelize is None:
        raise RuntimeError("WORLD_SIZE > 1 but no parallelize hook: data parallelism is applied from outside")
    existing = list_checkpoints(out / "checkpoints")
    if existing and not resume:
        raise FileExistsError(f"{out} already holds checkpoints (latest step {existing[-1][0]}); pass --resume "
                              "to continue that run, or choose another --out")
    if cfg.parametrization != "standard":
        raise ValueError("post-training stages use the standard parametrization (the base's weights carry MetaP's "
                         "multipliers in its config)")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    autocast, compute_dtype = pick_autocast(cfg, rt.device)
    if lora is not None:  # after the seed: the adapters' initialisation is part of the run
        from llama4.posttrain.lora_args import lora_from_args

        lora_from_args(lora, base.model)

    tok_path = out / TOKENIZER_FILE
    with rt.dist.main_first() if rt.dist is not None else contextlib.nullcontext():
        if rt.is_main:
            out.mkdir(parents=True, exist_ok=True)
            data = base.tokenizer_path.read_bytes()
            if not tok_path.is_file() or tok_path.read_bytes() != data:
                atomic_write_bytes(tok_path, data)

    model, moe = prepare_model(base.model.to(device=rt.device, dtype=torch.float32).train(), cfg, parallelize)
    optimizer = build_optimizer(model, cfg, None)
    return Run(cfg=cfg, out=out, rt=rt, model=model, optimizer=optimizer, schedule=Schedule.from_config(cfg),
               loader=loader, moe=moe, autocast=autocast, compute_dtype=compute_dtype, tokenizer=base.tokenizer,
               tokenizer_path=tok_path, data_dir=out, unigram={"unigram_entropy": None},
               param_counts=count_params(cfg.model), metrics=MetricsLog(out, enabled=rt.is_main), metap=None)


def reference_model(run: Run, base: BaseModel | None = None) -> nn.Module:
    """A frozen copy of the starting policy: DPO's reference, RL's KL anchor. Eval mode, no
    gradients, on the run's device, a plain (unsharded) model on every rank. Without ``base`` it
    copies ``run.model`` as it is now: call it before :func:`run_stage` (which loads a resumed
    run's trained weights). With ``base`` it reloads the base's weights from disk (required under
    the distributed room, where ``run.model`` is sharded)."""
    import copy

    import llama4

    if base is not None:
        ref = llama4.load(base.dir, dtype=torch.float32, device=run.rt.device).eval()
    elif run.rt.dist is not None:
        raise ValueError("reference_model under torchrun needs the BaseModel (reference_model(run, base)): "
                         "run.model is sharded")
    else:
        ref = copy.deepcopy(run.model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def describe(run: Run) -> str:
    cfg, counts = run.cfg, run.param_counts
    return (f"{cfg.name}: {counts['total'] / 1e6:.2f}M params ({counts['active'] / 1e6:.2f}M active), "
            f"{cfg.batch_size} x {cfg.grad_accum} sequences of <= {cfg.seq_len} tokens per step x {cfg.max_steps} "
            f"steps, lr {cfg.lr:g} ({cfg.schedule}), device {run.rt.device} ({run.compute_dtype}), "
            f"threads {torch.get_num_threads()}")


def run_stage(run: Run, batch_fn: Callable[[Run], object], loss_fn: Callable[[Run, object], LossOutput],
              resume: bool = False, started: float | None = None, summary: dict | None = None,
              on_step: Callable[[Run, TrainState, StepStats], None] | None = None) -> dict:
    """Train ``run`` to ``cfg.max_steps`` (continuing from its newest checkpoint with ``resume``),
    checkpointing every ``cfg.checkpoint_every`` steps and at the end, then :func:`finish_stage`.
    ``summary`` is merged into ``summary.json``. Returns the summary (``{}`` off rank 0)."""
    cfg = run.cfg
    state = TrainState(meter=Meter(len(run.moe), cfg.model.n_experts), started=started or time.perf_counter())
    if resume:
        resume_run(run, state)
    if run.rt.is_main:
        atomic_write_bytes(run.out / "train_config.json", (json.dumps(cfg.to_dict(), indent=1) + "\n").encode())
    run.say(describe(run))
    run.bar = Progress(cfg.max_steps, state.step, cfg.progress and run.rt.is_main)
    t_log = time.perf_counter()
    from llama4.train.run import save

    while state.step < cfg.max_steps:
        stats = train_step(run, state, batch_fn=batch_fn, loss_fn=loss_fn)
        if fault("kill-after-step", state.step):
            die()
        step = state.step
        if on_step is not None:
            on_step(run, state, stats)
        t_log = run.log_step(state, stats.lr, t_log)
        if (step % cfg.checkpoint_every == 0 or step == cfg.max_steps) and state.bad_steps == 0:
            save(run, state)
            t_log = time.perf_counter()
    run.bar.close()
    return finish_stage(run, state, summary)


def finish_stage(run: Run, state: TrainState, summary: dict | None = None) -> dict:
    """Export ``OUT/final`` (HF layout + the base's tokenizer), plot the loss, write ``summary.json``
    and a ``final`` record. Collective under the distributed room; other ranks return ``{}``."""
    model = run.model if run.rt.dist is None else run.rt.dist.full_model(run.model)
    if not run.rt.is_main:
        return {}
    out, cfg = run.out, run.cfg
    if hasattr(model, "_lora_config"):  # LoRA: merged OUT/final, or OUT/adapter with --adapter-only
        from llama4.posttrain.lora import export_stage_model

        final = export_stage_model(model, run.tokenizer_path, out)
    else:
        final = export_final(model, run.tokenizer_path, out)
    records = read_metrics(out)
    train = [r for r in records if "loss" in r and "event" not in r]
    plots = []
    if cfg.plots and train:
        plots.append(str(plot_losses(records, out / "loss.png", f"{cfg.name}: loss")))
    result = {"stage": cfg.name, "steps": state.step, "tokens": state.tokens, "elapsed_s": round(state.elapsed_s, 1),
              "params": run.param_counts, "first_loss": train[0]["loss"] if train else None,
              "last_loss": train[-1]["loss"] if train else None, "final": str(final), "plots": plots,
              **(summary or {})}
    atomic_write_bytes(out / "summary.json", (json.dumps(result, indent=1, ensure_ascii=False) + "\n").encode())
    run.metrics.write({"step": state.step, "event": "final", "last_loss": result["last_loss"]})
    print(f"{cfg.name}: {state.step} steps, loss {result['first_loss']} -> {result['last_loss']}; "
          f"model in {final}", file=sys.stderr, flush=True)
    return result


__all__ = ["BaseModel", "open_base", "stage_config", "build_stage_run", "reference_model", "run_stage",
           "finish_stage", "describe", "TOKENIZER_FILE"]
