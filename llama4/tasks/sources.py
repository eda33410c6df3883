"""Corpus text for the tasks, already held out by split.

* UDHR articles are dealt to the splits once for every task (:data:`ARTICLE_SPLITS`): a test
  article is test in every language and every task, so training on article quotes or
  translations never shows a test article's text.
* Help pages go by a hash of their id, the same in every language (parallel pages stay together).
* A UDHR translation that does not parse into articles goes by a hash of each line.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from llama4.data.corpus import MAIN_LANGUAGES
from llama4.tasks.base import check_split, deal, split_of
from llama4.tasks.udhr import N_ARTICLES, udhr_articles

ARTICLE_SPLITS: dict[str, list[int]] = deal(list(range(1, N_ARTICLES + 1)), "udhr-articles")
_SPACED = re.compile(r"\S+")


def articles_of(split: str) -> list[int]:
    """The UDHR article numbers (1-based) held by ``split``."""
    return ARTICLE_SPLITS[check_split(split)]


@lru_cache(maxsize=None)
def text_units(lang: str, split: str) -> tuple[str, ...]:
    """Paragraph-sized texts of one language in one split (help pages, UDHR articles or lines)."""
    from llama4.data.corpus import load_documents

    check_split(split)
    units: list[str] = []
    arts = udhr_articles().get(lang)
    for d in load_documents():
        if d.lang != lang:
            continue
        if d.id and d.id.startswith("udhr/"):
            if arts is not None:
                units += [arts[k - 1] for k in articles_of(split)]
            else:
                units += [ln for i, ln in enumerate(d.text.split("\n"))
                          if len(ln) >= 20 and split_of("udhr-line", lang, i) == split]
        elif split_of("page", d.id) == split:
            units.append(d.text)
    if not units:
        raise ValueError(f"no corpus text for language {lang!r} in split {split!r}")
    return tuple(units)


def is_spaced(text: str) -> bool:
    """Whether words are separated by spaces (not Chinese, Japanese, Thai, Lao, Khmer...)."""
    return len(_SPACED.findall(text)) >= max(2, len(text) // 25)


def window(rng: random.Random, text: str, n_chars: int) -> str:
    """A passage of about ``n_chars`` characters from ``text``, on one line, starting and ending
    at word boundaries where the script has spaces."""
    text = " ".join(text.split())
    if len(text) <= n_chars:
        return text
    start = rng.randrange(0, len(text) - n_chars + 1)
    piece = text[start:start + n_chars]
    if is_spaced(text):
        if start > 0 and text[start - 1] != " " and " " in piece:  # drop a cut first word
            piece = piece.split(" ", 1)[1]
        end = start + n_chars
        if end < len(text) and text[end] != " " and " " in piece:  # and a cut last word
            piece = piece.rsplit(" ", 1)[0]
    return piece.strip()


@lru_cache(maxsize=None)
def unit_words(lang: str, split: str) -> tuple[tuple[str, ...], ...]:
    """:func:`text_units` as words (whitespace-separated pieces holding a letter or digit);
    units of scripts written without spaces are left out (empty)."""
    return tuple(tuple(w for w in u.split() if any(c.isalnum() for c in w)) if is_spaced(u)
                 else () for u in text_units(lang, split))


def words_window(rng: random.Random, words: tuple[str, ...], n_words: int) -> list[str] | None:
    """``n_words`` consecutive words of ``words``, or None if it has fewer."""
    if len(words) < n_words:
        return None
    start = rng.randrange(0, len(words) - n_words + 1)
    return list(words[start:start + n_words])


# English function words and help-page verbs; a help page of another language that still holds
# untranslated English shows them. Per language, those that are also its own words are ignored.
_ENGLISH = frozenset("the of and to in is you that it for on with as are this be or by from at "
                     "an if not can will your which use click select choose example examples "
                     "enter name when".split())
_ALSO_NATIVE = {
    "deu": {"in", "an", "will", "am"}, "fra": {"on", "as", "est"}, "spa": {"a"},
    "ita": {"in", "a", "use"}, "por": {"a", "as"}, "pol": {"to", "on", "a"},
    "tur": {"on", "at", "an"}, "vie": {"an", "in", "on", "to"},
}
_LATIN_SCRIPT = frozenset("deu fra spa ita por pol tur vie".split())
_HELP_LANGUAGES = frozenset(MAIN_LANGUAGES)


def looks_like(text: str, lang: str) -> bool:
    """False for a passage that is visibly not (only) in ``lang``. Only help pages (the main
    languages) hold such text: for a Latin-script language other than English, two or more
    English words of :data:`_ENGLISH`; for another script, ASCII letters over a quarter of
    the letters (untranslated English, code, function names)."""
    if lang == "eng" or lang not in _HELP_LANGUAGES:  # UDHR-only languages: clean text
        return True
    if lang in _LATIN_SCRIPT:
        english = _ENGLISH - _ALSO_NATIVE.get(lang, set())
        return sum(w.strip(".,;:()\"'").lower() in english for w in text.split()) < 2
    letters = [c for c in text if c.isalpha()]
    return sum(c.isascii() for c in letters) <= len(letters) / 4
