"""The study's sizes and its variants (LONG_CONTEXT.md §7.1): same size, steps, data, LR and seeds.

Every variant is the same decoder (dense SwiGLU FFN: the study is about attention, and a dense FFN
keeps each CPU run to minutes) with only the attention layout changed:

    irope        Llama 4 (Scout): RoPE + chunked attention + QK-norm; NoPE + global attention every 4th layer
    irope-noqk   the same without QK-norm (Maverick)
    rope         RoPE and full attention in every layer (the baseline)
    nope         no position encoding, full attention, in every layer
    local        RoPE + chunked attention in every layer, no global layer (the control)

Temperature tuning is off in training (at L it is the identity for any floor_scale >= L) and is
switched on at inference by the study (``probes.apply_temperature``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llama4.model.args import ModelArgs

VARIANTS = ("irope", "irope-noqk", "rope", "nope", "local")


@dataclass(frozen=True)
class StudySpec:
    name: str
    train_len: int  # L: training sequence length (tokens)
    chunk: int  # C: the chunked layers' attention chunk
    # model (one size for every variant)
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    dense_dim: int
    nope_interval: int
    tokenizer_doc_stride: int  # the study's BPE is learned from every n-th training document
    # training
    steps: int
    corpus_rows: int  # per step: windows of the pretraining corpus ...
    passkey_rows: int  # ... and passkey prompts (passkey.py: the loss) ...
    repeat_rows: int  # ... and repeated corpus segments (copying)
    lr: float
    # probes
    multiples: tuple[int, ...]  # longppl: Δ at k·L
    needle_multiples: tuple[int, ...]  # needle: prompts of k·L tokens
    depths: tuple[float, ...]
    n_docs: int  # longppl sequences
    select_k: int  # temperature tuning is chosen at select_k·L ...
    report_ks: tuple[int, ...]  # ... and reported at these (never the selection length)
    attn_scales: tuple[float, ...]
    default_recipe: str  # the README's default model, trained by the study when no --default-model is given
    piece: int = 1024  # prefill piece of the probes
    cost_variants: tuple[str, ...] = VARIANTS  # prefill memory and speed at length: seed 0 of these (+ default)

    @property
    def floor_scales(self) -> tuple[int, ...]:
        return (self.chunk, self.train_len)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FULL = StudySpec(
    name="full", train_len=256, chunk=64, vocab_size=4096, dim=128, n_layers=8, n_heads=4, n_kv_heads=2,
    head_dim=32, dense_dim=256, nope_interval=4, tokenizer_doc_stride=2, steps=700, corpus_rows=2,
    passkey_rows=4, repeat_rows=2, lr=3e-3, multiples=(1, 2, 4, 8, 16, 32, 64), needle_multiples=(1, 2, 4, 8, 16, 32),
    depths=(0, 25, 50, 75, 95), n_docs=8, select_k=8, report_ks=(16, 32, 64), attn_scales=(0.05, 0.1, 0.2),
    default_recipe="default-metap")

# Minutes on one core, every moving part, none of the quality (the tests run it).
QUICK = StudySpec(
    name="quick", train_len=256, chunk=64, vocab_size=2560, dim=32, n_layers=4, n_heads=2, n_kv_heads=1,
    head_dim=16, dense_dim=64, nope_interval=4, tokenizer_doc_stride=16, steps=8, corpus_rows=2,
    passkey_rows=2, repeat_rows=1, lr=3e-3, multiples=(1, 2, 4), needle_multiples=(1, 2), depths=(0, 50, 95), n_docs=2,
    select_k=2, report_ks=(4,), attn_scales=(0.1,), default_recipe="debug", piece=256,
    cost_variants=("irope",))


def variant_args(variant: str, spec: StudySpec) -> ModelArgs:
    """The ModelArgs of one variant; everything but the attention layout is shared."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}")
    layout = {
        "irope": dict(nope_layer_interval=spec.nope_interval, attention_chunk_size=spec.chunk, use_qk_norm=True),
        "irope-noqk": dict(nope_layer_interval=spec.nope_interval, attention_chunk_size=spec.chunk,
                           use_qk_norm=False),
        "rope": dict(nope_layer_interval=None, attention_chunk_size=None, use_qk_norm=True),
        "nope": dict(nope_layer_interval=1, attention_chunk_size=None, use_qk_norm=False),
        "local": dict(nope_layer_interval=None, attention_chunk_size=spec.chunk, use_qk_norm=True),
    }[variant]
    longest = spec.train_len * max(spec.multiples + spec.needle_multiples) + 64  # + the needle's reply
    return ModelArgs(vocab_size=spec.vocab_size, dim=spec.dim, n_layers=spec.n_layers, n_heads=spec.n_heads,
                     n_kv_heads=spec.n_kv_heads, head_dim=spec.head_dim, n_experts=0, dense_dim=spec.dense_dim,
                     rope_theta=10000.0, attn_temperature_tuning=False, max_seq_len=longest, **layout)
