"""Read documents from corpus files: plain text, JSON Lines and Parquet (optionally .gz/.xz/.bz2).

* ``*.txt`` / ``*.md`` / other text: the whole file is one document.
* ``*.jsonl`` / ``*.json``: one JSON object per line; the document is ``obj[text_key]`` and its
  language ``obj.get("lang")``.
* ``*.parquet``: one document per row of the ``text_key`` column (read by row group, so files
  larger than memory work); a ``lang`` column is used when present.

Input must be UTF-8: a file that is not says where the first bad byte is, rather than feeding
replacement characters into training.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator


class CorpusError(ValueError):
    """A corpus file or folder cannot be used (missing, empty, not UTF-8, bad JSON)."""


@dataclass(frozen=True)
class Document:
    text: str
    lang: str | None = None
    id: str | None = None


_COMPRESSED = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
_JSONL = {".jsonl", ".json", ".ndjson"}
_TEXT = {".txt", ".md", ".text", ".rst", ".py", ".tex", ".html", ".xml", ".csv", ".tsv"}
SUPPORTED = sorted(_JSONL | _TEXT | {".parquet"})


def _kind(path: Path) -> tuple[str, str | None]:
    """(``"text"``|``"jsonl"``|``"parquet"``, compression suffix or None)."""
    suffixes = [s.lower() for s in path.suffixes]
    comp = suffixes[-1] if suffixes and suffixes[-1] in _COMPRESSED else None
    base = suffixes[-2] if comp and len(suffixes) >= 2 else (suffixes[-1] if suffixes else "")
    if base == ".parquet" and comp is None:
        return "parquet", None
    if base in _JSONL:
        return "jsonl", comp
    if base in _TEXT or base == "":
        return "text", comp
    raise CorpusError(f"{path}: unsupported file type {base!r}; supported: {', '.join(SUPPORTED)}")


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files named, plus every supported file under folders named (sorted, so runs are
    reproducible). Raises if a path does not exist or nothing usable is found."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = []
            for f in sorted(p.rglob("*")):
                if not f.is_file() or f.name.startswith("."):
                    continue
                try:
                    _kind(f)
                except CorpusError:
                    continue
                found.append(f)
            files += found
        elif p.is_file():
            _kind(p)  # raises for unsupported types
            files.append(p)
        else:
            raise CorpusError(f"corpus path not found: {p}")
    if not files:
        raise CorpusError(f"no corpus files found in {[str(p) for p in inputs]}")
    return files


def _read_bytes(path: Path, comp: str | None) -> bytes:
    if comp is None:
        return path.read_bytes()
    try:
        with _COMPRESSED[comp](path, "rb") as f:
            return f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise CorpusError(f"{path}: cannot decompress ({e})") from None


def _decode_utf8(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise CorpusError(
            f"{path}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}, line "
            f"{line}); convert the file to UTF-8 first (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _jsonl_docs(path: Path, text: str, text_key: str) -> Iterator[Document]:
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
            raise CorpusError(f"{path}:{lineno}: expected an object with a string {text_key!r}")
        yield Document(obj[text_key], obj.get("lang"), obj.get("id"))


def _parquet_docs(path: Path, text_key: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError("reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid and friends
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_key not in names:
        raise CorpusError(f"{path}: no {text_key!r} column (columns: {names})")
    cols = [text_key] + (["lang"] if "lang" in names else [])
    for batch in pf.iter_batches(columns=cols, batch_size=4096):
        texts = batch.column(0).to_pylist()
        langs = batch.column(1).to_pylist() if len(cols) == 2 else [None] * len(texts)
        for t, lang in zip(texts, langs):
            if t is not None:
                yield Document(t, lang)


def iter_documents(path: str | os.PathLike, text_key: str = "text") -> Iterator[Document]:
    """Documents of one corpus file (see the module docstring for the formats)."""
    path = Path(path)
    kind, comp = _kind(path)
    if kind == "parquet":
        yield from _parquet_docs(path, text_key)
        return
    text = _decode_utf8(_read_bytes(path, comp), path)
    if kind == "jsonl":
        yield from _jsonl_docs(path, text, text_key)
    else:
        yield Document(text, None, path.name)


def iter_texts(inputs: Iterable[str | os.PathLike], text_key: str = "text") -> Iterator[str]:
    """Texts of all documents in ``inputs`` (files or folders), in order."""
    for f in expand_inputs(inputs):
        for doc in iter_documents(f, text_key):
            yield doc.text
