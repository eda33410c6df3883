"""Tokenize corpora into uint32 token shards on disk, in parallel, with a progress bar.

A shard is two raw little-endian files: ``NAME.tokens.bin`` (uint32 ids; every document is
wrapped as ``<|begin_of_text|> ... <|end_of_text|>``) and ``NAME.docs.bin`` (uint64 offsets of
document starts, plus the end), memory-mapped by the loader. ``manifest.json`` lists the
complete shards with their split, language and counts, and is written last: a folder without a
manifest is unfinished. On any error every file of the run is removed, so no partial shard is
ever left behind (each shard is also written under a temporary name and renamed when done).
"""

from __future__ import annotations

import json
import os
import itertools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from llama4.data.readers import CorpusError, expand_inputs, iter_documents
from llama4.tokenizer.files import atomic_write_bytes
from llama4.tokenizer.tokenizer import Tokenizer

MANIFEST = "manifest.json"
# Below this much input text, worker processes cost more (start-up, loading the tokenizer and
# corpus in each) than they save: tokenizing runs at ~15 MB/s per core.
MIN_PARALLEL_BYTES = 32_000_000
FORMAT = "llama4-shards-v1"
_BATCH_DOCS = 256  # documents per tokenizer call: amortises the call, bounds memory


@dataclass(frozen=True)
class FileSource:
    """All documents of one corpus file."""

    path: str
    text_key: str = "text"

    def documents(self) -> Iterator[str]:
        for d in iter_documents(self.path, self.text_key):
            yield d.text

    def size(self) -> int:
        return os.path.getsize(self.path)


@dataclass(frozen=True)
class EmbeddedSource:
    """One split of the embedded corpus, restricted to some languages."""

    split: str
    langs: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    val_fraction: float = 0.05
    path: str | None = None

    def documents(self) -> Iterator[str]:
        from llama4.data.corpus import iter_corpus

        for d in iter_corpus(self.split, self.langs, self.exclude, self.val_fraction, self.path):
            yield d.text

    def size(self) -> int:
        return sum(len(t.encode("utf-8")) for t in self.documents())


@dataclass(frozen=True)
class ShardTask:
    name: str
    split: str
    lang: str | None
    source: FileSource | EmbeddedSource


_WORKER_TOKENIZER: Tokenizer | None = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _write_shard(task: ShardTask, out_dir: str, tok: Tokenizer | None = None) -> dict:
    """Tokenize one task into temp files and return their metadata (the caller renames them)."""
    tok = tok or _WORKER_TOKENIZER
    tmp = {
        k: os.path.join(out_dir, f".{task.name}.{k}.bin.{os.getpid()}.tmp")
        for k in ("tokens", "docs")
    }
    n_tokens, n_docs, n_bytes = 0, 0, 0
    try:
        with open(tmp["tokens"], "wb") as ft, open(tmp["docs"], "wb") as fd:
            batch: list[str] = []

            def flush():
                nonlocal n_tokens, n_docs
                encoded = tok.encode_batch(batch, bos=True, eos=True, num_threads=1)
                lens = np.fromiter((len(ids) for ids in encoded), np.uint64, len(encoded))
                starts = n_tokens + np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.uint64)
                starts.tofile(fd)
                total = int(lens.sum())
                flat = itertools.chain.from_iterable(encoded)
                np.fromiter(flat, np.uint32, total).tofile(ft)
                n_tokens += total
                n_docs += len(encoded)
                batch.clear()

            for text in task.source.documents():
                if not text:
                    continue  # an empty document carries nothing to learn
                n_bytes += len(text.encode("utf-8"))
                batch.append(text)
                if len(batch) >= _BATCH_DOCS:
                    flush()
            if batch:
                flush()
            fd.write(np.uint64(n_tokens).tobytes())
    except BaseException:
        for p in tmp.values():
            if os.path.exists(p):
                os.unlink(p)
        raise
    meta = {**_task_meta(task), "n_tokens": n_tokens, "n_docs": n_docs, "text_bytes": n_bytes}
    return {"meta": meta, "tmp": tmp}


def _task_meta(task: ShardTask) -> dict:
    source = asdict(task.source)
    return {"name": task.name, "split": task.split, "lang": task.lang, "source": source}


def shard_paths(data_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    d = Path(data_dir)
    return d / f"{name}.tokens.bin", d / f"{name}.docs.bin"


def write_shards(
    tasks: Sequence[ShardTask],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    workers: int = 2,
    progress: bool = True,
    min_parallel_bytes: int = MIN_PARALLEL_BYTES,
) -> dict:
    """Run ``tasks`` (in ``workers`` processes, or in this process when ``workers`` is 1 or the
    input is smaller than ``min_parallel_bytes``) and write the manifest.

    Returns the manifest. Raises :class:`CorpusError` when the tasks hold no text at all.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"shard names must be unique: {names}")
    # An old manifest would point at shards this run replaces: drop it first.
    (out / MANIFEST).unlink(missing_ok=True)
    done: list[dict] = []
    pending_tmp: list[tuple[str, dict]] = []
    sizes = {t.name: t.source.size() for t in tasks}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="tokenize",
               disable=not progress)  # fmt: skip

    def finished(r: dict) -> None:
        pending_tmp.append((r["meta"]["name"], r["tmp"]))
        done.append(r["meta"])
        bar.update(sizes[r["meta"]["name"]])

    try:
        if workers <= 1 or len(tasks) == 1 or sum(sizes.values()) < min_parallel_bytes:
            for t in tasks:
                finished(_write_shard(t, str(out), tokenizer))
        else:
            # spawn, not fork: forking a process that runs tokenizer threads can deadlock.
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_init_worker, initargs=(tokenizer,)
            ) as ex:
                futs = [ex.submit(_write_shard, t, str(out)) for t in tasks]
                try:
                    for f in as_completed(futs):
                        finished(f.result())
                except BaseException:
                    ex.shutdown(wait=True, cancel_futures=True)  # let running tasks end first
                    raise
        if sum(m["n_tokens"] for m in done) == 0:
            raise CorpusError("the corpus is empty: no document has any text")
        order = {n: i for i, n in enumerate(names)}
        done.sort(key=lambda m: order[m["name"]])
        for name, tmp in pending_tmp:
            tok_path, doc_path = shard_paths(out, name)
            os.replace(tmp["docs"], doc_path)
            os.replace(tmp["tokens"], tok_path)
        manifest = {
            "format": FORMAT,
            "dtype": "uint32",
            "tokenizer": {
                "path": None if tokenizer.path is None else str(tokenizer.path),
                "n_words": tokenizer.n_words,
                "bos_id": tokenizer.bos_id,
                "eos_id": tokenizer.eos_id,
            },
            "shards": done,
        }
        atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode("utf-8"))
        return manifest
    except BaseException:
        # Remove everything this run wrote: temp files of every task (finished or not, in any
        # worker) and shards already renamed into place.
        for n in names:
            for p in out.glob(f".{n}.*.tmp"):
                p.unlink(missing_ok=True)
            for p in shard_paths(out, n):
                p.unlink(missing_ok=True)
        raise
    finally:
        bar.close()


def tokenize_files(
    inputs: Sequence[str | os.PathLike],
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    split: str = "train",
    text_key: str = "text",
    workers: int = 2,
    progress: bool = True,
    min_parallel_bytes: int = MIN_PARALLEL_BYTES,
) -> dict:
    """One shard per corpus file (text, JSONL, Parquet; folders are searched)."""
    files = expand_inputs(inputs)
    tasks = [
        ShardTask(f"{split}-{i:05d}", split, None, FileSource(str(f), text_key))
        for i, f in enumerate(files)
    ]
    return write_shards(tasks, tokenizer, out_dir, workers, progress, min_parallel_bytes)


def prepare_embedded_corpus(
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    val_fraction: float = 0.05,
    workers: int = 2,
    progress: bool = True,
    min_parallel_bytes: int = MIN_PARALLEL_BYTES,
) -> dict:
    """Shards of the embedded corpus: per split, one per main language plus ``other`` (all
    UDHR-only languages together), so each main language has its own validation set."""
    from llama4.data.corpus import MAIN_LANGUAGES

    tasks = []
    for split in ("train", "val"):
        for lang in MAIN_LANGUAGES:
            source = EmbeddedSource(split, (lang,), (), val_fraction)
            tasks.append(ShardTask(f"{split}-{lang}", split, lang, source))
        source = EmbeddedSource(split, None, MAIN_LANGUAGES, val_fraction)
        tasks.append(ShardTask(f"{split}-other", split, "other", source))
    return write_shards(tasks, tokenizer, out_dir, workers, progress, min_parallel_bytes)


def read_manifest(data_dir: str | os.PathLike) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise CorpusError(
            f"{data_dir}: no {MANIFEST}; the folder was not prepared or its preparation did not "
            "finish (run `llama4 data prepare` again)"
        )
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise CorpusError(f"{path}: unknown shard format {manifest.get('format')!r}")
    return manifest


def remove_shards(data_dir: str | os.PathLike) -> None:
    """Delete a prepared folder's manifest and shards (nothing else)."""
    manifest = read_manifest(data_dir)
    (Path(data_dir) / MANIFEST).unlink()
    for s in manifest["shards"]:
        for p in shard_paths(data_dir, s["name"]):
            p.unlink(missing_ok=True)


__all__ = [
    "EmbeddedSource",
    "FileSource",
    "ShardTask",
    "prepare_embedded_corpus",
    "read_manifest",
    "remove_shards",
    "shard_paths",
    "tokenize_files",
    "write_shards",
]
