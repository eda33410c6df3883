"""Early fusion: the text decoder reading image features in place of its ``<|patch|>`` tokens.

    model = MultimodalTransformer(flavor("scout"), vision_flavor("scout"), image_token_id=200092)
    logits = model(tokens, pixel_values=tiles)     # tiles (N, 3, 336, 336), all images in order

The image tokens are ordinary causal tokens to the decoder (no image-specific masking). Without
``pixel_values`` the model is exactly its text decoder, so the inference room can drive it like a
``Transformer`` (``args``, ``positions``, ``cache``, ``last_only`` mean the same).
"""

from __future__ import annotations

import torch
from torch import nn

from llama4.model.args import ConfigError, ModelArgs, VisionArgs
from llama4.model.transformer import Transformer
from llama4.model.vision import VisionModel, merge_image_features


class MultimodalTransformer(nn.Module):
    def __init__(self, args: ModelArgs, vision_args: VisionArgs, image_token_id: int):
        super().__init__()
        # (An id past the vocabulary is legal, as in transformers: such a model just never sees images.)
        if isinstance(image_token_id, bool) or not isinstance(image_token_id, int) or image_token_id < 0:
            raise ConfigError(f"MultimodalTransformer.image_token_id must be a token id >= 0, got {image_token_id!r}")
        self.args = args  # the text decoder's: vocab, context, KV-cache shapes
        self.vision_args = vision_args
        self.image_token_id = image_token_id
        self.text = Transformer(args)
        self.vision = VisionModel(vision_args)
        self.projector = nn.Linear(vision_args.output_dim, args.dim, bias=False)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles (N, C, S, S) -> projected features (N * tokens_per_tile, D), in tile order."""
        f = self.vision(pixel_values)  # (N, tokens_per_tile, output_dim)
        return self.projector(f.flatten(0, 1))

    def embed(self, tokens: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D) with the image features merged into the ``<|patch|>`` slots."""
        h = self.text.embed_tokens(tokens)
        if pixel_values is None:  # ``<|patch|>`` ids embed as ordinary tokens, as in HF
            return h
        return merge_image_features(h, tokens, self.image_features(pixel_values), self.image_token_id)

    def forward(self, tokens: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens (B, T), pixel_values (N, C, S, S) -> logits (B, T, V) (or (B, 1, V) with
        ``last_only``). With ``pixel_values`` the embeddings are merged here; ``inputs_embeds`` (from
        ``embed``) lets a caller run a long multimodal prompt in pieces."""
        if pixel_values is not None:
            if inputs_embeds is not None:
                raise ValueError("give pixel_values or inputs_embeds, not both")
            if tokens is None:
                raise ValueError("pixel_values need the tokens that place them")
            inputs_embeds = self.embed(tokens, pixel_values)
        return self.text(tokens, positions=positions, cache=cache, inputs_embeds=inputs_embeds,
                         last_only=last_only)

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        self.text.init_weights(std)
        self.vision.init_weights(std)
        nn.init.normal_(self.projector.weight, std=std)

    @torch.no_grad()
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        device = device or self.text.tok_embeddings.weight.device
        self.text.init_buffers(device)
        self.vision.init_buffers(device)

    def set_moe_impl(self, impl: str) -> None:
        self.text.set_moe_impl(impl)
