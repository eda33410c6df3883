"""MetaP room: a width/depth/expert-transferable parametrization, the coordinate check, LR sweeps
and the hyper-parameter predictor fitted on them.

    from llama4.metap import MetaP, MetaPConfig, BaseShape
    plan = MetaP(MetaPConfig(base=BaseShape.of(small_args)), big_args)
    model = Transformer(plan.model_args()); plan.init_weights(model)
    opt = torch.optim.AdamW(plan.param_groups(model, weight_decay=0.1, eps=1e-8), lr=base_lr)
"""

from llama4.metap.param import BaseShape, Group, MetaP, MetaPConfig

__all__ = ["BaseShape", "Group", "MetaP", "MetaPConfig"]
