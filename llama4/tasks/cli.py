"""``llama4 tasks list`` / ``llama4 tasks sample NAME``: argument parsing and printing only."""

from __future__ import annotations

import argparse
import json


def _list(a: argparse.Namespace) -> int:
    from llama4.tasks import TASKS

    for name, task in TASKS.items():
        if a.verbose:
            print(f"{name}\t{task.metric}\t{task.description}\tdifficulty: {task.difficulty_help}")
        else:
            print(name)
    return 0


def _sample(a: argparse.Namespace) -> int:
    from llama4.tasks import get_task

    task = get_task(a.name)
    examples = task.examples(a.split, a.n, seed=a.seed, difficulty=a.difficulty)
    for i, ex in enumerate(examples):
        if a.json:
            print(json.dumps({"task": ex.task, "split": ex.split, "lang": ex.lang,
                              "messages": list(ex.messages), "answer": ex.answer,
                              "meta": ex.meta}, ensure_ascii=False))
            continue
        print(f"### {ex.task} #{i} ({ex.split}, difficulty {a.difficulty}"
              + (f", {ex.lang})" if ex.lang else ")"))
        for m in ex.messages:
            print(f"[{m['role']}]\n{m['content']}")
        print(f"[reference answer]\n{ex.answer}\n")
    return 0


def add_subparser(subparsers) -> None:
    p = subparsers.add_parser("tasks", help="verifiable multilingual tasks: list them, sample prompts")
    sub = p.add_subparsers(dest="tasks_command", required=True)
    t = sub.add_parser("list", help="print the task names, one a line")
    t.add_argument("-v", "--verbose", action="store_true",
                   help="also the metric, description and what difficulty changes (tab-separated)")
    t.set_defaults(func=_list)
    t = sub.add_parser("sample", help="print examples of a task: the dialog and the reference answer")
    t.add_argument("name", help="task name (see `llama4 tasks list`)")
    t.add_argument("-n", type=int, default=5, help="number of examples (default 5)")
    t.add_argument("--split", default="train", help="train | validation | test (default train)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--difficulty", type=int, default=1, help="difficulty level (default 1)")
    t.add_argument("--json", action="store_true", help="one JSON object per example, one a line")
    t.set_defaults(func=_sample)
