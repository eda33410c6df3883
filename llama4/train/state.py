"""What a training run has done so far: the part of a checkpoint that is not weights or data.

:class:`TrainState` is the loop's progress (step, tokens, consecutive non-finite steps, wall time)
and :class:`Meter` the running sums of the current logging interval. Both go into every
checkpoint (``TrainState.state_dict()``), so a resumed run logs exactly what an uninterrupted one
would have.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from llama4.train import losses


class Meter:
    """Running sums over one logging interval; part of the checkpoint so logs resume exactly.

    ``extra`` holds the averages a stage's own loss reports (``LossOutput.metrics``); the
    pretraining loss reports none, so its records carry only the fields below."""

    def __init__(self, n_moe: int = 0, n_experts: int = 0):
        self.n_moe, self.n_experts = n_moe, n_experts
        self.reset()
        self.skipped = 0

    def reset(self):
        self.n, self.ce, self.aux, self.z, self.gn = 0, 0.0, 0.0, 0.0, 0.0
        self.extra: dict[str, float] = {}
        self.loads = torch.zeros(self.n_moe, self.n_experts, dtype=torch.long) if self.n_moe else None

    def add(self, ce, aux, z, gn, loads, extra: dict[str, float] | None = None):
        self.n += 1
        self.ce, self.aux, self.z, self.gn = self.ce + ce, self.aux + aux, self.z + z, self.gn + gn
        if loads is not None:
            self.loads += loads.cpu()
        for k, v in (extra or {}).items():
            self.extra[k] = self.extra.get(k, 0.0) + v

    def flush(self, step, lr, tokens, dt, tokens_per_step) -> dict | None:
        if self.n == 0:
            return None  # every step of the interval was skipped; the next record counts them
        rec = {"step": step, "loss": self.ce / self.n, "lr": lr, "tokens": tokens,
               "tokens_per_s": self.n * tokens_per_step / max(dt, 1e-9), "grad_norm": self.gn / self.n,
               "skipped": self.skipped}
        if self.loads is not None:
            rec.update(aux_loss=self.aux / self.n, z_loss=self.z / self.n,
                       expert_load=[round(v, 4) for v in losses.load_imbalance(self.loads).tolist()])
        rec.update({k: v / self.n for k, v in self.extra.items()})
        self.reset()
        self.skipped = 0
        return rec

    def state_dict(self) -> dict:
        return {"n": self.n, "ce": self.ce, "aux": self.aux, "z": self.z, "gn": self.gn, "loads": self.loads,
                "skipped": self.skipped, "extra": dict(self.extra)}

    def load_state_dict(self, s: dict) -> None:
        self.n, self.ce, self.aux, self.z, self.gn = s["n"], s["ce"], s["aux"], s["z"], s["gn"]
        self.loads, self.skipped = s["loads"], s["skipped"]
        self.extra = dict(s.get("extra", {}))  # checkpoints written before stages could add metrics have none


@dataclass
class TrainState:
    """The loop's progress. ``started`` is this process's start (``time.perf_counter``), not saved:
    ``elapsed_s`` adds the wall time of the sessions before a resume."""

    step: int = 0  # optimizer steps taken (skipped non-finite ones included)
    tokens: int = 0  # training tokens consumed, over all data-parallel ranks
    bad_steps: int = 0  # consecutive non-finite steps right now
    meter: Meter = field(default_factory=Meter)
    elapsed_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed_s(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "bad_steps": self.bad_steps,
                "meter": self.meter.state_dict(), "elapsed_s": self.elapsed_s}

    def load_state_dict(self, s: dict) -> None:
        self.step, self.tokens, self.bad_steps = s["step"], s["tokens"], s["bad_steps"]
        self.elapsed_before = s.get("elapsed_s", 0.0)
        self.meter.load_state_dict(s["meter"])
