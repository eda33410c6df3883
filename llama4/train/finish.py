"""The end of a run: final evaluation, expert load, samples, plots, the HF export to ``OUT/final``,
``summary.json`` and the printed report."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch

import llama4
from llama4.model import Transformer
from llama4.train import evaluate as ev
from llama4.train import losses
from llama4.train.log import format_report, plot_expert_load, plot_losses, read_metrics
from llama4.train.run import Run
from llama4.train.state import TrainState


def export_final(model: Transformer, tok_path: Path, out: Path) -> Path:
    """``OUT/final``: the HF layout (``llama4.save``) plus the run's tokenizer, swapped in atomically."""
    final = out / "final"
    staging = out / f".final-{uuid.uuid4().hex[:8]}"
    try:
        # weights + tokenizer.model + the HF tokenizer files and generation_config.json
        llama4.save(model, staging, tokenizer=tok_path)
        if not (staging / tok_path.name).exists():
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


def _imbalance(loads) -> list[float]:
    return [round(v, 4) for v in losses.load_imbalance(torch.tensor(loads)).tolist()] if loads else []


def finish(run: Run, state: TrainState) -> dict:
    """Collective under the distributed room (the model is gathered onto rank 0, which does the
    rest; the other ranks return ``{}``). Returns the summary also written to ``OUT/summary.json``."""
    model = run.model if run.rt.dist is None else run.rt.dist.full_model(run.model)
    if not run.rt.is_main:
        return {}
    elapsed = state.elapsed_s  # the training's wall time, without this final part
    cfg, out, device, autocast = run.cfg, run.out, run.rt.device, run.autocast
    moe = losses.moe_layers(model)  # the finished model's own layers (a gathered copy under the distributed room)
    if cfg.eval_batches:  # the last point of the validation curve, on the same batches as the others
        run.log_eval(state, cfg.eval_batches, model=model)
    res = run.log_eval(state, cfg.final_eval_batches, "final_eval", model=model,
                       tokenizer=run.tokenizer)  # more batches: the reported figure
    warning = agreement = export_val = export_load = None
    if run.use_bias:
        agreement = ev.routing_agreement(model, run.data_dir, cfg.batch_size, cfg.seq_len, cfg.final_eval_batches,
                                         device)
        saved = [m.expert_bias.clone() for _, m in moe]
        for _, m in moe:
            m.expert_bias.zero_()  # what OUT/final computes
        export_val = ev.evaluate(model, run.data_dir, cfg.batch_size, cfg.seq_len, cfg.final_eval_batches, device,
                                 autocast)["val_loss_mean"]
        export_load = ev.expert_load(model, run.data_dir, "train", cfg.seq_len, cfg.load_eval_windows, cfg.batch_size,
                                     device, autocast) if cfg.load_eval_windows else None
        for (_, m), b in zip(moe, saved):
            m.expert_bias.copy_(b)
        warning = (f"balance={cfg.balance!r} trains a per-expert selection bias, which the HF layout cannot "
                   f"hold: OUT/final routes without it ({100 * agreement:.1f}% of validation tokens keep their "
                   f"experts; validation loss {export_val:.3f} there vs {res['val_loss_mean']:.3f} here). "
                   "Use balance='aux_loss' for an exact export.")
    # Expert load of the final model on evenly spread training and validation sequences
    loads, loads_val = (ev.expert_load(model, run.data_dir, split, cfg.seq_len, cfg.load_eval_windows, cfg.batch_size,
                                       device, autocast) if moe and cfg.load_eval_windows else None
                        for split in ("train", "val"))
    final = export_final(model, run.tokenizer_path, out)
    model.eval()
    gen = []
    if cfg.sample_tokens:
        # Compiled blocks would recompile for every KV-cache layer type and prefill/decode shape
        # (torch.compile's limit of 8 is hit on the way); a few samples run eager.
        with torch.compiler.set_stance("force_eager"):
            gen = ev.samples(model, run.tokenizer, cfg.sample_langs, cfg.sample_tokens, seed=cfg.seed)
    if gen:
        lid = ev.LanguageID()
        for s in gen:
            s["detected"] = lid(s["text"])
    imbalance = _imbalance(loads)
    dead = [[e for e, c in enumerate(row) if c == 0] for row in loads] if loads else []
    records = read_metrics(out)
    plots = []
    if cfg.plots:
        plots.append(str(plot_losses(records, out / "loss.png", f"{cfg.name}: loss", run.unigram["unigram_entropy"])))
        if moe:
            plots.append(str(plot_expert_load(records, loads, out / "expert_load.png", f"{cfg.name}: expert load")))
    summary = {
        "recipe": cfg.name, "steps": state.step, "tokens": state.tokens, "elapsed_s": round(elapsed, 1),
        "params": run.param_counts, "val_loss": res["val_loss"], "val_loss_mean": res["val_loss_mean"],
        "bits_per_byte": res["bits_per_byte"], "unigram_val": res["unigram"],
        "unigram_entropy": run.unigram["unigram_entropy"], "unigram_val_ce": run.unigram["unigram_val_ce"],
        "expert_load_max_over_mean": imbalance, "expert_load_max_over_mean_val": _imbalance(loads_val),
        "expert_load_max_over_mean_export": _imbalance(export_load), "dead_experts": dead, "samples": gen,
        "final": str(final), "plots": plots, "routing_agreement_without_bias": agreement,
        "val_loss_mean_export": export_val, "warning": warning,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    run.metrics.write({"step": state.step, "event": "final", "val_loss_mean": res["val_loss_mean"],
                       "expert_load": imbalance})
    print(format_report(summary), flush=True)
    return summary
