"""MetaP room: a width/depth/expert-transferable parametrization, the coordinate check, LR sweeps
and the hyper-parameter predictor fitted on them.

    from llama4.metap import MetaP, MetaPConfig, BaseShape
    plan = MetaP(MetaPConfig(base=BaseShape.of(small_args)), big_args)
    model = Transformer(plan.model_args()); plan.init_weights(model)
    opt = torch.optim.AdamW(plan.param_groups(model, weight_decay=0.1, eps=1e-8), lr=base_lr)
"""

from importlib import import_module as _import_module


def __getattr__(name: str):  # imported on first use, so `llama4 metap --help` loads no torch
    if name not in ("BaseShape", "Group", "MetaP", "MetaPConfig"):
        raise AttributeError(f"module 'llama4.metap' has no attribute {name!r}")
    value = getattr(_import_module("llama4.metap.param"), name)
    globals()[name] = value
    return value

__all__ = ["BaseShape", "Group", "MetaP", "MetaPConfig"]
