"""Inference room: KV cache that follows iRoPE, sampling, generation, continuous-batching engine."""

from llama4.infer.generate import generate, generate_stream
from llama4.infer.kv_cache import KVCache
from llama4.infer.sampling import Sampler, SamplingParams

__all__ = ["KVCache", "Sampler", "SamplingParams", "generate", "generate_stream"]
