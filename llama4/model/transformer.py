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
        h = self.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds
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

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D): the embedding lookup, times MetaP's ``embed_mult``."""
        h = self.tok_embeddings(tokens)
        return h if self.args.embed_mult == 1.0 else h * self.args.embed_mult

    # ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, stds: dict[str, float | None] | None = None) -> None:
        """Initialise every parameter (works after ``to_empty()`` from the meta device).

        Standard parametrization: N(0, std) everywhere, residual outputs (wo, w2) scaled by
        1/sqrt(2 * n_layers) as in GPT-2 so the residual stream's variance does not grow with depth.
        ``stds`` replaces that with one std per parameter name (a parametrization's table, e.g.
        ``llama4.metap.MetaP.init_stds``); None means ones for norm gains and zeros for biases.
        Parameters are drawn in one fixed order, so equal tables give equal weights."""
        if stds is None:
            stds = self.standard_init_stds(std)
        self.init_buffers()
        for name, p in self.init_order():
            if name not in stds:
                raise ValueError(f"init_weights: no std for parameter {name!r}")
            s = stds[name]
            if s is None:
                (nn.init.ones_ if name.endswith("norm.weight") else nn.init.zeros_)(p)
            elif s == 0:
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, std=s)

    def init_order(self) -> list[tuple[str, nn.Parameter]]:
        """Every parameter in the draw order: embedding, head, final norm, then block by block
        norms, attention, and the FFN (dense, or shared expert, router, routed experts)."""
        order = ["tok_embeddings.weight", "output.weight", "norm.weight"]
        for i, layer in enumerate(self.layers):
            pre = f"layers.{i}."
            order += [pre + "attention_norm.weight", pre + "ffn_norm.weight"]
            for n in ("wq", "wk", "wv", "wo"):
                order += [f"{pre}attention.{n}.weight", f"{pre}attention.{n}.bias"]
            ffn = pre + "feed_forward."
            if isinstance(layer.feed_forward, MoE):
                order += [f"{ffn}shared_expert.{n}.weight" for n in ("w1", "w3", "w2")]
                order += [ffn + "router.weight"] + [f"{ffn}experts.{n}" for n in ("w1", "w3", "w2")]
            else:
                order += [f"{ffn}{n}.weight" for n in ("w1", "w3", "w2")]
        named = dict(self.named_parameters())
        listed = [(n, named.pop(n)) for n in order if n in named]
        return listed + list(named.items())  # anything else (none today) last

    def standard_init_stds(self, std: float = 0.02) -> dict[str, float | None]:
        out_std = std / math.sqrt(2 * self.args.n_layers)
        stds: dict[str, float | None] = {}
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                stds[name] = None
            elif name.endswith(("attention.wo.weight", "w2.weight", "experts.w2")):
                stds[name] = out_std
            else:
                stds[name] = std
        return stds

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
