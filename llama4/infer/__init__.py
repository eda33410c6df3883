"""Inference room: KV cache that follows iRoPE, sampling, generation, continuous-batching engine.

    from llama4.infer import generate, Engine, EngineConfig, load_model_dir

``generate`` / ``generate_stream`` live in :mod:`llama4.infer.generation`. Names are imported on
first use (module ``__getattr__``), so importing a light submodule such as ``llama4.infer.cli``
does not load torch.
"""

from importlib import import_module as _import_module

_WHERE = {
    "Engine": "engine", "EngineConfig": "engine", "Request": "engine",
    "generate": "generation", "generate_stream": "generation",
    "KVCache": "kv_cache", "load_model_dir": "model_dir",
    "Sampler": "sampling", "SamplingParams": "sampling", "DecodeStep": "step",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'llama4.infer' has no attribute {name!r}")
    value = getattr(_import_module(f"llama4.infer.{_WHERE[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
