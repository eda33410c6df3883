"""The UDHR translations of the embedded corpus, parsed into their 30 articles.

In ``corpus.jsonl.xz`` a translation is one document of lines: the title, the preamble's heading
and paragraphs, then for each article a heading line ("Article 1", "Artículo 1", "第一條",
"제 1 조", "Điều 1:", "ΑΡΘΡΟ 1", "Article premier"...) followed by its paragraphs.

The parser does not know any language's word for "article". It finds the numbered headings:

1. every short line (<= 40 characters) that holds a number is a candidate; its number is read
   from any script's decimal digits, CJK numerals (一 … 三十) or Roman numerals (I … XXX), and
   its *pattern* is the line with the number replaced by ``{}`` ("Article {}", "第{}條");
2. the first chain of candidates numbered 2, 3, ..., 30 in reading order gives the headings,
   if most of them (60%) share a style (the pattern's first three characters: "Mataki na
   biyu ({})" and "Mataki na uku ({})" agree; a typo such as 弟23条 for 第23条 is tolerated);
3. article 1's heading is the line with that pattern and number 1, or else the last short line
   before article 2's heading that shares the pattern's text around the number ("Article
   premier", "Artikel Een");
4. an article is the lines between its heading and the next (the last one ends the document).

A translation that does not yield exactly articles 1..30, each with text, or whose article
lengths do not follow the English ones (Pearson r of the 30 length shares < 0.5: a wrong cut
shifts text between articles), is left out: :func:`udhr_articles` returns only the languages
that parse (368 of the 447; all 14 main languages).
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

N_ARTICLES = 30
_MAX_HEADING = 40
_CJK = {"〇": 0, "零": 0, "一": 1, "二": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7,
        "八": 8, "九": 9, "十": 10, "两": 2, "兩": 2}  # fmt: skip
_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}
_DIGITS = re.compile(r"\d+")
_CJK_RUN = re.compile(f"[{''.join(_CJK)}]+")
_ROMAN_RUN = re.compile(r"(?<![^\W\d_])[IVXLC]+(?![^\W\d_])")
# sentence ends: Latin/Cyrillic/Greek, CJK full stops, Devanagari danda, Ethiopic, Armenian,
# Myanmar, Khmer, Arabic/Urdu question marks and full stop
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)|(?<=[。！？।॥።։။។۔؟])\s*(?=\S)")


def _cjk_value(run: str) -> int | None:
    """一 … 九十九 (the forms UDHR headings use), else None."""
    vals = [_CJK[c] for c in run]
    if 10 not in vals:
        return int("".join(map(str, vals))) if len(vals) <= 2 else None
    i = vals.index(10)
    if vals.count(10) > 1 or i > 1 or len(vals) - i > 2:
        return None
    tens = vals[0] if i == 1 else 1
    units = vals[i + 1] if i + 1 < len(vals) else 0
    return tens * 10 + units


def _roman_value(run: str) -> int | None:
    total = 0
    for a, b in zip(run, run[1:] + " "):
        v = _ROMAN[a]
        total += -v if b != " " and _ROMAN[b] > v else v
    return total if 0 < total <= 100 else None


def heading_number(line: str) -> tuple[int, str] | None:
    """``(number, pattern)`` of a short line holding one number, else None."""
    line = line.strip()
    if not line or len(line) > _MAX_HEADING:
        return None
    for rx, value in (
        (_DIGITS, lambda r: int("".join(str(unicodedata.digit(c)) for c in r))),
        (_CJK_RUN, _cjk_value),
        (_ROMAN_RUN, _roman_value),
    ):
        runs = list(rx.finditer(line))
        if len(runs) == 1:
            v = value(runs[0].group())
            if v is not None:
                m = runs[0]
                return v, line[: m.start()] + "{}" + line[m.end():]
    return None


def parse_articles(text: str) -> list[str] | None:
    """The 30 articles of one translation (article N is ``[N - 1]``, paragraphs joined by
    newlines), or None where the text does not parse (see the module docstring)."""
    lines = [ln.strip() for ln in text.split("\n")]
    cands = [(i, *hn) for i, ln in enumerate(lines) if (hn := heading_number(ln))]
    heads = _chain(cands)
    if heads is None:
        return None
    patterns = [pat for i, num, pat in cands if heads.get(num) == i]
    styles = [_style(p) for p in patterns]  # "Mataki na biyu ({})" and "Mataki na uku ({})"
    major_style = max(set(styles), key=styles.count)
    if styles.count(major_style) < 0.6 * len(styles):  # numbers, but not one heading style
        return None
    major = max(set(patterns), key=patterns.count)
    if 1 not in heads:
        one = [i for i, num, _ in cands if num == 1 and i < heads[2]]
        heads[1] = one[-1] if one else _article_one(lines, major, heads[2])
        if heads[1] is None:
            return None
    starts = [heads[k] for k in range(1, N_ARTICLES + 1)]
    ends = starts[1:] + [len(lines)]
    arts = ["\n".join(ln for ln in lines[s + 1:e] if ln) for s, e in zip(starts, ends)]
    return arts if all(arts) else None


def _style(pattern: str) -> str:
    """A heading's style: its first three characters (its last three if it starts with the
    number), so ordinal words and typos within one style still agree."""
    p = pattern.casefold()
    return p[-3:] if p.startswith("{}") else p[:3]


def _chain(cands: list[tuple[int, int, str]]) -> dict[int, int] | None:
    """``{number: line}`` for headings 2..30 in reading order (the first chain that completes)."""
    for k, (start, num, _) in enumerate(cands):
        if num != 2:
            continue
        heads, want = {2: start}, 3
        for i, n, _ in cands[k + 1:]:
            if n == want and i > heads[want - 1] + 1:  # an article has at least one line
                heads[want] = i
                want += 1
                if want > N_ARTICLES:
                    return heads
    return None


def _article_one(lines: list[str], pattern: str, before: int) -> int | None:
    prefix, suffix = (p.strip() for p in pattern.split("{}"))
    for i in range(before - 1, -1, -1):
        ln = lines[i]
        if ln and len(ln) <= _MAX_HEADING and (prefix or suffix) and ln.startswith(prefix) \
                and ln.endswith(suffix):
            return i
    return None


def sentences(paragraph: str) -> list[str]:
    """A paragraph cut after sentence-final punctuation (``. ! ?`` followed by space, or the
    full stops of CJK, Indic, Ethiopic, Armenian, Myanmar, Khmer and Arabic scripts)."""
    return [s.strip() for s in _SENTENCE_END.split(paragraph.strip()) if s.strip()]


def first_sentence(article: str) -> str:
    return sentences(article.split("\n", 1)[0])[0]


@lru_cache(maxsize=1)
def udhr_articles() -> dict[str, tuple[str, ...]]:
    """``{lang: (article 1, ..., article 30)}`` for every UDHR translation that parses."""
    from llama4.data.corpus import load_documents

    parsed = {}
    for d in load_documents():
        if d.id and d.id.startswith("udhr/") and d.lang:
            arts = parse_articles(d.text)
            if arts is not None:
                parsed[d.lang] = tuple(arts)
    if "eng" not in parsed:
        raise ValueError("the corpus's English UDHR does not parse into 30 articles")
    ref = [len(a) for a in parsed["eng"]]
    return {k: v for k, v in parsed.items() if _pearson(ref, [len(a) for a in v]) >= 0.5}


def _pearson(x: list[int], y: list[int]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else 0.0
