"""Small CPU recipes: the seconds-long smoke test and the README's ten-minute main job."""

from __future__ import annotations

from llama4.model.args import ModelArgs
from llama4.train.config import TrainConfig


def debug() -> TrainConfig:
    """Seconds on one core: every moving part (BPE, MoE with shared expert every 2nd layer, a
    NoPE layer, chunked attention, checkpoints, eval, samples, export), none of the quality."""
    model = ModelArgs(vocab_size=2560, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16,
                      n_experts=4, top_k=1, expert_dim=128, dense_dim=256, interleave_moe_layer_step=2,
                      nope_layer_interval=4, attention_chunk_size=32, floor_scale=8192.0, rope_theta=10000.0,
                      max_seq_len=4096)
    return TrainConfig(name="debug", model=model, tokenizer_doc_stride=16, seq_len=64, batch_size=8,
                       max_steps=20, lr=3e-3, warmup_steps=4, checkpoint_every=10, keep_checkpoints=2,
                       log_every=1, eval_every=10, eval_batches=1, final_eval_batches=1, sample_tokens=8,
                       sample_langs=("eng", "deu", "rus"), load_eval_windows=32)


def _default_model(n_experts: int) -> ModelArgs:
    # Scout-like structure at toy scale: MoE with a shared expert in every layer, top-1 routing,
    # iRoPE (RoPE + chunked attention in layers 0-2, NoPE + global attention in layer 3), QK-norm,
    # GQA. The dense FFN (only used by `default-dense`) is as wide as routed + shared expert.
    # Width and depth were picked by a sweep at equal CPU time (README): at this budget a
    # narrow 4-layer model over an 8k vocabulary beat wider/deeper ones and a 4k vocabulary in
    # bits per byte, and 8 x 256 sequences per step beat 16 x 256 at the same tokens.
    return ModelArgs(vocab_size=8192, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32,
                     n_experts=n_experts, top_k=1, expert_dim=256, dense_dim=512, interleave_moe_layer_step=1,
                     nope_layer_interval=4, attention_chunk_size=128, floor_scale=8192.0, rope_theta=10000.0,
                     max_seq_len=4096)


def default() -> TrainConfig:
    """The README's main job: ~10 minutes on 2 CPU cores, from an own BPE to samples."""
    return TrainConfig(name="default", model=_default_model(8), seq_len=256, batch_size=8, max_steps=1080,
                       lr=3e-3, warmup_steps=50, schedule="cosine", min_lr_ratio=0.1, balance="aux_loss+bias",
                       aux_loss_coef=0.01, bias_update_rate=5e-3, z_loss_coef=1e-3, checkpoint_every=200, keep_checkpoints=2,
                       log_every=10, eval_every=120, eval_batches=1, final_eval_batches=8, sample_tokens=40)


def default_dense() -> TrainConfig:
    """`default` with every FFN dense and as wide as the MoE's active experts (routed + shared =
    2 x expert_dim): the same data, tokens and active parameters, no experts."""
    cfg = default()
    return cfg.replace(name="default-dense", model=cfg.model.replace(n_experts=0))


def default_metap() -> TrainConfig:
    """`default` under MetaP: the base LR and per-layer rules that `llama4 metap predict` gives the
    default model for its 2.2M tokens from the reference sweep (byte-level proxies of width 32..256
    shipped in llama4/metap/reference_sweep). Nothing else changes."""
    from llama4.metap.predict import REFERENCE_SWEEP, predict

    cfg = default()
    p = predict(REFERENCE_SWEEP, "default", cfg.max_steps * cfg.tokens_per_step, cfg.tokens_per_step)
    o = p["train_overrides"]
    return cfg.replace(name="default-metap", parametrization=o["parametrization"], metap=o["metap"], lr=o["lr"])


def scout_like() -> TrainConfig:
    """A Scout-shaped MoE (16 experts, MoE in every layer) at hidden 512, for the benchmarks."""
    model = ModelArgs(vocab_size=8192, dim=512, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64,
                      n_experts=16, top_k=1, expert_dim=1024, dense_dim=2048, interleave_moe_layer_step=1,
                      nope_layer_interval=4, attention_chunk_size=256, floor_scale=8192.0, rope_theta=10000.0,
                      max_seq_len=4096)
    return TrainConfig(name="scout-like", model=model, seq_len=512, batch_size=8, max_steps=100)
