"""Named training recipes: plain Python functions returning a :class:`~llama4.train.TrainConfig`.

    llama4 train --recipe debug --out runs/debug          # seconds: the smoke test
    llama4 train --recipe default --out runs/default      # the README's main job (~10 min, 2 cores)
    llama4 train --recipe default-dense --out runs/dense  # the dense baseline of `default`
    llama4 train --recipe default-metap --out runs/metap  # `default` with MetaP's predicted per-layer LRs

Any field can be changed from the command line with ``--set key=value`` (``model.key=value``).
"""

from __future__ import annotations

from typing import Callable

from llama4.recipes.small import debug, default, default_dense, default_metap, scout_like
from llama4.train.config import TrainConfig

RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "debug": debug,
    "default": default,
    "default-dense": default_dense,
    "default-metap": default_metap,
    "scout-like": scout_like,
}


def get_recipe(name: str) -> TrainConfig:
    try:
        return RECIPES[name]()
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}") from None


__all__ = ["RECIPES", "get_recipe"]
