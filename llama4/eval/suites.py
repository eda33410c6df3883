"""Task suites: the verifiable tasks of ``llama4.tasks`` answered by a model and scored.

A suite is a list of tasks. For each task the runner draws ``n`` examples of a split, asks a
*responder* for replies in batches (the real one generates with our engine, greedy by default;
tests script one), and scores each reply with the task's own verifier. The result for a task is
the mean score, with the mean per language of the examples that have one::

    {"metric": "exact_match", "score": 0.25, "n": 64, "by_lang": {"deu": 0.5, "eng": 0.0}}

``results.json`` (see :func:`results_document`) holds one such entry per task.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Sequence

SPLITS = ("train", "validation", "test")
PPL_SUITE = "ppl"

Responder = Callable[[list[list[dict]]], list[str]]  # dialogs -> one reply text each


def tasks_module():
    if importlib.util.find_spec("llama4.tasks") is None:
        raise ValueError("the task suites need llama4.tasks, which this installation does not have")
    import llama4.tasks

    return llama4.tasks


def suite_names() -> list[str]:
    names = [PPL_SUITE]
    if importlib.util.find_spec("llama4.tasks") is not None:
        names = list(tasks_module().SUITES) + names
    return names


def resolve_suite(name: str) -> list | None:
    """The tasks of a suite (``tasks``, ``safety``, or one task's name); None for ``ppl``."""
    if name == PPL_SUITE:
        return None
    t = tasks_module()
    if name in t.SUITES:
        return [t.get_task(n) for n in t.SUITES[name]]
    if name in t.TASKS:
        return [t.TASKS[name]]
    raise ValueError(f"unknown suite or task {name!r}; suites: {', '.join(suite_names())}; "
                     f"tasks: {', '.join(sorted(t.TASKS))}")


# --------------------------------------------------------------------------------------------
# the real responder: our engine's batched generation

@dataclass
class EngineResponder:
    """Replies from a model: each dialog in the Llama 4 chat format, a batch generated together
    (``llama4.infer.generate``), each reply cut at its first stop token."""

    model: object
    tok: object
    max_tokens: int = 128
    temperature: float = 0.0
    seed: int | None = 0
    max_context: int | None = None
    prefill_chunk: int = 2048
    calls: int = 0

    def __call__(self, dialogs: list[list[dict]]) -> list[str]:
        from llama4.eval.common import reply_text
        from llama4.infer.generation import generate
        from llama4.tokenizer.chat_format import encode_dialog_prompt

        prompts = [encode_dialog_prompt(self.tok, list(d)) for d in dialogs]
        limit = self.max_context or self.model.args.max_seq_len
        for p, d in zip(prompts, dialogs):
            if len(p) + self.max_tokens > limit:
                raise ValueError(f"a prompt of {len(p)} tokens + --max-tokens {self.max_tokens} exceeds the "
                                 f"model's context of {limit} tokens (prompt starts {str(d[-1]['content'])[:60]!r})")
        seed = None if self.seed is None else self.seed + self.calls  # a fresh stream per batch
        self.calls += 1
        outs = generate(self.model, prompts, self.max_tokens, temperature=self.temperature, seed=seed,
                        stop=self.tok.stop_tokens, prefill_chunk=self.prefill_chunk)
        return [reply_text(self.tok, ids) for ids in outs]


# --------------------------------------------------------------------------------------------
# the runner

def run_tasks(tasks: Sequence, respond: Responder, split: str = "test", n: int = 100, seed: int = 0,
              difficulty: int = 1, langs: Sequence[str] | None = None, batch_size: int = 16,
              progress: bool = True) -> tuple[dict, list[dict]]:
    """-> ({task: {"metric", "score", "n", "by_lang"}}, one record per example).

    ``langs`` keeps only the examples in those languages (examples without a language stay)."""
    from tqdm import tqdm

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if n < 1:
        raise ValueError(f"--limit must be >= 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    drawn = []
    for task in tasks:
        exs = task.examples(split, n, seed=seed, difficulty=difficulty)
        if langs:
            exs = [e for e in exs if not e.lang or e.lang in langs]
        drawn.append((task, exs))
    results, records = {}, []
    bar = tqdm(total=sum(len(e) for _, e in drawn), desc="eval", unit="ex", disable=not progress)
    for task, exs in drawn:
        bar.set_postfix_str(task.name)
        # Similar lengths together: a batch decodes as long as its longest row.
        order = sorted(range(len(exs)), key=lambda i: sum(len(str(m.get("content", ""))) for m in exs[i].messages))
        replies: list[str | None] = [None] * len(exs)
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            got = respond([list(exs[i].messages) for i in idx])
            if len(got) != len(idx):
                raise RuntimeError(f"the responder returned {len(got)} replies for {len(idx)} dialogs")
            for i, r in zip(idx, got):
                replies[i] = r
            bar.update(len(idx))
        scores, per_lang = [], {}
        for ex, reply in zip(exs, replies):
            s = float(task.score(ex, reply))
            scores.append(s)
            if ex.lang:
                per_lang.setdefault(ex.lang, []).append(s)
            records.append({"task": task.name, "lang": ex.lang, "prompt": ex.messages[-1].get("content"),
                            "answer": ex.answer, "response": reply, "score": s})
        results[task.name] = {"metric": task.metric, "score": sum(scores) / len(scores) if scores else None,
                              "n": len(scores),
                              "by_lang": {lang: sum(v) / len(v) for lang, v in sorted(per_lang.items())}}
    bar.close()
    return results, records


def results_document(model: str, suite: str, tasks: dict, **extra) -> dict:
    """The ``results.json`` layout: ``{"model", "suite", "tasks": {TASK: {...}}}`` + extra keys."""
    for name, r in tasks.items():
        missing = {"metric", "score", "n", "by_lang"} - set(r)
        if missing:
            raise ValueError(f"results for task {name!r} lack {sorted(missing)}")
    return {"model": model, "suite": suite, "tasks": tasks, **extra}


def results_markdown(doc: dict) -> str:
    lines = [f"# `llama4 eval`: suite `{doc['suite']}` on `{doc['model']}`", "",
             "| task | metric | score | n | by language |", "|---|---|---:|---:|---|"]
    for name, r in doc["tasks"].items():
        by = ", ".join(f"{lang} {v:.3f}" for lang, v in r["by_lang"].items()) or "-"
        score = "-" if r["score"] is None else f"{r['score']:.4f}"
        lines.append(f"| {name} | {r['metric']} | {score} | {r['n']} | {by} |")
    cfg = doc.get("config")
    if cfg:
        lines += ["", "Config: " + ", ".join(f"{k}={v}" for k, v in cfg.items())]
    if "seconds" in doc:
        lines.append(f"Time: {doc['seconds']:.1f} s")
    return "\n".join(lines) + "\n"


def write_results(out_dir, doc: dict, records: list[dict] | None = None) -> None:
    """``OUT/results.json`` + ``OUT/results.md`` (+ ``OUT/samples.jsonl``), each written atomically."""
    import json
    from pathlib import Path

    from llama4.eval.common import write_json, write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if records is not None:
        write_text(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_text(out / "results.md", results_markdown(doc))
    write_json(out / "results.json", doc)
