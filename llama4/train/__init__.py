"""Training room: pretraining from scratch on the embedded corpus (or any prepared shards).

    from llama4.recipes import get_recipe
    from llama4.train import train
    summary = train(get_recipe("debug"), "runs/debug")

``config.py`` TrainConfig and ``--set`` overrides; ``trainer.py`` the loop, built from ``run.py``
(setup / resume / save), ``state.py`` (TrainState), ``step.py`` (train_step, the seam for other
stages' batch and loss) and ``finish.py`` (final evaluation, export); ``optim.py`` AdamW groups and schedules; ``losses.py`` CE, MoE balance and z-losses; ``checkpointing.py`` atomic
training checkpoints; ``log.py`` progress, metrics.jsonl, plots; ``evaluate.py`` per-language
validation, samples; ``prepare.py`` the run's tokenizer and shards.
"""

from llama4.train.config import TrainConfig, TrainConfigError, apply_overrides
from llama4.train.trainer import (LossOutput, Run, Runtime, StepStats, TrainingDiverged, TrainState, export_final,
                                  finish, setup, train, train_step)

__all__ = ["TrainConfig", "TrainConfigError", "apply_overrides", "Runtime", "TrainingDiverged", "export_final",
           "train", "setup", "train_step", "finish", "Run", "TrainState", "StepStats", "LossOutput"]
