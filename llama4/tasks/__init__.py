"""Verifiable multilingual tasks: seeded prompt generators (Llama 4 chat dialogs built from the
embedded corpus) and their verifiers, with train / validation / test splits that never share a
prompt. ``llama4 tasks list`` / ``llama4 tasks sample NAME`` show them; ``llama4 eval`` and
post-training use them through :data:`TASKS` and :func:`get_task`.
"""

from __future__ import annotations

from llama4.tasks.base import SPLITS, Example, Task
from llama4.tasks.langid import LanguageId
from llama4.tasks.procedural import (
    Arithmetic, CopySpan, CountChars, CountWords, ReverseSpan, SortList,
)  # fmt: skip
from llama4.tasks.safety import SafetyHarmful, SafetyHarmless, is_refusal
from llama4.tasks.udhr_tasks import ArticleNumber, ArticleQuote, Translate

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        LanguageId(), ArticleNumber(), ArticleQuote(), Translate(),
        CopySpan(), ReverseSpan(), CountWords(), CountChars(), Arithmetic(), SortList(),
        SafetyHarmful(), SafetyHarmless(),
    )
}  # fmt: skip
SUITES: dict[str, list[str]] = {
    "tasks": [n for n, t in TASKS.items() if not n.startswith("safety_")],
    "safety": ["safety_harmful", "safety_harmless"],
}


def get_task(name: str) -> Task:
    """The task called ``name``; a ValueError names the unknown task and lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["SPLITS", "SUITES", "TASKS", "Example", "Task", "get_task", "is_refusal"]
