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

import contextlib
import functools
import importlib
import subprocess
import sys
import warnings
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


def llama_cpp_model(path, **kw):
    """``llama_cpp.Llama(model_path=path, **kw)``: a GGUF opened by llama.cpp as its users open it.

    Except where llama.cpp's extra weight-buffer types (its AMX and repacked-weight kernels)
    crash the process: seen on a VM whose CPU reports AMX (SIGSEGV at ``ldtilecfg`` in
    ``ggml_backend_amx_mul_mat``, llama-cpp-python 0.3.36 built natively there). A child process
    tries the file first; if a signal kills it, the file is opened without those buffer types
    (plain CPU kernels, same arithmetic), with a warning, since speeds then differ from a default
    llama.cpp (benchmarks/bench_llamacpp.py prints it too)."""
    llama_cpp = require("llama_cpp")
    if not extra_buffers_crash(str(path)):
        return llama_cpp.Llama(model_path=str(path), **kw)
    warnings.warn(f"llama.cpp crashed on {path} with its extra weight-buffer types (AMX / repacked "
                  f"kernels) on this machine; opened without them", RuntimeWarning, stacklevel=2)
    with _without_extra_buffers(llama_cpp):
        return llama_cpp.Llama(model_path=str(path), **kw)


@functools.cache
def extra_buffers_crash(path: str) -> bool:
    """Whether llama.cpp, with its defaults, is killed by a signal evaluating 3 tokens of ``path``."""
    code = ("import sys, llama_cpp; m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_threads=1, "
            "verbose=False); m.eval([1, 2, 3])")
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, timeout=600)
    return r.returncode < 0  # any other failure shows itself, with its message, in the real call


@contextlib.contextmanager
def _without_extra_buffers(llama_cpp):
    # Llama() takes its model params from llama_model_default_params() and has no argument for
    # this field of llama.h's llama_model_params
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        yield
    finally:
        low.llama_model_default_params = default
