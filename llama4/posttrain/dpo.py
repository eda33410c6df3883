"""Direct Preference Optimization (Rafailov et al. 2023) with the sigmoid loss, as TRL 1.13's
``DPOTrainer`` computes it (``loss_type="sigmoid"``, no label smoothing):

    delta = (logp_c - ref_c) - (logp_r - ref_r)        summed completion log-probs, prompt masked
    loss  = -logsigmoid(beta * delta).mean()
    rewards/chosen = beta * (logp_c - ref_c), rewards/rejected likewise, margin, accuracy

Pairs are TRL's conversational preference JSONL: ``{"prompt": [messages], "chosen": [assistant
message], "rejected": [assistant message]}``, or the implicit-prompt form ``{"chosen": [messages...,
assistant], "rejected": [messages..., assistant]}`` whose shared head is the prompt. Each pair is
tokenized with our Llama 4 chat format as TRL tokenizes it with the model's chat template: the
prompt with the generation header, and each completion as the tail of ``prompt + completion``.

The reference is the frozen starting policy (or ``ref``, another model with the same tokenizer):
its log-probs of every pair are computed once, before training, and the reference model is dropped
(TRL's ``precompute_ref_log_probs``). Chosen and rejected go through the policy as one batch
``[chosen; rejected]``. Training is :func:`llama4.posttrain.stage.run_stage` (the training loop's
``train_step``, checkpoints, bit-identical resume, metrics.jsonl, ``OUT/final``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from llama4.posttrain.chat_data import ROLES, pad_id_of, read_jsonl
from llama4.posttrain.logprobs import CompletionBatch, pad_completions, sequence_logps
from llama4.posttrain.stage import build_stage_run, open_base, run_stage, stage_config
from llama4.tokenizer import Tokenizer
from llama4.tokenizer.chat_format import encode_dialog, encode_dialog_prompt
from llama4.train.step import LossOutput

# TRL's DPOConfig defaults (beta 0.1, lr 1e-6, no weight decay, grad clip 1.0; constant LR where TRL
# decays linearly); light, as Meta ran it. The MoE balance and z-losses stay off: the loss is the pure
# DPO loss the oracle test compares (TRL's own router_aux_loss_coef=0.001 cannot apply to Llama 4:
# transformers' Llama4ForCausalLM returns no aux_loss, so TRL 1.13 needs router_aux_loss_coef=0.0).
DEFAULTS = dict(lr=1e-6, max_steps=100, batch_size=4, schedule="constant", weight_decay=0.0, balance="none",
                z_loss_coef=0.0, grad_clip=1.0)


@dataclass(frozen=True)
class Pair:
    prompt: tuple[dict, ...]
    chosen: dict
    rejected: dict
    where: str  # "FILE:LINE": what an error about this pair names


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


# ---------------------------------------------------------------------------------------------
# reading and checking


def _check_message(m, where: str, field: str) -> dict:
    if not isinstance(m, dict):
        raise ValueError(f"{where}: field '{field}' must be an object with 'role' and 'content', got {m!r:.80}")
    if m.get("role") not in ROLES:
        raise ValueError(f"{where}: field '{field}.role' is {m.get('role')!r}, not one of {', '.join(ROLES)}")
    content = m.get("content")
    if not isinstance(content, str) and not (isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content)):
        raise ValueError(f"{where}: field '{field}.content' must be a string or a list of text parts, "
                         f"got {content!r:.80}")
    return m


def _completion(obj: dict, key: str, where: str) -> dict:
    msgs = obj[key]
    if not isinstance(msgs, list) or len(msgs) != 1:
        n = len(msgs) if isinstance(msgs, list) else type(msgs).__name__
        raise ValueError(f"{where}: field '{key}' must be a list holding exactly one assistant message, got {n}"
                         f"{' messages' if isinstance(msgs, list) else ''}")
    m = _check_message(msgs[0], where, f"{key}[0]")
    if m["role"] != "assistant":
        raise ValueError(f"{where}: field '{key}[0].role' is {m['role']!r}; a completion is one assistant message")
    return m


def check_pair(obj, where: str) -> Pair:
    """One decoded JSONL record -> :class:`Pair`; a ValueError names ``where`` and the field."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with 'prompt', 'chosen' and 'rejected', "
                         f"got {type(obj).__name__}")
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise ValueError(f"{where}: missing field '{key}' (fields: {', '.join(sorted(obj)) or 'none'}); expected "
                             'TRL\'s preference format {"prompt": [messages], "chosen": [assistant message], '
                             '"rejected": [assistant message]}')
    if "prompt" not in obj:  # implicit prompt: the shared head of both conversations
        c, r = obj["chosen"], obj["rejected"]
        for key, msgs in (("chosen", c), ("rejected", r)):
            if not isinstance(msgs, list) or len(msgs) < 2:
                raise ValueError(f"{where}: without a 'prompt' field, '{key}' must be the whole conversation "
                                 "(prompt messages, then one assistant message)")
        if c[:-1] != r[:-1]:
            i = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)) - 1)
            raise ValueError(f"{where}: the prompt differs between 'chosen' and 'rejected' (first at message {i}): "
                             "a preference pair compares two answers to the same prompt")
        obj = {"prompt": c[:-1], "chosen": c[-1:], "rejected": r[-1:]}
    prompt = obj["prompt"]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(f"{where}: field 'prompt' must be a non-empty list of messages, got {prompt!r:.80}")
    msgs = tuple(_check_message(m, where, f"prompt[{i}]") for i, m in enumerate(prompt))
    return Pair(msgs, _completion(obj, "chosen", where), _completion(obj, "rejected", where), where)


def load_pairs_jsonl(path) -> list[Pair]:
    """Every pair of a TRL conversational preference JSONL file, checked; blank lines are skipped."""
    return read_jsonl(path, check_pair, "preference pairs", missing="pairs file")


def tokenize_pair(tok: Tokenizer, pair: Pair, max_length: int | None = None) -> TokenizedPair:
    """TRL's tokenization with our chat format: prompt ids end with the assistant header; each
    completion is ``prompt + completion`` minus the prompt (its text and closing ``<|eot|>``)."""
    prompt = encode_dialog_prompt(tok, list(pair.prompt))
    out = [prompt]
    for m in (pair.chosen, pair.rejected):
        ids, _ = encode_dialog(tok, [*pair.prompt, m])
        if ids[:len(prompt)] != prompt:  # cannot happen with our format; guards a future change
            raise ValueError(f"{pair.where}: the prompt's ids are not a prefix of prompt + completion")
        out.append(ids[len(prompt):])
    t = TokenizedPair(*out)
    if max_length is not None:
        longest = len(t.prompt_ids) + max(len(t.chosen_ids), len(t.rejected_ids))
        if longest > max_length:
            raise ValueError(f"{pair.where}: the pair is {longest} tokens (prompt {len(t.prompt_ids)}, chosen "
                             f"{len(t.chosen_ids)}, rejected {len(t.rejected_ids)}), over the context length "
                             f"{max_length}; shorten it or raise --max-length")
    return t


def pair_batch(pairs: Sequence[TokenizedPair], pad_id: int, width: int | None = None) -> CompletionBatch:
    """``[chosen; rejected]`` rows (the first half chosen), right-padded: one forward for both."""
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    return pad_completions(prompts, completions, pad_id, width)


def _pair_length(p: TokenizedPair) -> int:
    return len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))


# ---------------------------------------------------------------------------------------------
# the loss


def dpo_loss(logp_c: torch.Tensor, logp_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO loss of (B,) summed log-probs and the reward metrics TRL logs (detached)."""
    chosen = logp_c - ref_c
    rejected = logp_r - ref_r
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    with torch.no_grad():
        rc, rr = beta * chosen, beta * rejected
        metrics = {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean(),
                   "rewards/accuracies": (rc > rr).float().mean(), "logps/chosen": logp_c.mean(),
                   "logps/rejected": logp_r.mean()}
    return loss, metrics


@torch.no_grad()
def reference_logps(model: torch.nn.Module, pairs: Sequence[TokenizedPair], pad_id: int, batch_size: int,
                    device="cpu", autocast=contextlib.nullcontext) -> torch.Tensor:
    """(N, 2) summed completion log-probs ``[chosen, rejected]`` of every pair under ``model``, under
    ``autocast`` (the run's, so that at step 1 the policy's log-probs equal the reference's)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        with autocast():
            lp = sequence_logps(model, pair_batch(chunk, pad_id).to(device)).float().cpu()
        out.append(torch.stack(lp.chunk(2), dim=1))
    model.train(was_training)
    return torch.cat(out)


@dataclass
class DPOBatch:
    batch: CompletionBatch  # [chosen; rejected]
    ref: torch.Tensor  # (B, 2) reference log-probs [chosen, rejected]


class PairLoader:
    """Micro-batches of ``batch_size`` pairs per rank from a seeded permutation of the pairs, a
    new one per epoch (the SFT loader's order); each pair carries its precomputed reference
    log-probs. The position (epoch, offset) is checkpointed."""

    def __init__(self, pairs: Sequence[TokenizedPair], ref: torch.Tensor, batch_size: int, pad_id: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        from llama4.posttrain.chat_data import SFTLoader

        if not pairs:
            raise ValueError("no preference pairs")
        self.pairs, self.ref, self.pad_id = list(pairs), ref, pad_id
        rows = [(p.prompt_ids + p.chosen_ids, p.prompt_ids + p.rejected_ids) for p in self.pairs]
        self._order = SFTLoader(rows, batch_size, pad_id, seed=seed, rank=rank, world_size=world_size)
        self.batch_size = batch_size

    def next_batch(self) -> DPOBatch:
        o = self._order
        idx = o._take(o.batch_size * o.world_size)
        mine = idx[o.rank * o.batch_size:(o.rank + 1) * o.batch_size]
        # every rank pads to the global batch's longest pair: the shapes and padded positions of one
        # process reading it all (the padding passes through the MoE router and counts in its load)
        width = max(_pair_length(self.pairs[i]) for i in idx)
        return DPOBatch(pair_batch([self.pairs[i] for i in mine], self.pad_id, width), self.ref[mine])

    def state_dict(self) -> dict:
        return self._order.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self._order.load_state_dict(s)


def make_loss_fn(beta: float):
    def loss_fn(run, b: DPOBatch) -> LossOutput:
        batch = b.batch.to(run.rt.device)
        with run.autocast():
            logps = sequence_logps(run.model, batch)
        logp_c, logp_r = logps.chunk(2)
        ref = b.ref.to(logps.device)
        loss, metrics = dpo_loss(logp_c, logp_r, ref[:, 0], ref[:, 1], beta)
        return LossOutput(loss, metrics)

    return loss_fn


def _fingerprint(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:16]


def dpo(policy, pairs, out, *, ref=None, beta: float = 0.1, max_steps=None, lr=None, batch_size=None,
        max_length: int | None = None, resume: bool = False, seed: int = 0, overrides: dict | None = None,
        runtime=None, parallelize=None, lora=None, parallel=None) -> dict:
    """DPO-train the model in ``policy`` on the preference pairs in ``pairs`` (JSONL) into ``out``.
    ``ref`` is the reference model directory (default: the policy itself). ``parallel`` (a
    ``llama4.distributed.ParallelConfig``): run as this process's share of a torchrun job with
    ``batch_size`` pairs per data rank, as ``llama4 sft`` does. Returns the summary (``{}`` off rank 0)."""
    started = time.perf_counter()
    if not beta > 0:
        raise ValueError(f"--beta must be > 0, got {beta}")
    fields = dict(DEFAULTS)
    for k, v in (("max_steps", max_steps), ("lr", lr), ("batch_size", batch_size)):
        if v is not None:
            fields[k] = v
    fields["seed"] = seed
    fields.update(overrides or {})

    base = open_base(policy)  # checks the policy before anything is written
    limit = max_length or base.args.max_seq_len
    if limit > base.args.max_seq_len:
        raise ValueError(f"--max-length {limit} exceeds the policy's max_seq_len {base.args.max_seq_len}")
    tok = base.tokenizer
    records = load_pairs_jsonl(pairs)
    tokenized = [tokenize_pair(tok, p, limit) for p in records]
    fields.setdefault("seq_len", limit)
    cfg = stage_config(base, "dpo", **fields)
    drun = None
    if parallel is not None:
        from llama4.distributed.run import distributed_run

        drun = distributed_run(cfg, parallel)
        runtime, parallelize = drun.runtime(), drun.parallelize
    try:
        return _train(base, cfg, out, tokenized, pairs, ref, beta, resume, seed, started, runtime, parallelize, lora)
    finally:
        if drun is not None:
            drun.close()


def _train(base, cfg, out, tokenized, pairs, ref, beta, resume, seed, started, runtime, parallelize, lora) -> dict:
    tok = base.tokenizer
    pad = pad_id_of(tok)
    rt = runtime
    if rt is None:
        from llama4.train.run import Runtime, pick_device

        rt = Runtime(pick_device(cfg.device))

    # The reference's log-probs, once, before any step; then the reference model is gone. With the
    # policy as reference this is the starting weights (also on --resume: base.model is read from
    # --policy, and the checkpoint is loaded into the run afterwards).
    if ref is None:
        ref_model, ref_dir = base.model, base.dir
    else:
        other = open_base(ref)
        if other.tokenizer_path.read_bytes() != base.tokenizer_path.read_bytes():
            raise ValueError(f"the reference {other.dir} has a different tokenizer ({other.tokenizer_path}, "
                             f"{_fingerprint(other.tokenizer_path)}) than the policy {base.dir} "
                             f"({_fingerprint(base.tokenizer_path)}): their log-probs would score different ids")
        if other.args.vocab_size != base.args.vocab_size:
            raise ValueError(f"the reference {other.dir} has vocab_size {other.args.vocab_size}, the policy "
                             f"{base.args.vocab_size}")
        ref_model, ref_dir = other.model, other.dir
    ref_model.to(rt.device)
    from llama4.train.run import pick_autocast

    ref_lp = reference_logps(ref_model, tokenized, pad, cfg.batch_size, rt.device, pick_autocast(cfg, rt.device)[0])
    del ref_model
    if ref is not None:
        del other

    loader = PairLoader(tokenized, ref_lp, cfg.batch_size, pad, seed=seed, rank=rt.rank, world_size=rt.world_size)
    run = build_stage_run(base, cfg, out, loader, resume=resume, runtime=rt, parallelize=parallelize, lora=lora)
    summary = {"policy": str(base.dir), "reference": str(ref_dir), "pairs": os.path.abspath(pairs),
               "n_pairs": len(tokenized), "beta": beta,
               "epochs": round(cfg.max_steps * cfg.batch_size * cfg.grad_accum * rt.world_size / len(tokenized), 2)}
    run.say(f"dpo: {len(tokenized)} pairs from {pairs}; beta {beta}; policy {base.dir}; reference {ref_dir} "
            "(log-probs precomputed)")
    return run_stage(run, lambda r: r.loader.next_batch(), make_loss_fn(beta), resume=resume, started=started,
                     summary=summary)


__all__ = ["Pair", "TokenizedPair", "check_pair", "load_pairs_jsonl", "tokenize_pair", "pair_batch", "dpo_loss",
           "reference_logps", "PairLoader", "DPOBatch", "make_loss_fn", "dpo", "DEFAULTS"]
