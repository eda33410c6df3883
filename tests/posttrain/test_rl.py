"""GRPO (llama4/posttrain/grpo_loss.py) against TRL 1.13's own code, the adaptive prompt pool
(filtering.py), and a tiny end-to-end ``llama4 rl`` run (rl.py, cli_rl.py).

The oracle: TRL's ``GRPOTrainer._compute_loss`` itself, called unbound on a stub carrying exactly
the attributes it reads, with a ``_get_per_token_logps_and_entropies`` that returns the given
per-token log-probs (so the loss arithmetic is TRL's, on the same tensors as ours). The advantage
computation is inline in TRL's ``_generate_and_score_completions``; we execute that block of TRL's
source text verbatim (located by its first and last statements) on a stub.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from oracles import require
from serving import write_tiny_model_dir

from llama4.posttrain.filtering import PromptPool
from llama4.posttrain.grpo_loss import group_advantages, grpo_loss

trl_grpo = require("trl.trainer.grpo_trainer")
trl_utils = require("trl.trainer.utils")


class _Acc:
    num_processes = 1
    sync_gradients = True

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t

    def gather_for_metrics(self, t):
        return t


def trl_loss(logp, old, ref, adv, mask, loss_type, eps_low, eps_high, beta, max_len, level="token"):
    B, T = logp.shape
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        loss_type=loss_type, epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False,
        model=SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=max_len,
        accelerator=_Acc(), _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    loss = trl_grpo.GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, stub._metrics["train"]


def make_tensors(seed=0, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=g) * 3).requires_grad_(True)
    old = logp.detach() + 0.3 * torch.randn(B, T, generator=g)  # ratios well outside 1 +- 0.2: clipping happens
    old[::2] += 0.5  # whole sequences off-policy too, so sequence-level ratios are clipped as well
    ref = logp.detach() + 0.5 * torch.randn(B, T, generator=g)
    adv = torch.randn(B, generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6, 2])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_and_grad_equal_trl(loss_type, beta, level):
    logp, old, ref, adv, mask = make_tensors()
    eps_low, eps_high = 0.2, 0.28
    theirs, their_metrics = trl_loss(logp, old, ref if beta else None, adv, mask, loss_type, eps_low, eps_high,
                                     beta, 9, level)
    (g_theirs,) = torch.autograd.grad(theirs, logp)
    ours = grpo_loss(logp, old, ref if beta else None, adv, mask, loss_type=loss_type, eps_low=eps_low,
                     eps_high=eps_high, beta=beta, max_completion_length=9, importance_sampling_level=level)
    (g_ours,) = torch.autograd.grad(ours.loss, logp)
    assert abs(ours.loss.item() - theirs.item()) <= 1e-6, (ours.loss.item(), theirs.item())
    assert (g_ours - g_theirs).abs().max().item() <= 1e-6
    assert ours.metrics["clip_ratio/region"] == pytest.approx(their_metrics["clip_ratio/region_mean"][0], abs=1e-6)
    assert ours.metrics["clip_ratio/region"] > 0  # the test data does exercise the clipping
    if beta:
        assert ours.metrics["kl"] == pytest.approx(their_metrics["kl"][0], abs=1e-6)


def test_one_update_per_batch_has_ratio_one():
    logp, _, _, adv, mask = make_tensors(1)
    theirs, _ = trl_loss(logp, None, None, adv, mask, "dapo", 0.2, 0.2, 0.0, 9)
    ours = grpo_loss(logp, None, None, adv, mask, loss_type="dapo")
    assert abs(ours.loss.item() - theirs.item()) <= 1e-6
    assert ours.metrics["ratio_mean"] == pytest.approx(1.0)


def _trl_advantage_block():
    src = inspect.getsource(trl_grpo.GRPOTrainer._generate_and_score_completions)
    start = src.index("        unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)")
    end = src.index('        elif self.multi_objective_aggregation == "normalize_then_sum":')
    return textwrap.dedent(src[start:end])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale):
    g = torch.Generator().manual_seed(3)
    G = 4
    rewards = (torch.rand(5 * G, generator=g) > 0.5).float() * torch.rand(5 * G, generator=g)
    rewards[:G] = 1.0  # one group all-equal: its advantages must be 0, not NaN
    scope = {"torch": torch, "nanstd": trl_utils.nanstd, "device": "cpu", "num_generations": G,
             "rewards_per_func": rewards[:, None].clone(),
             "self": SimpleNamespace(scale_rewards=scale, reward_weights=torch.ones(1),
                                     multi_objective_aggregation="sum_then_normalize")}
    exec(_trl_advantage_block(), scope)
    ours = group_advantages(rewards, G, scale)
    assert (ours - scope["advantages"]).abs().max().item() <= 1e-6
    assert ours[:G].abs().max().item() == 0.0


def test_bad_arguments():
    logp, old, ref, adv, mask = make_tensors()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, old, None, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logp, old, None, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.ones(6), 4)


# -- the adaptive prompt pool -------------------------------------------------------------------

def test_pool_keeps_only_medium_to_hard_and_refills():
    pool = PromptPool(["arithmetic"], size=6, min_pass=0.0, max_pass=0.75, min_samples=4, window=8)
    drawn = pool.draw(6)
    assert len({p.key for p in drawn}) == 6 and pool.kept_fraction() == 0.0
    verdicts = [pool.update(p.key, s) for p, s in zip(drawn, [[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0],
                                                              [1, 1, 0, 0], [1, 1, 1, 0], [0.5, 1, 1, 0]])]
    assert verdicts == ["too_hard", "too_easy", "kept", "kept", "too_easy", "kept"]  # 0.5 < solved_at 1.0
    assert pool.kept_fraction() == pytest.approx(3 / 6)
    again = pool.draw(6)  # the three dropped prompts are replaced by fresh candidates
    keys = {p.key for p in again}
    assert {drawn[i].key for i in (2, 3, 5)} <= keys and not {drawn[i].key for i in (0, 1, 4)} & keys
    assert pool.stats()["pool/candidates"] == 3 and pool.dropped == {"too_easy": 2, "too_hard": 1}


def test_pool_reestimation_brings_back_dropped_prompts_and_resumes():
    pool = PromptPool(["arithmetic"], size=4, min_samples=2, window=4, seed=5)
    ps = pool.draw(4)
    for p in ps:
        pool.update(p.key, [0, 0])
    assert pool.kept_fraction() == 0.0
    pool.reestimate(lambda exs, n: [[1, 0] for _ in exs], 2)  # the policy learned: all now at 50%
    assert pool.kept_fraction() == 1.0
    clone = PromptPool(["arithmetic"], size=4, min_samples=2, window=4, seed=5)
    clone.load_state_dict(json.loads(json.dumps(pool.state_dict())))
    assert [p.key for p in clone.draw(3)] == [p.key for p in pool.draw(3)]
    assert all(clone.prompts[k].example == pool.prompts[k].example for k in pool.prompts)


def test_pool_forgets_oldest_dropped_prompts_beyond_capacity():
    pool = PromptPool(["arithmetic"], size=2, min_samples=1, window=2, capacity=5)
    first = pool.draw(2)
    for _ in range(4):
        for p in pool.draw(2):
            pool.update(p.key, [0])  # everything too hard: dropped, refilled
    pool.refill()
    assert len(pool.prompts) == 5 and not {p.key for p in first} & set(pool.prompts)
    assert len(pool.active()) == 2


def test_pool_curriculum_moves_to_harder_prompts():
    pool = PromptPool(["arithmetic"], size=4, min_samples=2, window=4, harder_at=0.5)
    assert pool.level["arithmetic"] == 1
    for p in pool.draw(4):
        pool.update(p.key, [1, 1])  # everything solved: too easy
    assert pool.level["arithmetic"] == 2
    assert all(p.key[1] == 2 for p in pool.draw(4))


def test_pool_bad_thresholds():
    with pytest.raises(ValueError, match="min_pass"):
        PromptPool(["arithmetic"], min_pass=0.5, max_pass=0.5)
    with pytest.raises(ValueError, match="unknown task"):
        PromptPool(["nope"])


# -- end to end -----------------------------------------------------------------------------------

def run_cli(capsys, *args):
    from llama4.cli import main

    rc = main(["rl", *map(str, args)])
    return rc, capsys.readouterr()


def test_rl_cli_end_to_end(tmp_path, capsys):
    import llama4

    policy = write_tiny_model_dir(tmp_path / "policy")
    out = tmp_path / "rl"
    rc, cap = run_cli(capsys, "--policy", policy, "--tasks", "count_chars,arithmetic", "--out", out,
                      "--group-size", 4, "--prompts-per-step", 2, "--max-steps", 3, "--max-new-tokens", 6,
                      "--beta", 0.04, "--lr", 1e-3, "--reestimate-every", 2, "--pool-size", 4, "--no-progress",
                      "--threads", 1)
    assert rc == 0, cap.err
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r and "event" not in r]
    assert len(steps) == 3
    for key in ("reward", "pass_rate", "kl", "entropy", "pool/kept_fraction", "response_length",
                "clip_ratio/region"):
        assert key in steps[-1], key
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first step's policy is the reference
    model = llama4.load(out / "final")
    assert sum(p.numel() for p in model.parameters()) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss_type"] == "dapo" and summary["steps"] == 3

    rc, cap = run_cli(capsys, "--policy", policy, "--tasks", "nope", "--out", tmp_path / "bad")
    assert rc == 2 and "llama4 rl: error: unknown task" in cap.err and not (tmp_path / "bad").exists()
    rc, cap = run_cli(capsys, "--policy", policy, "--tasks", "arithmetic", "--out", tmp_path / "bad",
                      "--max-new-tokens", 5000)
    assert rc == 2 and "exceeds the policy's max_seq_len 4096" in cap.err and not (tmp_path / "bad").exists()
    rc, cap = run_cli(capsys, "--policy", policy, "--tasks", "arithmetic", "--out", tmp_path / "bad",
                      "--group-size", 1)
    assert rc == 2 and "--group-size must be >= 2" in cap.err and not (tmp_path / "bad").exists()


class FirstByte:
    """A toy verifiable task the tiny random model sometimes solves: reward 1 when the reply starts
    with a plain byte rather than a special token (about 1 sample in 8 at the start)."""

    name = "first_byte"
    difficulties = (1,)

    def examples(self, split, n, seed=0, difficulty=1):
        import random

        from llama4.tasks import Example

        out = []
        for i in range(n):
            rng = random.Random(f"{seed}|{i}")
            out.append(Example(self.name, split, "", ({"role": "user", "content": "".join(
                rng.choice("abcdefgh") for _ in range(4))},), ""))
        return out

    def check_difficulty(self, d):
        return d

    def score(self, example, reply):
        return 1.0 if reply and not reply.startswith("<|") else 0.0


def _rewards(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"reward"' in l]


def test_rl_learning_raises_reward(tmp_path, monkeypatch):
    import llama4.tasks
    from llama4.posttrain.rl import rl

    monkeypatch.setitem(llama4.tasks.TASKS, "first_byte", FirstByte())
    policy = write_tiny_model_dir(tmp_path / "policy")
    rl(policy, tmp_path / "rl", ["first_byte"], group_size=8, prompts_per_step=4, max_steps=8, lr=3e-3,
       max_new_tokens=2, overrides=dict(progress=False, threads=1))
    recs = _rewards(tmp_path / "rl")
    first, last = [r["reward"] for r in recs[:2]], [r["reward"] for r in recs[-2:]]
    assert sum(first) / 2 < 0.5 and sum(last) / 2 > 0.9, [r["reward"] for r in recs]
    assert recs[-1]["entropy"] < recs[0]["entropy"]
    assert recs[-1]["pool/kept_fraction"] < 1.0  # prompts it now always solves were dropped


def test_rl_resume_is_bit_identical(tmp_path, monkeypatch):
    import llama4
    import llama4.tasks
    from llama4.posttrain.rl import rl

    monkeypatch.setitem(llama4.tasks.TASKS, "first_byte", FirstByte())
    policy = write_tiny_model_dir(tmp_path / "policy")
    kw = dict(group_size=4, prompts_per_step=2, lr=3e-3, max_new_tokens=2, beta=0.04, reestimate_every=2,
              overrides=dict(progress=False, threads=1, checkpoint_every=2))
    rl(policy, tmp_path / "a", ["first_byte"], max_steps=4, **kw)
    rl(policy, tmp_path / "b", ["first_byte"], max_steps=2, **kw)
    rl(policy, tmp_path / "b", ["first_byte"], max_steps=4, resume=True, **kw)
    a, b = llama4.load(tmp_path / "a" / "final").state_dict(), llama4.load(tmp_path / "b" / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["reward"] for r in _rewards(tmp_path / "a")] == [r["reward"] for r in _rewards(tmp_path / "b")]
