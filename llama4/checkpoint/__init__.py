"""Checkpoint adapters: Hugging Face and Meta layouts <-> our model (all key remapping lives here).

    load(path, dtype=None, device=None) -> Transformer   # HF dir (text or multimodal) or Meta dir
    save(model, path, max_shard_size="5GB", dtype=None)  # HF Llama4ForCausalLM layout, atomic
"""

from llama4.checkpoint.common import CheckpointConfigError, CheckpointError
from llama4.checkpoint.hf import args_from_hf_config, hf_config_from_args
from llama4.checkpoint.meta import args_from_meta_params
from llama4.checkpoint.store import load, load_hf, load_meta, save

__all__ = ["load", "save", "load_hf", "load_meta", "CheckpointError", "CheckpointConfigError",
           "args_from_hf_config", "hf_config_from_args", "args_from_meta_params"]
