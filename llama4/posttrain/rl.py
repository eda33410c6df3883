"""Online RL with verifiable rewards (``llama4 rl``): GRPO on the task verifiers, with adaptive
prompt filtering.

    from llama4.posttrain.rl import rl
    rl("runs/sft", "runs/rl", tasks=["arithmetic"], group_size=8, prompts_per_step=4, max_steps=100)

Every optimizer step:

1. draw ``prompts_per_step`` prompts from the :class:`~llama4.posttrain.filtering.PromptPool`
   (medium-to-hard ones by running pass rate; the pool refills from the task generators);
2. sample ``group_size`` completions of each with our own batched generator
   (``llama4.infer.generation.generate``: KV cache, temperature / top-p), from the model being
   trained, in eval mode under ``inference_mode``; sample g of every prompt uses seed
   ``hash(seed, step, g)`` so a resumed run samples the same;
3. score them with the task's verifier, update the prompts' pass rates, compute group advantages;
4. one ``llama4.train.train_step`` on :func:`~llama4.posttrain.grpo_loss.grpo_loss` over the whole
   generation batch as one micro-batch. One update per generation batch, so the old log-probs are
   ``logp.detach()`` (ratio 1, as TRL with ``num_iterations=1``); the reference log-probs (only
   with ``beta`` > 0) come from a frozen copy of the starting policy.

Every ``reestimate_every`` steps the pool's pass rates are re-estimated with fresh samples from
the current policy. ``metrics.jsonl`` records reward, pass_rate, kl (when a reference is kept),
entropy, response_length, the clip ratios and the pool's kept-prompt fraction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from llama4.posttrain.filtering import PromptPool
from llama4.posttrain.grpo_loss import LOSS_TYPES, group_advantages, grpo_loss
from llama4.posttrain.logprobs import pad_completions, selective_log_softmax
from llama4.posttrain.stage import build_stage_run, open_base, reference_model, run_stage, stage_config
from llama4.tasks.base import stable_hash
from llama4.train import losses
from llama4.train.step import LossOutput

DEFAULTS = dict(lr=1e-5, max_steps=100, weight_decay=0.0, schedule="constant", warmup_steps=0, grad_accum=1)


@dataclass
class RLBatch:
    input_ids: torch.Tensor  # (B, T) prompt + completion, right-padded
    completion_mask: torch.Tensor  # (B, T)
    advantages: torch.Tensor  # (B,)
    ref_logp: torch.Tensor | None  # (B, T-1) reference per-token log-probs, or None
    metrics: dict  # generation-side numbers for metrics.jsonl


def per_token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1) log-prob of each next token (position t predicts ``input_ids[:, t+1]``)."""
    return selective_log_softmax(logits[:, :-1].float(), input_ids[:, 1:])


class RLLoader:
    """The RL "loader": each :meth:`next_batch` is one generation batch, sampled from ``model``
    (set after the run is built). Its ``state_dict`` (the prompt pool, the batch counter) is saved
    with each checkpoint, so ``--resume`` continues with the same pool and seeds."""

    def __init__(self, pool: PromptPool, tok, group_size: int, prompts_per_step: int, max_new_tokens: int,
                 temperature: float, top_p: float, scale_rewards: str, seed: int, max_seq_len: int):
        self.pool, self.tok, self.G, self.P = pool, tok, group_size, prompts_per_step
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.scale_rewards, self.seed, self.max_seq_len = scale_rewards, seed, max_seq_len
        self.model = None
        self.ref = None
        self.batches = 0

    # -- sampling ------------------------------------------------------------------------------
    def check_prompts(self, examples) -> list[list[int]]:
        """The chat-format prompt ids of ``examples``; a ValueError if one leaves no room for the reply."""
        from llama4.tokenizer.chat_format import encode_dialog_prompt

        prompts = [encode_dialog_prompt(self.tok, list(ex.messages)) for ex in examples]
        for ex, p in zip(examples, prompts):
            if len(p) + self.max_new_tokens > self.max_seq_len:
                raise ValueError(f"task {ex.task}: a prompt of {len(p)} tokens + --max-new-tokens "
                                 f"{self.max_new_tokens} exceeds the policy's max_seq_len {self.max_seq_len}")
        return prompts

    def sample(self, examples, n: int, tag: str) -> tuple[list[list[int]], list[list[list[int]]]]:
        """Prompt ids of each example and ``n`` completions of each, from the current ``model``."""
        from llama4.infer.generation import generate
        from llama4.posttrain.lora import adapters_cached

        prompts = self.check_prompts(examples)
        model = self.model
        was_training = model.training
        model.eval()
        losses.record_router_stats(model, False)
        try:
            # unmerged LoRA adapters: W + delta once per weight, not at every decoded token
            with torch.inference_mode(), adapters_cached():
                outs = [generate(model, prompts, self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                 seed=stable_hash(self.seed, tag, g) % (2 ** 62), stop=self.tok.stop_tokens)
                        for g in range(n)]
        finally:
            losses.record_router_stats(model, True)
            model.train(was_training)
        return prompts, [[outs[g][i] for g in range(n)] for i in range(len(examples))]

    def score(self, ex, completion: list[int]) -> float:
        from llama4.eval.common import reply_text

        return float(self.pool.tasks[ex.task].score(ex, reply_text(self.tok, completion)))

    def sample_scores(self, examples, n: int) -> list[list[float]]:
        """For :meth:`PromptPool.reestimate`: ``n`` fresh verifier scores per example."""
        _, comps = self.sample(examples, n, f"reestimate{self.batches}")
        return [[self.score(ex, c) for c in cs] for ex, cs in zip(examples, comps)]

    # -- one generation batch ------------------------------------------------------------------
    def next_batch(self) -> RLBatch:
        chosen = self.pool.draw(self.P)
        examples = [p.example for p in chosen]
        prompts, comps = self.sample(examples, self.G, f"step{self.batches}")
        self.batches += 1
        rows_p, rows_c, rewards, passed = [], [], [], []
        for p, prompt, cs in zip(chosen, prompts, comps):
            scores = [self.score(p.example, c) for c in cs]
            self.pool.update(p.key, scores)
            for c, s in zip(cs, scores):
                rows_p.append(prompt)
                rows_c.append(c if c else [self.tok.eot_id])  # an empty reply still ends its turn
                rewards.append(s)
                passed.append(float(s >= self.pool.solved_at))
        r = torch.tensor(rewards, dtype=torch.float32)
        adv = group_advantages(r, self.G, self.scale_rewards)
        batch = pad_completions(rows_p, rows_c, pad_id=self.tok.eot_id)
        ref_logp = None
        if self.ref is not None:
            device = next(self.ref.parameters()).device
            with torch.no_grad():
                ref_logp = per_token_logps(self.ref(batch.input_ids.to(device)), batch.input_ids.to(device))
        std_zero = torch.isclose(r.view(-1, self.G).std(dim=1), torch.zeros(1)).float().mean().item()
        metrics = {"completion_tokens": float(batch.completion_mask.sum()), "reward": r.mean().item(), "reward_std": r.std().item() if r.numel() > 1 else 0.0,
                   "pass_rate": sum(passed) / len(passed), "frac_reward_zero_std": std_zero,
                   "response_length": sum(len(c) for c in rows_c) / len(rows_c),
                   **{k: float(v) for k, v in self.pool.stats().items()}}
        return RLBatch(batch.input_ids, batch.completion_mask, adv, ref_logp, metrics)

    def state_dict(self) -> dict:
        return {"batches": self.batches, "pool": self.pool.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.batches = sd["batches"]
        self.pool.load_state_dict(sd["pool"])


def make_loss(loss_type: str, beta: float, eps_low: float, eps_high: float | None, max_new_tokens: int):
    def rl_loss(run, batch: RLBatch) -> LossOutput:
        device = run.rt.device
        ids, cmask = batch.input_ids.to(device), batch.completion_mask.to(device)
        with run.autocast():
            logits = run.model(ids)
        logits = logits[:, :-1].float()
        logp = selective_log_softmax(logits, ids[:, 1:])
        mask = cmask[:, 1:]
        ref = batch.ref_logp.to(device) if batch.ref_logp is not None else None
        out = grpo_loss(logp, None, ref, batch.advantages.to(device), mask, loss_type=loss_type, eps_low=eps_low,
                        eps_high=eps_high, beta=beta, max_completion_length=max_new_tokens)
        with torch.no_grad():
            lp = torch.log_softmax(logits, dim=-1)
            ent = -(lp.exp() * lp).sum(-1)
            m = mask.float()
            entropy = ((ent * m).sum() / m.sum().clamp(min=1)).item()
        return LossOutput(out.loss, {**batch.metrics, **out.metrics, "entropy": entropy})

    return rl_loss


def rl(policy, out, tasks, *, group_size: int = 8, prompts_per_step: int = 4, max_steps: int | None = None,
       lr: float | None = None, beta: float = 0.0, loss_type: str = "dapo", temperature: float = 1.0,
       top_p: float = 1.0, max_new_tokens: int = 64, eps_low: float = 0.2, eps_high: float | None = 0.28,
       scale_rewards: str = "group", pool_size: int = 64, min_pass: float = 0.0, max_pass: float = 1.0,
       min_samples: int | None = None, solved_at: float = 1.0, difficulty: int | None = None,
       reestimate_every: int = 0, resume: bool = False, seed: int = 0, overrides: dict | None = None,
       lora=None) -> dict:
    """Train the model in ``policy`` with GRPO on ``tasks`` (names) into ``out``; returns the summary.
    ``eps_high`` 0.28 is DAPO's clip-higher (``None``: symmetric). ``overrides``: any TrainConfig field."""
    started = time.perf_counter()
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if group_size < 2:
        raise ValueError(f"--group-size must be >= 2 (advantages compare samples of one prompt), got {group_size}")
    if prompts_per_step < 1 or max_new_tokens < 1:
        raise ValueError("--prompts-per-step and --max-new-tokens must be >= 1")
    if temperature <= 0:
        raise ValueError(f"--temperature must be > 0 (GRPO needs different samples per prompt), got {temperature}")
    if beta < 0:
        raise ValueError(f"--beta must be >= 0, got {beta}")
    pool = PromptPool(names, size=max(pool_size, prompts_per_step), min_pass=min_pass, max_pass=max_pass,
                      min_samples=min_samples or group_size, window=max(16, 2 * group_size), solved_at=solved_at,
                      difficulty=difficulty, seed=seed)
    fields = dict(DEFAULTS, seed=seed, batch_size=group_size * prompts_per_step)
    for k, v in (("max_steps", max_steps), ("lr", lr)):
        if v is not None:
            fields[k] = v
    fields.update(overrides or {})
    base = open_base(policy)
    cfg = stage_config(base, "rl", **fields)
    if cfg.grad_accum != 1:
        raise ValueError("rl takes one generation batch per optimizer step (grad_accum 1)")
    loader = RLLoader(pool, base.tokenizer, group_size, prompts_per_step, max_new_tokens, temperature, top_p,
                      scale_rewards, seed, base.args.max_seq_len)
    if not resume:  # bad input (a prompt too long for the policy) is refused before anything is written
        pool.refill()
        loader.check_prompts([p.example for p in pool.prompts.values()])
    run = build_stage_run(base, cfg, out, loader, resume=resume, lora=lora)
    loader.model = run.model
    # the starting policy, frozen (copied before run_stage resumes any checkpoint into run.model)
    loader.ref = reference_model(run) if beta != 0.0 else None

    def on_step(run, state, stats):
        if reestimate_every and state.step % reestimate_every == 0:
            pool.reestimate(loader.sample_scores, group_size)

    summary = {"policy": str(base.dir), "tasks": names, "group_size": group_size,
               "prompts_per_step": prompts_per_step, "loss_type": loss_type, "beta": beta,
               "temperature": temperature, "max_new_tokens": max_new_tokens, "scale_rewards": scale_rewards}
    run.say(f"rl: GRPO ({loss_type}) on {','.join(names)}, {prompts_per_step} prompts x {group_size} samples per step")
    result = run_stage(run, lambda run: run.loader.next_batch(),
                       make_loss(loss_type, beta, eps_low, eps_high, max_new_tokens),
                       resume=resume, started=started, summary=summary, on_step=on_step)
    return result


__all__ = ["rl", "RLLoader", "RLBatch", "make_loss", "per_token_logps", "DEFAULTS"]
