"""``llama4 eval --model DIR --lm-eval-tasks T1,T2``: lm-evaluation-harness tasks, in process.

lm-eval 0.4.13's own CLI cannot load models from other packages, so ``llama4 eval`` runs its
Python API with our registered model (:mod:`llama4.eval.lm_eval_model`). Our offline tasks
(:mod:`llama4.eval.lm_eval_tasks`) are always on the include path; ``include_path`` adds more.
The result is ``results.json``'s layout, one entry per task lm-eval reports (a group and its
subtasks each get one), scored by the task's first metric, with per-language means when the
task's documents carry a ``lang`` field; lm-eval's own results dict rides along under ``lm_eval``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ValueError("--lm-eval-tasks needs EleutherAI's lm-evaluation-harness: pip install "
                         "'lm-eval[api]==0.4.13' (bash scripts/setup.sh installs it)") from None
    return lm_eval


def _primary_metric(result: dict, config: dict | None) -> tuple[str, str | None]:
    """(metric name, the key of its value in lm-eval's result: "acc,none")."""
    names = [m["metric"] for m in (config or {}).get("metric_list") or [] if isinstance(m.get("metric"), str)]
    keys = [k for k in result if "," in k and not k.split(",")[0].endswith("_stderr")]
    for name in names + [k.split(",")[0] for k in keys]:
        key = next((k for k in keys if k.split(",")[0] == name), None)
        if key is not None:
            return name, key
    return (names[0] if names else "none"), None


def _by_lang(samples: list[dict], metric: str) -> dict[str, float]:
    per = defaultdict(list)
    for s in samples:
        lang, v = (s.get("doc") or {}).get("lang"), s.get(metric)
        if lang and isinstance(v, (int, float)):
            per[lang].append(float(v))
    return {lang: sum(v) / len(v) for lang, v in sorted(per.items())}


def run_lm_eval(model_dir: str, tasks: list[str], include_path: str | None, limit: int | None, batch_size: int,
                out_dir: str, dtype: str | None = None, device: str | None = None) -> dict:
    """Run lm-eval ``tasks`` on the model in ``model_dir``; writes ``OUT/lm_eval_samples.jsonl``
    (every scored document) and returns ``{"model", "suite", "tasks", "lm_eval"}``."""
    lm_eval = _lm_eval()
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from llama4.eval.common import write_text
    from llama4.eval.lm_eval_model import Llama4LM

    if not tasks:
        raise ValueError("--lm-eval-tasks: give at least one task name")
    paths = [str(TASKS_DIR)] + ([str(include_path)] if include_path else [])
    for p in paths:
        if not Path(p).exists():
            raise FileNotFoundError(f"lm-eval include path not found: {p}")
    manager = TaskManager(include_path=paths, include_defaults=False)  # ours only: indexing lm-eval's 14k takes ~10 s
    if any(t not in manager.all_tasks and not t.startswith("llama4_") for t in tasks):
        manager = TaskManager(include_path=paths)  # one of lm-eval's own tasks
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        ours = sorted(t for t in manager.all_tasks if t.startswith("llama4_"))
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; our offline tasks: {', '.join(ours)} "
                         f"(and every task lm-eval ships; `lm_eval ls tasks` lists them)")
    lm = Llama4LM(pretrained=model_dir, batch_size=batch_size or 8, dtype=dtype, device=device)
    raw = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager, log_samples=True)
    samples = raw.pop("samples", {}) or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "lm_eval_samples.jsonl", "".join(
        json.dumps({"task": t, **s}, default=handle_non_serializable, ensure_ascii=False) + "\n"
        for t, rows in samples.items() for s in rows))
    raw = json.loads(json.dumps(raw, default=handle_non_serializable))
    entries = {}
    for task, result in raw["results"].items():
        metric, key = _primary_metric(result, raw.get("configs", {}).get(task))
        n = (raw.get("n-samples", {}).get(task) or {}).get("effective")
        if n is None:  # a group: the documents of its subtasks
            n = sum((raw.get("n-samples", {}).get(s) or {}).get("effective", 0)
                    for s in raw.get("group_subtasks", {}).get(task, []))
        score = result.get(key) if key else None
        entries[task] = {"metric": metric, "score": score if isinstance(score, (int, float)) else None,
                         "n": n, "by_lang": _by_lang(samples.get(task, []), metric)}
    return {"model": lm.name, "suite": "lm-eval:" + ",".join(tasks), "tasks": entries, "lm_eval": raw}
