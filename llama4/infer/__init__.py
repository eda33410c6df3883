"""Inference room: KV cache that follows iRoPE, sampling, generation, continuous-batching engine.

    from llama4.infer import generate, Engine, EngineConfig, load_model_dir
"""

from llama4.infer.engine import Engine, EngineConfig, Request
from llama4.infer.generate import generate, generate_stream
from llama4.infer.kv_cache import KVCache
from llama4.infer.model_dir import load_model_dir
from llama4.infer.sampling import Sampler, SamplingParams
from llama4.infer.step import DecodeStep

__all__ = ["DecodeStep", "Engine", "EngineConfig", "KVCache", "Request", "Sampler", "SamplingParams", "generate",
           "generate_stream", "load_model_dir"]
