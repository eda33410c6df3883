"""The Llama 4 text decoder: pre-norm blocks alternating dense/MoE FFNs and RoPE/NoPE attention.

    h = embed(tokens)                          # no embedding scaling
    for each block:  h += attn(norm(h));  h += ffn(norm(h))
    logits = output(norm(h))                   # untied output head

MetaP (llama4.metap) adds constant multipliers on the embedding, the residual branches and the
logits (ModelArgs.embed_mult / residual_mult / logit_mult); all are 1 for Llama 4 itself.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llama4.model.args import ModelArgs
from llama4.model.attention import Attention, LayerKVCache
from llama4.model.layers import FeedForward, RMSNorm, RotaryEmbedding
from llama4.model.moe import MoE


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.is_moe = args.is_moe_layer(layer_id)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args, layer_id)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = MoE(args) if self.is_moe else FeedForward(args.dim, args.dense_dim)
        self.residual_mult = args.residual_mult

    def forward(self, h, rope, positions, cache: LayerKVCache | None = None):
        r = self.residual_mult
        a = self.attention(self.attention_norm(h), rope, positions, cache)
        h = h + a if r == 1.0 else h + r * a
        f = self.feed_forward(self.ffn_norm(h))
        return h + f if r == 1.0 else h + r * f


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.rope = RotaryEmbedding(args)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor | None = None, *, positions: torch.Tensor | None = None,
                cache: list[LayerKVCache] | None = None, inputs_embeds: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens: (B, T) ids -> logits (B, T, V), or (B, 1, V) with ``last_only``.

        ``positions`` (T,) or (B, T) are absolute token positions (default 0..T-1; they drive
        RoPE and temperature tuning). ``cache`` is one hook per layer (inference room).
        ``inputs_embeds`` (B, T, D) replaces the token embedding: the early-fusion merge point.
        """
        if inputs_embeds is None:
            h = self.tok_embeddings(tokens)
            if self.args.embed_mult != 1.0:
                h = h * self.args.embed_mult
        else:
            h = inputs_embeds
        if positions is None:
            if cache is not None:
                raise ValueError("Transformer.forward: positions are required when a cache is given")
            positions = torch.arange(h.shape[1], device=h.device)
        rope = self.rope(positions)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, positions, None if cache is None else cache[i])
        if last_only:
            h = h[:, -1:]
        logits = self.output(self.norm(h))
        return logits if self.args.logit_mult == 1.0 else logits * self.args.logit_mult

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Standard parametrization: N(0, std) everywhere, residual outputs (wo, w2) scaled by
        1/sqrt(2 * n_layers) as in GPT-2 so the residual stream's variance does not grow with
        depth. Works after ``to_empty()`` from the meta device; MetaP overrides this."""
        out_std = std / math.sqrt(2 * self.args.n_layers)
        self.init_buffers()
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        nn.init.normal_(self.output.weight, std=std)
        self.norm.reset_parameters()
        for layer in self.layers:
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
            attn = layer.attention
            for lin in (attn.wq, attn.wk, attn.wv, attn.wo):
                nn.init.normal_(lin.weight, std=out_std if lin is attn.wo else std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            ffn = layer.feed_forward
            dense = ffn.shared_expert if isinstance(ffn, MoE) else ffn
            nn.init.normal_(dense.w1.weight, std=std)
            nn.init.normal_(dense.w3.weight, std=std)
            nn.init.normal_(dense.w2.weight, std=out_std)
            if isinstance(ffn, MoE):
                nn.init.normal_(ffn.router.weight, std=std)
                nn.init.normal_(ffn.experts.w1, std=std)
                nn.init.normal_(ffn.experts.w3, std=std)
                nn.init.normal_(ffn.experts.w2, std=out_std)

    @torch.no_grad()
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the non-persistent buffers (RoPE frequencies, MoE selection bias), which no
        checkpoint holds: call after materialising from the meta device or loading with assign."""
        device = device or self.tok_embeddings.weight.device
        self.rope.reset_parameters(device)
        for m in self.modules():
            if isinstance(m, MoE):
                m.expert_bias = torch.zeros(m.n_experts, device=device)

    def set_moe_impl(self, impl: str) -> None:
        """"grouped" (sparse grouped matmul), "loop" (per-expert reference) or "gather" (indexed
        expert weights: for decode-sized batches and torch.compile)."""
        if impl not in ("grouped", "loop", "gather"):
            raise ValueError(f"unknown MoE impl {impl!r}; use 'grouped', 'loop' or 'gather'")
        for m in self.modules():
            if isinstance(m, MoE):
                m.impl = impl
