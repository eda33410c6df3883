"""Training checkpoints that survive faults: atomic, self-describing, keep-last-N.

A checkpoint is the folder ``OUT/checkpoints/step_NNNNNNNN/`` with ``state.pt`` (model,
optimizer, schedule step, data-loader position, MoE selection biases, RNG states, the running
metric accumulators) and ``meta.json`` (step, config; written last). It is written under a
temporary name, every file is fsync'ed, and the folder is renamed into place and the parent
fsync'ed: a reader, or a run killed with SIGKILL at any instant, sees the previous checkpoint
or the new one, never half of one. Leftover temporary folders are removed on the next start.

This is the single-process format (``torch.save`` of full state dicts). A distributed room
replaces :func:`save_checkpoint` / :func:`load_checkpoint` with DCP behind the same calls.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

STEP_DIR = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
STATE = "state.pt"
META = "meta.json"


class CheckpointCorrupt(RuntimeError):
    pass


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / META).is_file() and (p / STATE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def clean_temporaries(ckpt_dir: Path) -> list[str]:
    """Remove folders of saves that never finished (a kill during a save); returns their names."""
    removed = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def save_checkpoint(ckpt_dir: Path, step: int, state: dict, meta: dict, keep: int,
                    _fault=None) -> Path:
    """Write ``state`` (torch.save-able) and ``meta`` (JSON) as checkpoint ``step`` atomically,
    then delete all but the newest ``keep`` checkpoints. ``_fault`` is a test hook called between
    writing the files and the rename (the moment a kill must not corrupt anything)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step:08d}"
    tmp = ckpt_dir / f"{TMP_PREFIX}step_{step:08d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        torch.save(state, tmp / STATE)
        _fsync_path(tmp / STATE)
        (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=1) + "\n")
        _fsync_path(tmp / META)
        _fsync_path(tmp)
        if _fault is not None:
            _fault()
        if final.exists():  # a checkpoint of this step from an earlier attempt: replace it
            old = ckpt_dir / f"{TMP_PREFIX}old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_path(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, p in list_checkpoints(ckpt_dir)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict, dict]:
    """-> (state, meta) of one checkpoint folder."""
    try:
        meta = json.loads((path / META).read_text())
        # weights_only=False: the state holds numpy/python RNG states; these are our own files.
        state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or unreadable: report which file
        raise CheckpointCorrupt(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    return state, meta


def latest_checkpoint(ckpt_dir: Path) -> tuple[dict, dict, Path] | None:
    """The newest readable checkpoint (older ones are tried if the newest cannot be read)."""
    errors = []
    for _, p in reversed(list_checkpoints(ckpt_dir)):
        try:
            state, meta = load_checkpoint(p)
            return state, meta, p
        except CheckpointCorrupt as e:
            errors.append(str(e))
    if errors:
        raise CheckpointCorrupt("no readable checkpoint: " + "; ".join(errors))
    return None
