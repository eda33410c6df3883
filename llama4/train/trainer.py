"""The training loop: flat, top to bottom, nanoGPT-style.

    from llama4.recipes import get_recipe
    from llama4.train import train
    summary = train(get_recipe("debug"), "runs/debug")

Run folder: ``train_config.json`` (not config.json: ``OUT/`` must keep resolving to ``OUT/final``
for ``llama4 serve --model OUT``), ``tokenizer.model``, ``data/``, ``checkpoints/``,
``metrics.jsonl``, ``loss.png``, ``expert_load.png``, ``summary.json``, ``final/``.

One call does the whole run: tokenizer and shards (``prepare.py``), model, AdamW, the loop with
gradient accumulation, clipping, MoE balance losses, NaN/Inf skipping, periodic evaluation and
atomic checkpoints, then the final evaluation, samples, plots and the HF export to ``OUT/final``.

Seams for the distributed room: ``parallelize(model, cfg) -> model`` is applied after the model
is built and before the optimizer sees it (FSDP2 / EP / TP wrap from outside), the loader takes
``rank`` / ``world_size`` from :class:`Runtime`, and only rank 0 logs, prints and writes files.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

import llama4
from llama4.data import PackedLoader
from llama4.model import Transformer, count_params
from llama4.tokenizer import Tokenizer
from llama4.train import checkpointing as ckpt
from llama4.train import evaluate as ev
from llama4.train import losses
from llama4.train.config import OPERATIONAL, TrainConfig
from llama4.train.log import (MetricsLog, Progress, fmt_stats, format_report, plot_expert_load, plot_losses,
                              read_metrics)
from llama4.train.optim import Schedule, build_optimizer, set_lr
from llama4.train.prepare import prepare_data, prepare_tokenizer, unigram_stats

# Fault injection for tests: "kill-during-save:STEP" (SIGKILL between writing a checkpoint and
# renaming it into place) or "kill-after-step:STEP" (SIGKILL right after optimizer step STEP).
FAULT_ENV = "LLAMA4_TRAIN_FAULT"


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the message names the last good checkpoint."""


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


def apply_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in backward. The block's forward is wrapped on the
    instance, so parameter names (and checkpoints) are unchanged."""
    for block in model.layers:
        inner = block.forward
        block.forward = lambda *a, _f=inner: checkpoint(_f, *a, use_reentrant=False)


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


def _fault(kind: str, step: int) -> bool:
    spec = os.environ.get(FAULT_ENV, "")
    return spec == f"{kind}:{step}"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def train(cfg: TrainConfig, out: str | os.PathLike, resume: bool = False,
          parallelize: Callable[[torch.nn.Module, TrainConfig], torch.nn.Module] | None = None,
          runtime: Runtime | None = None) -> dict:
    """Run (or continue, with ``resume``) the training described by ``cfg`` in folder ``out``.
    Returns the summary also written to ``OUT/summary.json``."""
    t_start = time.perf_counter()
    out = Path(out)
    rt = runtime or Runtime(pick_device(cfg.device))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and parallelize is None:
        raise RuntimeError("WORLD_SIZE > 1 but no parallelize hook: data-parallel training is applied from "
                           "outside this loop (llama4/distributed)")
    ckpt_dir = out / "checkpoints"
    existing = ckpt.list_checkpoints(ckpt_dir)
    if existing and not resume:
        raise FileExistsError(f"{out} already holds checkpoints (latest step {existing[-1][0]}); pass --resume "
                              "to continue that run, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out, enabled=rt.is_main)
    bar = Progress(cfg.max_steps, 0, False)  # replaced below; `say` works before the bar exists

    def say(text: str) -> None:
        if rt.is_main:
            bar.write(text)

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
    model = build_model(cfg, rt.device)
    moe = losses.moe_layers(model)
    losses.record_router_stats(model)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)
    if parallelize is not None:
        model = parallelize(model, cfg)
    metap = cfg.metap_plan()
    optimizer = build_optimizer(model, cfg, metap)
    schedule = Schedule.from_config(cfg)
    use_aux = cfg.balance in ("aux_loss", "aux_loss+bias") and bool(moe)
    use_bias = cfg.balance in ("bias", "aux_loss+bias") and bool(moe)
    params = [p for p in model.parameters() if p.requires_grad]

    # ---- state that a checkpoint restores ---------------------------------------------------------
    step, tokens, bad = 0, 0, 0
    meter = _Meter(len(moe), cfg.model.n_experts)
    if resume and existing:
        removed = ckpt.clean_temporaries(ckpt_dir)
        state, meta, path = ckpt.latest_checkpoint(ckpt_dir)
        saved_cfg = TrainConfig.from_dict(meta["config"])
        if rt.dist is not None:  # the same global batch over another number of data ranks is the same run
            saved_cfg = rt.dist.per_rank_config(saved_cfg, meta)
        _check_resume_config(cfg, saved_cfg, say)
        if rt.dist is not None:  # DCP shards: model, optimizer, loader, RNG, MoE biases, any layout
            rt.dist.load_checkpoint(path, model, optimizer, loader)
        else:
            model.load_state_dict(state["model"])
            for name, m in moe:
                m.expert_bias.copy_(state["expert_bias"][name])
            optimizer.load_state_dict(state["optimizer"])
            loader.load_state_dict(state["loader"])
            ckpt.set_rng_state(state["rng"])
        step, tokens, bad = state["step"], state["tokens"], state["bad_steps"]
        t_start -= state.get("elapsed_s", 0.0)  # wall time of the run so far, across resumes
        meter.load_state_dict(state["meter"])
        metrics.truncate_after(step, ("eval", "final_eval", "final") if step >= cfg.max_steps else ())
        metrics.write({"step": step, "event": "resume", "checkpoint": str(path)})
        say(f"resumed from {path} (step {step}/{cfg.max_steps})"
            + (f"; removed unfinished save(s) {', '.join(removed)}" if removed else ""))
    elif resume:
        say(f"--resume: no checkpoint in {ckpt_dir} yet, starting from step 0")
    if rt.is_main:
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")

    counts = count_params(cfg.model)
    uni = unigram_stats(data_dir, cfg.model.vocab_size)
    say(f"{cfg.name}: {counts['total'] / 1e6:.2f}M params ({counts['active'] / 1e6:.2f}M active), "
        f"{len(moe)} MoE layers x {cfg.model.n_experts} experts top-{cfg.model.top_k} + shared, "
        f"{cfg.tokens_per_step:,} tokens/step x {cfg.max_steps} steps, device {rt.device} ({compute_dtype}), "
        f"threads {torch.get_num_threads()} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}); unigram entropy {uni['unigram_entropy']:.3f} nats/token"
        + ("" if metap is None else f"; MetaP from base dim {metap.config.base.dim} x "
           f"{metap.config.base.n_layers} layers, base LR {cfg.lr:.3g}"))

    def save(step_now: int) -> Path | None:
        if rt.dist is not None:  # collective: DCP shards + the loop's scalars in state.pt
            return rt.dist.save_checkpoint(
                ckpt_dir, step_now, model, optimizer, loader,
                {"scheduler": {"kind": schedule.kind, "step": step_now}, "step": step_now, "tokens": tokens,
                 "bad_steps": bad, "meter": meter.state_dict(),
                 "elapsed_s": time.perf_counter() - t_start},
                {"config": cfg.to_dict(), "tokens": tokens}, cfg.keep_checkpoints)
        if not rt.is_main:
            return None
        state = {"model": model.state_dict(), "expert_bias": {n: m.expert_bias.clone() for n, m in moe},
                 "optimizer": optimizer.state_dict(), "scheduler": {"kind": schedule.kind, "step": step_now},
                 "loader": loader.state_dict(), "rng": ckpt.rng_state(), "step": step_now, "tokens": tokens,
                 "bad_steps": bad, "meter": meter.state_dict(),
                 "elapsed_s": time.perf_counter() - t_start}
        fault = _die if _fault("kill-during-save", step_now) else None
        return ckpt.save_checkpoint(ckpt_dir, step_now, state, {"config": cfg.to_dict(), "tokens": tokens},
                                    cfg.keep_checkpoints, _fault=fault)

    def run_eval(step_now: int, n_batches: int, event: str = "eval", **kw) -> dict:
        res = ev.evaluate(model, data_dir, cfg.batch_size, cfg.seq_len, n_batches, rt.device, autocast,
                          unigram_logp=uni["log_probs"], **kw)
        metrics.write({"step": step_now, "event": event, "tokens": tokens, "val_loss": res["val_loss"],
                       "val_loss_mean": res["val_loss_mean"], "loads": res["loads"]})
        return res

    # ---- the loop ----------------------------------------------------------------------------
    bar = Progress(cfg.max_steps, step, cfg.progress and rt.is_main)
    t_log = time.perf_counter()
    while step < cfg.max_steps:
        lr = schedule(step)
        set_lr(optimizer, lr)
        ce_sum, aux_sum, z_sum, step_loads = 0.0, 0.0, 0.0, None
        for _ in range(cfg.grad_accum):
            batch = loader.next_batch()
            x, y = batch.inputs.to(rt.device), batch.targets.to(rt.device)
            with autocast():
                logits = model(x)  # (B, T, V)
            ce = losses.cross_entropy(logits, y)
            loss = ce
            if moe:
                bal, z, loads = losses.router_losses(moe)
                if use_aux:
                    loss = loss + cfg.aux_loss_coef * bal
                loss = loss + cfg.z_loss_coef * z
                aux_sum += bal.item() / cfg.grad_accum
                z_sum += z.item() / cfg.grad_accum
                step_loads = loads if step_loads is None else step_loads + loads
            (loss / cfg.grad_accum).backward()
            ce_sum += ce.item() / cfg.grad_accum
        if rt.dist is not None:  # the global batch's mean losses, for the log
            ce_sum, aux_sum, z_sum = rt.dist.mean(ce_sum, aux_sum, z_sum)
        clip = rt.dist.clip_grad_norm_ if rt.dist is not None else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = grad_norm.item()
        step += 1
        tokens += cfg.tokens_per_step * rt.world_size
        if torch.isfinite(torch.tensor([ce_sum, grad_norm])).all():
            optimizer.step()
            if use_bias:
                losses.update_expert_bias(moe, step_loads, cfg.bias_update_rate)
            bad = 0
            meter.add(ce_sum, aux_sum, z_sum, grad_norm, step_loads)
        else:
            bad += 1
            meter.skipped += 1
            metrics.write({"step": step, "event": "nonfinite", "loss": ce_sum, "grad_norm": grad_norm, "lr": lr,
                           "consecutive": bad})
            say(f"step {step}: non-finite loss {ce_sum} / grad norm {grad_norm}; update skipped "
                f"({bad} in a row, stop at {cfg.max_bad_steps})")
            if bad >= cfg.max_bad_steps:
                optimizer.zero_grad(set_to_none=True)
                bar.close()
                last = ckpt.list_checkpoints(ckpt_dir)
                where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
                raise TrainingDiverged(f"{bad} consecutive steps with a non-finite loss or gradient (steps "
                                       f"{step - bad + 1}-{step}); stopping; {where}. Lower lr or raise "
                                       "warmup_steps / grad_clip, then resume.")
        optimizer.zero_grad(set_to_none=True)
        if _fault("kill-after-step", step):
            _die()

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            dt = time.perf_counter() - t_log
            rec = meter.flush(step, lr, tokens, dt, cfg.tokens_per_step * rt.world_size)
            if rec is not None:
                metrics.write(rec)
                bar.update(0, **fmt_stats(rec["loss"], rec["tokens_per_s"], lr))
            t_log = time.perf_counter()
        bar.update(1)
        if step % cfg.eval_every == 0 and step < cfg.max_steps and cfg.eval_batches:
            res = run_eval(step, cfg.eval_batches)
            say(f"step {step}: val loss {res['val_loss_mean']:.3f}")
            t_log = time.perf_counter()  # evaluation time is not training throughput
        if (step % cfg.checkpoint_every == 0 or step == cfg.max_steps) and bad == 0:
            save(step)
            t_log = time.perf_counter()
    bar.close()
    if rt.dist is not None:  # collective: the whole model, as a plain Transformer on rank 0
        model = rt.dist.full_model(model)
    if not rt.is_main:
        return {}
    return _finish(cfg, out, model, tok, tok_path, data_dir, moe, use_bias, uni, counts, run_eval, rt, autocast,
                   time.perf_counter() - t_start, step, tokens)


class _Meter:
    """Running sums over one logging interval; part of the checkpoint so logs resume exactly."""

    def __init__(self, n_moe: int, n_experts: int):
        self.n_moe, self.n_experts = n_moe, n_experts
        self.reset()
        self.skipped = 0

    def reset(self):
        self.n, self.ce, self.aux, self.z, self.gn = 0, 0.0, 0.0, 0.0, 0.0
        self.loads = torch.zeros(self.n_moe, self.n_experts, dtype=torch.long) if self.n_moe else None

    def add(self, ce, aux, z, gn, loads):
        self.n += 1
        self.ce, self.aux, self.z, self.gn = self.ce + ce, self.aux + aux, self.z + z, self.gn + gn
        if loads is not None:
            self.loads += loads.cpu()

    def flush(self, step, lr, tokens, dt, tokens_per_step) -> dict | None:
        if self.n == 0:
            return None  # every step of the interval was skipped; the next record counts them
        rec = {"step": step, "loss": self.ce / self.n, "lr": lr, "tokens": tokens,
               "tokens_per_s": self.n * tokens_per_step / max(dt, 1e-9), "grad_norm": self.gn / self.n,
               "skipped": self.skipped}
        if self.loads is not None:
            rec.update(aux_loss=self.aux / self.n, z_loss=self.z / self.n,
                       expert_load=[round(v, 4) for v in losses.load_imbalance(self.loads).tolist()])
        self.reset()
        self.skipped = 0
        return rec

    def state_dict(self) -> dict:
        return {"n": self.n, "ce": self.ce, "aux": self.aux, "z": self.z, "gn": self.gn, "loads": self.loads,
                "skipped": self.skipped}

    def load_state_dict(self, s: dict) -> None:
        self.n, self.ce, self.aux, self.z, self.gn = s["n"], s["ce"], s["aux"], s["z"], s["gn"]
        self.loads, self.skipped = s["loads"], s["skipped"]


def _check_resume_config(now: TrainConfig, saved: TrainConfig, say) -> None:
    diffs = now.differences(saved)
    fatal = {k: v for k, v in diffs.items() if k not in OPERATIONAL}
    if fatal:
        lines = "; ".join(f"{k}: checkpoint {b!r}, now {a!r}" for k, (a, b) in fatal.items())
        raise ValueError(f"--resume with a different configuration would not continue the same run ({lines}); "
                         "resume with the original command line")
    if "max_steps" in diffs:
        say(f"note: max_steps changed from {saved.max_steps} to {now.max_steps}: the schedule is the new one's")


def export_final(model: Transformer, tok_path: Path, out: Path) -> Path:
    """``OUT/final``: the HF layout (``llama4.save``) plus the run's tokenizer, swapped in atomically."""
    final = out / "final"
    staging = out / f".final-{uuid.uuid4().hex[:8]}"
    try:
        llama4.save(model, staging)
        shutil.copyfile(tok_path, staging / tok_path.name)
        old = None
        if final.exists():
            old = out / f".final-old-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(staging, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _finish(cfg, out, model, tok, tok_path, data_dir, moe, use_bias, uni, counts, run_eval, rt, autocast,
            elapsed, step, tokens) -> dict:
    """Final evaluation, samples, plots, HF export and the printed report."""
    if cfg.eval_batches:  # the last point of the validation curve, on the same batches as the others
        run_eval(step, cfg.eval_batches)
    res = run_eval(step, cfg.final_eval_batches, "final_eval", tokenizer=tok)  # more batches: the reported figure
    warning = agreement = export_val = export_load = None
    if use_bias:
        agreement = ev.routing_agreement(model, data_dir, cfg.batch_size, cfg.seq_len, cfg.final_eval_batches,
                                         rt.device)
        saved = [m.expert_bias.clone() for _, m in moe]
        for _, m in moe:
            m.expert_bias.zero_()  # what OUT/final computes
        export_val = ev.evaluate(model, data_dir, cfg.batch_size, cfg.seq_len, cfg.final_eval_batches, rt.device,
                                 autocast)["val_loss_mean"]
        export_load = ev.expert_load(model, data_dir, "train", cfg.seq_len, cfg.load_eval_windows, cfg.batch_size,
                                     rt.device, autocast) if cfg.load_eval_windows else None
        for (_, m), b in zip(moe, saved):
            m.expert_bias.copy_(b)
        warning = (f"balance={cfg.balance!r} trains a per-expert selection bias, which the HF layout cannot "
                   f"hold: OUT/final routes without it ({100 * agreement:.1f}% of validation tokens keep their "
                   f"experts; validation loss {export_val:.3f} there vs {res['val_loss_mean']:.3f} here). "
                   "Use balance='aux_loss' for an exact export.")
    # Expert load of the final model on evenly spread training and validation sequences
    loads, loads_val = (ev.expert_load(model, data_dir, split, cfg.seq_len, cfg.load_eval_windows, cfg.batch_size,
                                       rt.device, autocast) if moe and cfg.load_eval_windows else None
                        for split in ("train", "val"))
    final = export_final(model, tok_path, out)
    model.eval()
    gen = []
    if cfg.sample_tokens:
        # Compiled blocks would recompile for every KV-cache layer type and prefill/decode shape
        # (torch.compile's limit of 8 is hit on the way); a few samples run eager.
        with torch.compiler.set_stance("force_eager"):
            gen = ev.samples(model, tok, cfg.sample_langs, cfg.sample_tokens, seed=cfg.seed)
    if gen:
        lid = ev.LanguageID()
        for s in gen:
            s["detected"] = lid(s["text"])
    def imb(x):
        return [round(v, 4) for v in losses.load_imbalance(torch.tensor(x)).tolist()] if x else []

    imbalance = imb(loads)
    dead = [[e for e, c in enumerate(row) if c == 0] for row in loads] if loads else []
    records = read_metrics(out)
    plots = []
    if cfg.plots:
        plots.append(str(plot_losses(records, out / "loss.png", f"{cfg.name}: loss", uni["unigram_entropy"])))
        if moe:
            plots.append(str(plot_expert_load(records, loads, out / "expert_load.png", f"{cfg.name}: expert load")))
    summary = {
        "recipe": cfg.name, "steps": step, "tokens": tokens, "elapsed_s": round(elapsed, 1),
        "params": counts, "val_loss": res["val_loss"], "val_loss_mean": res["val_loss_mean"],
        "bits_per_byte": res["bits_per_byte"], "unigram_val": res["unigram"],
        "unigram_entropy": uni["unigram_entropy"], "unigram_val_ce": uni["unigram_val_ce"],
        "expert_load_max_over_mean": imbalance, "expert_load_max_over_mean_val": imb(loads_val),
        "expert_load_max_over_mean_export": imb(export_load), "dead_experts": dead, "samples": gen,
        "final": str(final), "plots": plots, "routing_agreement_without_bias": agreement,
        "val_loss_mean_export": export_val, "warning": warning,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    MetricsLog(out).write({"step": step, "event": "final", "val_loss_mean": res["val_loss_mean"],
                           "expert_load": imbalance})
    print(format_report(summary), flush=True)
    return summary
