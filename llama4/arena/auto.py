"""``llama4 arena auto``: battles decided by the task verifiers, for unattended runs.

Each battle is one held-out task prompt (``llama4.tasks``, the ``test`` split by default) put to
two of the models; the task's own verifier scores both replies and the higher score wins (equal
scores: ``tie``, or ``tie (bothbad)`` when both scored 0). Pairs of models take turns evenly
(every pair in a seeded random order, sides swapped at random), and each model answers each
prompt once, greedily by default, with the evaluation's responder
(``llama4.eval.suites.EngineResponder``: batched generation on our engine). The models are
loaded one at a time. All battles are written to the arena database in one transaction
(``source = 'auto'``, ``judge = 'verifier:TASK'``), beside any human votes.
"""

from __future__ import annotations

import itertools
import random
import secrets
import time
from typing import Callable, Sequence

from llama4.arena import db

Respond = Callable[[list[list[dict]]], list[str]]


def schedule(names: Sequence[str], n: int, seed: int) -> list[tuple[str, str]]:
    """n (model_a, model_b) pairs: every unordered pair equally often (up to one), sides random."""
    rng = random.Random(f"arena-auto|{seed}")
    pairs = list(itertools.combinations(sorted(names), 2))
    out = []
    while len(out) < n:
        rng.shuffle(pairs)
        out += [p if rng.random() < 0.5 else (p[1], p[0]) for p in pairs]
    return out[:n]


def draw_examples(task_names: Sequence[str], n: int, split: str, seed: int, difficulty: int) -> list:
    """n examples, the tasks interleaved (task 1 #0, task 2 #0, ..., task 1 #1, ...)."""
    from llama4.eval.suites import resolve_suite

    tasks = []
    for name in task_names:
        got = resolve_suite(name)
        if got is None:
            raise ValueError(f"--tasks: {name!r} has no verifier (perplexity is not a battle); use a task or suite")
        tasks += [t for t in got if t not in tasks]
    per_task = -(-n // len(tasks))
    drawn = [t.examples(split, per_task, seed=seed, difficulty=difficulty) for t in tasks]
    mixed = [ex for group in itertools.zip_longest(*drawn) for ex in group if ex is not None]
    return [(next(t for t in tasks if t.name == ex.task), ex) for ex in mixed[:n]]


def decide(score_a: float, score_b: float) -> str:
    if score_a > score_b:
        return "model_a"
    if score_b > score_a:
        return "model_b"
    return "tie (bothbad)" if score_a <= 0 else "tie"


def run_auto(models: dict[str, str], task_names: Sequence[str], n_battles: int, db_path, split: str = "test",
             seed: int = 0, difficulty: int = 1, max_tokens: int = 128, batch_size: int = 16,
             temperature: float = 0.0, dtype=None, device=None, responders: dict[str, Respond] | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Run the battles and record them; -> {"battles", "outcomes": {winner: n}, "scores": {model:
    {"score", "n"}}, "seconds"}. ``responders`` replaces loading a model folder (tests)."""
    if len(models) < 2:
        raise ValueError(f"--models: the arena needs at least two models, got {len(models)}")
    if n_battles < 1:
        raise ValueError(f"--battles must be >= 1, got {n_battles}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    t0 = time.time()
    for name, path in models.items():  # a missing checkpoint fails now, not after the others generated
        if name not in (responders or {}):
            from llama4.infer.model_dir import resolve_model_dir

            if not (resolve_model_dir(path) / "config.json").is_file():
                raise FileNotFoundError(f"--models: {name}={path} has no config.json (nor final/config.json)")
    examples = draw_examples(task_names, n_battles, split, seed, difficulty)  # bad task names fail here
    con = db.connect(db_path)  # and a bad database here, before any model is loaded
    plan = schedule(list(models), n_battles, seed)
    replies: dict[tuple[str, int], str] = {}
    for name in sorted(models):
        todo = sorted({i for i, (a, b) in enumerate(plan) if name in (a, b)})
        if not todo:
            continue
        t1 = time.time()
        respond = (responders or {}).get(name) or _load_responder(models[name], max_tokens, temperature, seed,
                                                                   dtype, device)
        for lo in range(0, len(todo), batch_size):
            idx = todo[lo:lo + batch_size]
            got = respond([list(examples[i][1].messages) for i in idx])
            if len(got) != len(idx):
                raise RuntimeError(f"model {name}: {len(got)} replies for {len(idx)} prompts")
            replies.update({(name, i): r for i, r in zip(idx, got)})
        del respond  # free the model before the next one is loaded
        log(f"llama4 arena auto: {name} answered {len(todo)} prompts in {time.time() - t1:.1f} s")
    battles, scores = [], {m: [] for m in models}
    for i, ((a, b), (task, ex)) in enumerate(zip(plan, examples)):
        ra, rb = replies[(a, i)], replies[(b, i)]
        sa, sb = float(task.score(ex, ra)), float(task.score(ex, rb))
        scores[a].append(sa)
        scores[b].append(sb)
        prompt = [dict(m) for m in ex.messages]
        battles.append(db.Battle(f"auto-{secrets.token_urlsafe(12)}", a, b, decide(sa, sb),
                                 prompt + [{"role": "assistant", "content": ra}],
                                 prompt + [{"role": "assistant", "content": rb}], 1, "auto", f"verifier:{task.name}"))
    try:
        db.record_many(con, battles)
    finally:
        con.close()
    outcomes = {w: sum(b.winner == w for b in battles) for w in db.WINNERS}
    return {"battles": len(battles), "outcomes": outcomes,
            "scores": {m: {"score": sum(s) / len(s) if s else None, "n": len(s)} for m, s in scores.items()},
            "seconds": time.time() - t0}


def _load_responder(model_dir, max_tokens: int, temperature: float, seed: int, dtype, device) -> Respond:
    from llama4.eval.suites import EngineResponder
    from llama4.infer.model_dir import load_model_dir

    model, tok, _ = load_model_dir(model_dir, dtype=dtype, device=device)
    return EngineResponder(model, tok, max_tokens=max_tokens, temperature=temperature, seed=seed)
