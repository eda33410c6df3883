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

from importlib import import_module as _import_module

# Imported on first use (module __getattr__), so `llama4 train --help` (llama4.train.cli) loads no torch.
_WHERE = {**dict.fromkeys(("TrainConfig", "TrainConfigError", "apply_overrides"), "config"),
          **dict.fromkeys(("LossOutput", "Run", "Runtime", "StepStats", "TrainingDiverged", "TrainState",
                           "export_final", "finish", "setup", "train", "train_step"), "trainer")}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'llama4.train' has no attribute {name!r}")
    value = getattr(_import_module(f"llama4.train.{_WHERE[name]}"), name)
    globals()[name] = value
    return value

__all__ = ["TrainConfig", "TrainConfigError", "apply_overrides", "Runtime", "TrainingDiverged", "export_final",
           "train", "setup", "train_step", "finish", "Run", "TrainState", "StepStats", "LossOutput"]
