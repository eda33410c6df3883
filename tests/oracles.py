"""``require``: import a test dependency, or fail the run saying how to get it.

An oracle (code no one here wrote: transformers, llama-models, fairscale, mup, the openai client...)
or a package a test drives is never optional: a missing one must fail, not skip, or "exact vs Meta"
would read as passed on a machine that never ran it. ``scripts/setup.sh`` installs every one of
them into .venv.

This lives in its own module, not in conftest.py: tests/, tests/data/ and tests/tokenizer/ each
have a conftest.py, all imported under the one module name ``conftest`` (pytest's default import
mode), so ``from conftest import ...`` would resolve to whichever was loaded last. tests/ is on
sys.path for every test (the root conftest puts it there), so ``from oracles import require``
works from every folder.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest

# module name -> the distribution pip installs (where they differ)
_DIST = {"PIL": "pillow", "skimage": "scikit-image", "sklearn": "scikit-learn", "llama_models": "llama-models"}


def require(module: str) -> ModuleType:
    """The imported ``module``; if it cannot be imported, fail (at module level: a collection
    error) with the package's name and the command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        error = e
    dist = _DIST.get(module.split(".")[0], module.split(".")[0])
    pytest.fail(f"test dependency {dist!r} is missing ({module}: {error}); it is required, not optional: "
                f"`bash scripts/setup.sh` installs it into .venv", pytrace=False)
