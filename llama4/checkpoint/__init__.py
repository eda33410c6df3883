"""Checkpoint adapters: Hugging Face and Meta layouts <-> our model (all key remapping lives here).

    load(path, dtype=None, device=None)                  # HF dir or Meta dir -> Transformer, or
                                                         # MultimodalTransformer for a multimodal HF dir
    save(model, path, max_shard_size="5GB", dtype=None)  # HF layout (Llama4ForCausalLM or
                                                         # Llama4ForConditionalGeneration), atomic
"""

from llama4.checkpoint.common import CheckpointConfigError, CheckpointError
from llama4.checkpoint.hf import args_from_hf_config, hf_config_from_args
from llama4.checkpoint.hf_vision import hf_mm_config_from_args, vision_args_from_hf_config
from llama4.checkpoint.meta import args_from_meta_params
from llama4.checkpoint.store import load, load_hf, load_meta, save

__all__ = ["load", "save", "load_hf", "load_meta", "CheckpointError", "CheckpointConfigError",
           "args_from_hf_config", "hf_config_from_args", "args_from_meta_params", "vision_args_from_hf_config",
           "hf_mm_config_from_args"]
