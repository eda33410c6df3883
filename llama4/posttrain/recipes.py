"""Post-training recipes: what ``llama4 posttrain --recipe NAME`` runs, stage by stage.

A recipe names the tasks the assistant learns (the verifiable tasks of ``llama4.tasks``, safety
included), how much of the SFT data is pruned as easy, each stage's budget, and how every stage
is measured. Plain data, no torch: ``llama4 posttrain --help`` lists the names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SAFETY_TASKS = ("safety_harmful", "safety_harmless")


@dataclass(frozen=True)
class PosttrainRecipe:
    name: str
    description: str
    tasks: tuple[str, ...]  # learned in SFT and measured after every stage (safety included)
    # SFT data: ``sft_candidates`` train examples per task, of which the easiest ``prune`` (by the
    # base model's own mean loss on the reference answer, per task) are dropped
    sft_candidates: int
    prune: float
    sft: dict  # llama4.posttrain.sft.sft keyword arguments (max_steps, lr, batch_size, seq_len, ...)
    # RL: the tasks whose SFT pass rate on the validation split lies in ``rl_band`` (Meta: keep
    # medium-to-hard prompts), measured on ``rl_probe`` validation examples each; or a fixed list
    rl: dict  # llama4.posttrain.rl.rl keyword arguments
    rl_tasks: tuple[str, ...] | None = None
    rl_band: tuple[float, float] = (0.1, 0.9)
    rl_probe: int = 32
    # DPO: ``dpo_prompts`` train prompts per task (another draw than SFT's), one sample each from
    # the RL policy; a wrong or unsafe sample becomes a pair against the verified reference answer
    dpo: dict = field(default_factory=dict)  # llama4.posttrain.dpo.dpo keyword arguments
    dpo_prompts: int = 32
    dpo_temperature: float = 1.0
    # measurement after every stage: greedy replies to ``eval_n`` test examples per task, and the
    # validation loss on ``val_docs`` documents per language of the pretraining corpus (forgetting)
    eval_n: int = 64
    eval_max_tokens: int = 48
    val_docs: int = 4
    val_window: int = 256
    show: int = 6  # held-out prompts printed with the base's and the final model's answers


RECIPES: dict[str, PosttrainRecipe] = {}


def _register(r: PosttrainRecipe) -> None:
    RECIPES[r.name] = r


_register(PosttrainRecipe(
    name="debug",
    description="the whole pipeline on a debug/tiny base in about a minute (for tests): few examples, few steps",
    tasks=("copy_span", "arithmetic", *SAFETY_TASKS),
    sft_candidates=24, prune=0.55,
    sft=dict(max_steps=6, lr=1e-3, batch_size=4, seq_len=512, group_by_length=True),
    rl=dict(group_size=4, prompts_per_step=2, max_steps=3, lr=1e-5, max_new_tokens=8, pool_size=8),
    rl_tasks=("arithmetic",),
    dpo=dict(max_steps=3, lr=1e-5, batch_size=2, beta=0.1),
    dpo_prompts=4,
    eval_n=4, eval_max_tokens=8, val_docs=1, val_window=64, show=2,
))

_register(PosttrainRecipe(
    name="default",
    description="the README's assistant: the default-size base taught the short verifiable tasks and safety",
    tasks=("langid", "copy_span", "reverse_span", "count_words", "arithmetic", "sort_list", *SAFETY_TASKS),
    sft_candidates=600, prune=0.55,
    sft=dict(max_steps=300, lr=1e-3, batch_size=16, seq_len=512, group_by_length=True),
    rl=dict(group_size=8, prompts_per_step=8, max_steps=20, lr=1e-4, max_new_tokens=24, pool_size=64),
    dpo=dict(max_steps=20, lr=5e-5, batch_size=8, beta=0.1),
    dpo_prompts=48,
    eval_n=64, eval_max_tokens=40, val_docs=4, val_window=256, show=6,
))


def get_recipe(name: str) -> PosttrainRecipe:
    if name not in RECIPES:
        raise ValueError(f"unknown posttrain recipe {name!r}; expected one of {', '.join(RECIPES)}")
    return RECIPES[name]


__all__ = ["PosttrainRecipe", "RECIPES", "get_recipe", "SAFETY_TASKS"]
