"""Pure PyTorch Llama 4 model: nn.Modules and typed configs, no I/O, no distributed logic."""

from llama4.model.args import (FLAVORS, VISION_FLAVORS, ConfigError, ModelArgs, RopeScaling, VisionArgs, flavor,
                               vision_flavor)
from llama4.model.attention import Attention
from llama4.model.layers import FeedForward, RMSNorm
from llama4.model.moe import MoE, GroupedExperts
from llama4.model.multimodal import MultimodalTransformer
from llama4.model.params import count_params, kv_bytes_per_token
from llama4.model.transformer import Transformer, TransformerBlock
from llama4.model.vision import VisionModel

__all__ = ["FLAVORS", "ConfigError", "ModelArgs", "RopeScaling", "flavor", "Attention", "FeedForward",
           "RMSNorm", "MoE", "GroupedExperts", "count_params", "kv_bytes_per_token", "Transformer",
           "TransformerBlock", "VISION_FLAVORS", "VisionArgs", "vision_flavor", "MultimodalTransformer",
           "VisionModel"]
