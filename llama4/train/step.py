"""One optimizer step: :func:`train_step`, and the seam where a stage plugs in its batch and loss.

A step is ``cfg.grad_accum`` micro-batches, each ``loss_fn(run, batch_fn(run))`` plus the MoE
router's balance and z-losses, backpropagated; then the gradient norm is clipped (across meshes
under the distributed room), and the update is applied only when the loss and the norm are
finite, else skipped, logged, and counted towards ``cfg.max_bad_steps``.

The default batch and loss are pretraining's (:func:`next_lm_batch`, :func:`lm_loss`). A stage
with other data or another objective passes its own; see ``trainer.py``'s docstring.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from llama4.train import checkpointing as ckpt
from llama4.train import losses
from llama4.train.optim import set_lr
from llama4.train.run import Run
from llama4.train.state import TrainState


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps; the message names the last good checkpoint."""


@dataclass
class LossOutput:
    """What a loss function returns for one micro-batch."""

    loss: torch.Tensor  # scalar to minimise (the MoE terms are added by the step); logged as "loss"
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)  # averaged into each log record


@dataclass
class StepStats:
    """One optimizer step, as the log sees it (the global batch's means under data parallel)."""

    step: int  # the step just taken (1-based)
    lr: float
    loss: float
    aux_loss: float
    z_loss: float
    grad_norm: float
    loads: torch.Tensor | None  # (n_moe, E) tokens routed to each expert, or None without MoE
    metrics: dict[str, float]
    applied: bool  # False: non-finite, the update was skipped


def next_lm_batch(run: Run) -> Any:
    """Pretraining's batch: the next packed window of the run's shards (``Batch(inputs, targets)``)."""
    return run.loader.next_batch()


def lm_loss(run: Run, batch) -> LossOutput:
    """Pretraining's loss: next-token cross-entropy of the model under the run's autocast."""
    x, y = batch.inputs.to(run.rt.device), batch.targets.to(run.rt.device)
    with run.autocast():
        logits = run.model(x)  # (B, T, V)
    return LossOutput(losses.cross_entropy(logits, y))


BatchFn = Callable[[Run], Any]
LossFn = Callable[[Run, Any], LossOutput]


def train_step(run: Run, state: TrainState, batch_fn: BatchFn = next_lm_batch, loss_fn: LossFn = lm_loss) -> StepStats:
    """Take optimizer step ``state.step + 1`` and advance ``state``. Raises TrainingDiverged after
    ``cfg.max_bad_steps`` non-finite steps in a row."""
    cfg, rt, opt = run.cfg, run.rt, run.optimizer
    lr = run.schedule(state.step)
    set_lr(opt, lr)
    loss_sum, aux_sum, z_sum, step_loads, extra = 0.0, 0.0, 0.0, None, {}
    for _ in range(cfg.grad_accum):
        out = loss_fn(run, batch_fn(run))
        loss = out.loss
        if run.moe:  # the router stats of the forward pass the loss function just ran
            bal, z, loads = losses.router_losses(run.moe)
            if run.use_aux:
                loss = loss + cfg.aux_loss_coef * bal
            loss = loss + cfg.z_loss_coef * z
            aux_sum += bal.item() / cfg.grad_accum
            z_sum += z.item() / cfg.grad_accum
            step_loads = loads if step_loads is None else step_loads + loads
        (loss / cfg.grad_accum).backward()
        loss_sum += out.loss.item() / cfg.grad_accum
        for k, v in out.metrics.items():
            extra[k] = extra.get(k, 0.0) + float(v) / cfg.grad_accum
    if rt.dist is not None:  # the global batch's mean losses, for the log
        loss_sum, aux_sum, z_sum, *means = rt.dist.mean(loss_sum, aux_sum, z_sum, *extra.values())
        extra = dict(zip(extra, means))
    clip = rt.dist.clip_grad_norm_ if rt.dist is not None else torch.nn.utils.clip_grad_norm_
    grad_norm = clip(run.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")).item()
    state.step += 1
    state.tokens += run.tokens_per_step
    applied = bool(torch.isfinite(torch.tensor([loss_sum, grad_norm])).all())
    if applied:
        opt.step()
        if run.use_bias:
            losses.update_expert_bias(run.moe, step_loads, cfg.bias_update_rate)
        state.bad_steps = 0
        state.meter.add(loss_sum, aux_sum, z_sum, grad_norm, step_loads, extra)
    else:
        _skip(run, state, loss_sum, grad_norm, lr)
    opt.zero_grad(set_to_none=True)
    return StepStats(state.step, lr, loss_sum, aux_sum, z_sum, grad_norm, step_loads, extra, applied)


def _skip(run: Run, state: TrainState, loss: float, grad_norm: float, lr: float) -> None:
    """A non-finite step: no update; log it; stop the run after too many in a row."""
    cfg, bad = run.cfg, state.bad_steps + 1
    state.bad_steps = bad
    state.meter.skipped += 1
    run.metrics.write({"step": state.step, "event": "nonfinite", "loss": loss, "grad_norm": grad_norm, "lr": lr,
                       "consecutive": bad})
    run.say(f"step {state.step}: non-finite loss {loss} / grad norm {grad_norm}; update skipped "
            f"({bad} in a row, stop at {cfg.max_bad_steps})")
    if bad >= cfg.max_bad_steps:
        run.optimizer.zero_grad(set_to_none=True)
        run.bar.close()
        last = ckpt.list_checkpoints(run.ckpt_dir)
        where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
        raise TrainingDiverged(f"{bad} consecutive steps with a non-finite loss or gradient (steps "
                               f"{state.step - bad + 1}-{state.step}); stopping; {where}. Lower lr or raise "
                               "warmup_steps / grad_clip, then resume.")
