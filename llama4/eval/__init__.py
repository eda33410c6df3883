"""Evaluation room: ``llama4 eval``.

* :mod:`llama4.eval.suites`  verifiable task suites (``llama4.tasks``) generated on our engine, scored
* :mod:`llama4.eval.ppl`     bits per byte per language on the corpus's held-out text
* :mod:`llama4.eval.needle`  needle in a haystack (passkey retrieval over long prompts)
* :mod:`llama4.eval.longppl` long-context loss probe: per-position loss and Δ(k)
* :mod:`llama4.eval.cli`     the argument parser

The evaluation modules import torch and the corpus only when a function runs (``llama4 --help``
imports the parser in ``cli``). When the lm-evaluation-harness is installed, importing
``llama4.eval`` registers the ``llama4`` model with lm-eval as a lazy "module:Class" entry (only
lm-eval's small registry module is imported here), so ``lm_eval.simple_evaluate(model="llama4",
...)`` finds it and imports :mod:`llama4.eval.lm_eval_model` (and torch) only then.
"""

from importlib.util import find_spec as _find_spec
from pathlib import Path as _Path

_LM_EVAL_MODEL = "llama4.eval.lm_eval_model:Llama4LM"

# lm-eval is a test dependency, not a runtime one: without it, `llama4 eval --suite` still works
if _Path(__file__).with_name("lm_eval_model.py").is_file() and _find_spec("lm_eval") is not None:
    from lm_eval.api.registry import model_registry as _registry

    if "llama4" not in _registry:  # lm_eval_model may have been imported (and registered) first
        _registry.register("llama4", target=_LM_EVAL_MODEL)
