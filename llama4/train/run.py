"""A training run's pieces, built once: :func:`setup` -> :class:`Run`; :func:`resume` and
:func:`save` move a run and its :class:`~llama4.train.state.TrainState` to and from a checkpoint.

``setup`` does, in this order (the order fixes the random numbers a run draws): process
settings (threads, denormals, seed), the run's tokenizer and shards, the loader, the model
(built on meta, initialised from the seed), activation checkpointing, ``torch.compile``, the
distributed room's ``parallelize`` hook, the optimizer groups and the LR schedule.

A checkpoint holds one payload, :func:`checkpoint_payload`: the LR schedule's position and the
``TrainState``. The single-process saver puts it in ``state.pt`` beside the full model,
optimizer, loader and RNG states (``checkpointing.py``); the distributed room's saver puts it in
``state.pt`` beside the DCP shards that hold those (``llama4/distributed/run.py``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from llama4.data import PackedLoader
from llama4.model import Transformer, count_params
from llama4.tokenizer import Tokenizer
from llama4.train import checkpointing as ckpt
from llama4.train import evaluate as ev
from llama4.train import losses
from llama4.train.config import OPERATIONAL, TrainConfig
from llama4.train.log import MetricsLog, Progress, fmt_stats
from llama4.train.optim import Schedule, build_optimizer
from llama4.train.prepare import prepare_data, prepare_tokenizer, unigram_stats
from llama4.train.state import TrainState

# Fault injection for tests: "kill-during-save:STEP" (SIGKILL between writing a checkpoint and
# renaming it into place) or "kill-after-step:STEP" (SIGKILL right after optimizer step STEP).
FAULT_ENV = "LLAMA4_TRAIN_FAULT"


def fault(kind: str, step: int) -> bool:
    return os.environ.get(FAULT_ENV, "") == f"{kind}:{step}"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Runtime:
    """Where this process runs. The distributed room builds one per rank."""

    device: torch.device
    rank: int = 0  # data-parallel rank: which share of each global batch this process reads
    world_size: int = 1  # data-parallel ranks (tensor-parallel peers read the same batch)
    global_rank: int | None = None  # process rank when it differs from ``rank`` (0 logs and writes files)
    dist: object | None = None  # llama4.distributed.run.DistributedRun: collectives, DCP checkpoints

    @property
    def is_main(self) -> bool:
        return (self.rank if self.global_rank is None else self.global_rank) == 0


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast where the device runs it fast: CUDA with bf16 support, or a CPU with AMX
    (on AVX-512-only CPUs bf16 is 1.6-1.9x *slower* than fp32, PLATFORM.md)."""
    if cfg.dtype == "float32":
        use = False
    elif cfg.dtype == "bfloat16":
        use = True
    elif device.type == "cuda":
        use = torch.cuda.is_bf16_supported()
    elif device.type == "cpu":
        amx = getattr(getattr(torch._C, "_cpu", None), "_is_amx_tile_supported", None)
        use = bool(amx and amx())
    else:
        use = False
    if not use:
        return contextlib.nullcontext, "float32"
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), "bfloat16"


def apply_compile(model: Transformer) -> None:
    """torch.compile each block. The routed experts' grouped matmul stays eager: in torch 2.13
    its fake-tensor rule demands bf16 (the CUDA kernel's limit) although the CPU kernel runs fp32,
    so tracing it fails; attention, norms, router and shared expert are compiled around it."""
    from llama4.model import MoE

    for block in model.layers:
        if isinstance(block.feed_forward, MoE):
            experts = block.feed_forward.experts
            experts.forward = torch.compiler.disable(experts.forward)
        block.compile()


def build_model(cfg: TrainConfig, device: torch.device) -> Transformer:
    """Built on the meta device, materialised on ``device``, initialised from ``cfg.seed`` by the
    run's parametrization (MetaP also sets the model's forward multipliers)."""
    metap = cfg.metap_plan()
    with torch.device("meta"):
        model = Transformer(cfg.model if metap is None else metap.model_args())
    model.to_empty(device=device)
    torch.manual_seed(cfg.seed)
    model.init_weights(cfg.init_std, stds=None if metap is None else metap.init_stds(model))
    return model


@dataclass
class Run:
    """Everything a training run is built from; made by :func:`setup`, read by every step."""

    cfg: TrainConfig
    out: Path
    rt: Runtime
    model: nn.Module  # the Transformer, wrapped from outside when the distributed room parallelized it
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    loader: PackedLoader  # anything with next_batch / state_dict / load_state_dict
    moe: list  # [(name, MoE)]: router stats, balance losses, selection biases
    autocast: Callable[[], contextlib.AbstractContextManager]  # the forward's autocast context (or a no-op)
    compute_dtype: str  # "bfloat16" or "float32"
    tokenizer: Tokenizer
    tokenizer_path: Path
    data_dir: Path
    unigram: dict  # unigram_stats of the shards: the baseline the reports compare against
    param_counts: dict
    metrics: MetricsLog  # enabled on the main process only
    metap: object | None = None  # llama4.metap.MetaP under the MetaP parametrization
    bar: Progress = field(default_factory=lambda: Progress(0, 0, False))

    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step over all data-parallel ranks."""
        return self.cfg.tokens_per_step * self.rt.world_size

    @property
    def use_aux(self) -> bool:
        return self.cfg.balance in ("aux_loss", "aux_loss+bias") and bool(self.moe)

    @property
    def use_bias(self) -> bool:
        return self.cfg.balance in ("bias", "aux_loss+bias") and bool(self.moe)

    def say(self, text: str) -> None:
        if self.rt.is_main:
            self.bar.write(text)

    def log_step(self, state: TrainState, lr: float, since: float) -> float:
        """After an optimizer step: a metrics record every ``log_every`` steps (and at the last),
        the progress bar; returns the time the next record's throughput counts from."""
        cfg, step = self.cfg, state.step
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            rec = state.meter.flush(step, lr, state.tokens, time.perf_counter() - since, self.tokens_per_step)
            if rec is not None:
                self.metrics.write(rec)
                self.bar.update(0, **fmt_stats(rec["loss"], rec["tokens_per_s"], lr))
            since = time.perf_counter()
        self.bar.update(1)
        return since

    def log_eval(self, state: TrainState, n_batches: int, event: str = "eval", model: nn.Module | None = None,
                 **kw) -> dict:
        """Validation loss on ``n_batches`` per language, written to metrics.jsonl as ``event``."""
        res = ev.evaluate(self.model if model is None else model, self.data_dir, self.cfg.batch_size,
                          self.cfg.seq_len, n_batches, self.rt.device, self.autocast,
                          unigram_logp=self.unigram["log_probs"], **kw)
        self.metrics.write({"step": state.step, "event": event, "tokens": state.tokens, "val_loss": res["val_loss"],
                            "val_loss_mean": res["val_loss_mean"], "loads": res["loads"]})
        return res

    def describe(self) -> str:
        cfg, counts, metap = self.cfg, self.param_counts, self.metap
        return (f"{cfg.name}: {counts['total'] / 1e6:.2f}M params ({counts['active'] / 1e6:.2f}M active), "
                f"{len(self.moe)} MoE layers x {cfg.model.n_experts} experts top-{cfg.model.top_k} + shared, "
                f"{cfg.tokens_per_step:,} tokens/step x {cfg.max_steps} steps, device {self.rt.device} "
                f"({self.compute_dtype}), threads {torch.get_num_threads()} "
                f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}); unigram entropy "
                f"{self.unigram['unigram_entropy']:.3f} nats/token"
                + ("" if metap is None else f"; MetaP from base dim {metap.config.base.dim} x "
                   f"{metap.config.base.n_layers} layers, base LR {cfg.lr:.3g}"))



def prepare_model(model: nn.Module, cfg: TrainConfig, parallelize=None) -> tuple[nn.Module, list]:
    """What every training run does to its model before the optimizer: find the MoE layers and
    record their router statistics, activation checkpointing, compile, and the distributed room's
    ``parallelize`` hook, in that order. Returns the model to train and its MoE layers."""
    moe = losses.moe_layers(model)
    losses.record_router_stats(model)
    if cfg.activation_checkpointing:
        from llama4.distributed.parallelize import apply_ac  # the project's one implementation

        apply_ac(model)
    if cfg.compile:
        apply_compile(model)
    if parallelize is not None:
        model = parallelize(model, cfg)
    return model, moe

def setup(cfg: TrainConfig, out: str | os.PathLike, resume: bool = False,
          parallelize: Callable[[nn.Module, TrainConfig], nn.Module] | None = None,
          runtime: Runtime | None = None) -> Run:
    """Build the run described by ``cfg`` in folder ``out`` (refusing a folder that already holds
    checkpoints unless ``resume``). ``parallelize(model, cfg) -> model`` is the distributed
    room's seam: applied after the model is built and before the optimizer sees it."""
    out = Path(out)
    rt = runtime or Runtime(pick_device(cfg.device))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and parallelize is None:
        raise RuntimeError("WORLD_SIZE > 1 but no parallelize hook: data-parallel training is applied from "
                           "outside this loop (llama4/distributed)")
    existing = ckpt.list_checkpoints(out / "checkpoints")
    if existing and not resume:
        raise FileExistsError(f"{out} already holds checkpoints (latest step {existing[-1][0]}); pass --resume "
                              "to continue that run, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:  # before the Run exists
        if rt.is_main:
            print(text, file=sys.stderr, flush=True)

    # ---- process settings: threads, denormals, seeds -----------------------------------------
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # 10-20x on CPU once Adam state and small weights go denormal
    torch.manual_seed(cfg.seed)
    autocast, compute_dtype = pick_autocast(cfg, rt.device)

    # ---- tokenizer and data --------------------------------------------------------------------
    with rt.dist.main_first() if rt.dist is not None else contextlib.nullcontext():
        tok_path = prepare_tokenizer(cfg, out, say)
        tok = Tokenizer(tok_path)
        if tok.n_words > cfg.model.vocab_size:
            raise ValueError(f"the tokenizer has {tok.n_words} tokens but model.vocab_size is {cfg.model.vocab_size}")
        data_dir = prepare_data(cfg, out, tok_path, tok, say)
    loader = PackedLoader(data_dir, cfg.batch_size, cfg.seq_len, seed=cfg.seed, rank=rt.rank,
                          world_size=rt.world_size)

    # ---- model, optimizer, schedule --------------------------------------------------------------
    model, moe = prepare_model(build_model(cfg, rt.device), cfg, parallelize)
    metap = cfg.metap_plan()
    optimizer = build_optimizer(model, cfg, metap)
    return Run(cfg=cfg, out=out, rt=rt, model=model, optimizer=optimizer, schedule=Schedule.from_config(cfg),
               loader=loader, moe=moe, autocast=autocast, compute_dtype=compute_dtype, tokenizer=tok,
               tokenizer_path=tok_path, data_dir=data_dir, unigram=unigram_stats(data_dir, cfg.model.vocab_size),
               param_counts=count_params(cfg.model), metrics=MetricsLog(out, enabled=rt.is_main), metap=metap)


# --------------------------------------------------------------------------------------------
# checkpoints

def checkpoint_payload(run: Run, state: TrainState) -> tuple[dict, dict]:
    """-> (the loop's state for ``state.pt``, ``meta.json``): the one payload both savers write."""
    loop = {"scheduler": {"kind": run.schedule.kind, "step": state.step}, **state.state_dict()}
    return loop, {"config": run.cfg.to_dict(), "tokens": state.tokens}


def save(run: Run, state: TrainState) -> Path | None:
    """Checkpoint ``run`` at ``state.step``, atomically; collective under the distributed room."""
    loop, meta = checkpoint_payload(run, state)
    if run.rt.dist is not None:  # DCP shards of model, optimizer, loader, RNG, biases + `loop` in state.pt
        return run.rt.dist.save_checkpoint(run.ckpt_dir, state.step, run.model, run.optimizer, run.loader, loop,
                                           meta, run.cfg.keep_checkpoints)
    if not run.rt.is_main:
        return None
    full = {"model": run.model.state_dict(), "expert_bias": {n: m.expert_bias.clone() for n, m in run.moe},
            "optimizer": run.optimizer.state_dict(), "loader": run.loader.state_dict(), "rng": ckpt.rng_state(),
            **loop}
    return ckpt.save_checkpoint(run.ckpt_dir, state.step, full, meta, run.cfg.keep_checkpoints,
                                _fault=die if fault("kill-during-save", state.step) else None)


def resume(run: Run, state: TrainState) -> Path | None:
    """Continue from the newest checkpoint in ``run.out``: weights, optimizer, loader position, RNG,
    MoE biases into ``run``, the loop's progress into ``state``; the log is cut back to its step.
    Returns the checkpoint, or None when the run has none yet (it then starts from step 0)."""
    cfg, rt = run.cfg, run.rt
    if not ckpt.list_checkpoints(run.ckpt_dir):
        run.say(f"--resume: no checkpoint in {run.ckpt_dir} yet, starting from step 0")
        return None
    removed = ckpt.clean_temporaries(run.ckpt_dir)
    saved, meta, path = ckpt.latest_checkpoint(run.ckpt_dir)
    saved_cfg = TrainConfig.from_dict(meta["config"])
    if rt.dist is not None:  # the same global batch over another number of data ranks is the same run
        saved_cfg = rt.dist.per_rank_config(saved_cfg, meta)
    check_resume_config(cfg, saved_cfg, run.say)
    if rt.dist is not None:  # DCP shards: model, optimizer, loader, RNG, MoE biases, any layout
        rt.dist.load_checkpoint(path, run.model, run.optimizer, run.loader)
    else:
        run.model.load_state_dict(saved["model"])
        for name, m in run.moe:
            m.expert_bias.copy_(saved["expert_bias"][name])
        run.optimizer.load_state_dict(saved["optimizer"])
        run.loader.load_state_dict(saved["loader"])
        ckpt.set_rng_state(saved["rng"])
    state.load_state_dict(saved)
    run.metrics.truncate_after(state.step, ("eval", "final_eval", "final") if state.step >= cfg.max_steps else ())
    run.metrics.write({"step": state.step, "event": "resume", "checkpoint": str(path)})
    run.say(f"resumed from {path} (step {state.step}/{cfg.max_steps})"
            + (f"; removed unfinished save(s) {', '.join(removed)}" if removed else ""))
    return path


def check_resume_config(now: TrainConfig, saved: TrainConfig, say) -> None:
    diffs = now.differences(saved)
    fatal = {k: v for k, v in diffs.items() if k not in OPERATIONAL}
    if fatal:
        lines = "; ".join(f"{k}: checkpoint {b!r}, now {a!r}" for k, (a, b) in fatal.items())
        raise ValueError(f"--resume with a different configuration would not continue the same run ({lines}); "
                         "resume with the original command line")
    if "max_steps" in diffs:
        say(f"note: max_steps changed from {saved.max_steps} to {now.max_steps}: the schedule is the new one's")
