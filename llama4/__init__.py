"""llama4: the Llama 4 system in readable, fast PyTorch.

The model itself lives in :mod:`llama4.model` (pure ``nn.Module`` s); every other room wraps it
from outside. Top-level helpers are imported lazily so ``import llama4`` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["load", "save", "generate", "ModelArgs", "Transformer", "__version__"]


def load(path, dtype=None, device=None):
    """Load a Llama 4 model from a Hugging Face directory or Meta's native layout."""
    from llama4.checkpoint import load as _load

    return _load(path, dtype=dtype, device=device)


def save(model, path, **kwargs):
    """Write ``model`` in the Hugging Face layout (config.json + safetensors); with
    ``tokenizer=`` (a Tokenizer or a path) also tokenizer.json, tokenizer_config.json (Llama 4's
    chat template), special_tokens_map.json and generation_config.json, so transformers'
    AutoTokenizer and pipelines load the folder as is. See :func:`llama4.checkpoint.save`."""
    from llama4.checkpoint import save as _save

    return _save(model, path, **kwargs)


def generate(model, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, top_k=None, seed=None,
             stop=None, **kwargs):
    """New token ids for a prompt (list of ids) or a batch of prompts; greedy by default.
    See :func:`llama4.infer.generation.generate`."""
    from llama4.infer.generation import generate as _generate

    return _generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                     seed=seed, stop=stop, **kwargs)


def __getattr__(name):
    if name in ("ModelArgs", "Transformer"):
        import llama4.model as m

        return getattr(m, name)
    raise AttributeError(name)
