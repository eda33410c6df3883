"""Loaders our task YAMLs name with ``custom_dataset: !function loader.load_json``.

lm-eval hands ``dataset_kwargs`` to ``datasets.load_dataset("json", data_files=...)``, and the
``datasets`` library resolves a relative ``data_files`` path against the current directory, not
against the YAML. So each YAML keeps ``dataset_path: json`` + ``dataset_kwargs.data_files`` with a
path relative to this folder, and ``load_json`` resolves it here: the tasks work from any
directory and wherever the package is installed. ``score_verifiable`` scores a generated reply
with the verifier of the ``llama4.tasks`` task the document came from.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def load_json(data_files: dict | None = None, **_metadata):
    """``datasets.load_dataset("json", data_files=...)`` with paths relative to this folder.
    (lm-eval also passes the task's metadata and model_args here; they are not needed.)"""
    import datasets

    if not data_files:
        raise ValueError("lm-eval task: dataset_kwargs.data_files is missing")
    files = {split: str(HERE / path) for split, path in data_files.items()}
    for split, path in files.items():
        if not Path(path).is_file():
            raise FileNotFoundError(f"lm-eval task data for split {split!r} not found: {path} "
                                    "(regenerate with: python -m llama4.eval.lm_eval_data)")
    return datasets.load_dataset("json", data_files=files)


def score_verifiable(doc: dict, results: list[str]) -> dict:
    from llama4.tasks import Example, get_task

    ex = doc["example"]
    example = Example(task=doc["task"], split=ex["split"], lang=doc["lang"],
                      messages=tuple(ex["messages"]), answer=doc["answer"], meta=ex["meta"])
    return {"score": float(get_task(doc["task"]).score(example, results[0]))}
