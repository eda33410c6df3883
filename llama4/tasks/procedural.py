"""Procedural tasks over corpus text and numbers: copy, reverse, count, add/subtract/multiply,
sort. Unlimited prompts with exact answers (Reasoning Gym's kind); each value (span, operand
pair, list) belongs to one split by a stable hash of the value itself."""

from __future__ import annotations

import random
import re
import unicodedata
from functools import lru_cache

from llama4.data.corpus import MAIN_LANGUAGES
from llama4.tasks.base import Example, Task, split_of, templates_for
from llama4.tasks.sources import looks_like, text_units, unit_words, words_window
from llama4.tasks.text import drop_intro, integers, normalize, squash_ws, strip_wrapping

SYSTEM = "You are a precise assistant. Follow the instruction exactly and reply concisely."
# languages written with spaces between words (word-level tasks need them)
SPACED_LANGUAGES = tuple(c for c in MAIN_LANGUAGES if c not in ("jpn", "cmn"))


def _span(rng: random.Random, split: str, n_words: int, langs=SPACED_LANGUAGES):
    lang = rng.choice(langs)
    words = words_window(rng, rng.choice(unit_words(lang, split)), n_words)
    return lang, words if words and looks_like(" ".join(words), lang) else None


def _matches_exactly(reference: str, response: str) -> bool:
    """The reply is the reference, up to spacing, an introductory first line ("Here is the
    text:"), surrounding quotes/backticks/code fences, a short ``Answer:``-style label and a
    final full stop."""
    ref = squash_ws(reference)
    got = drop_intro(response)
    lines = got.splitlines()
    if len(lines) >= 3 and lines[0].startswith("```") and lines[-1].strip() == "```":
        got = "\n".join(lines[1:-1])  # a fenced block, with or without an info string
    elif got.startswith("```") and got.endswith("```"):
        got = got.strip("`").strip()
    readings = {squash_ws(got), squash_ws(strip_wrapping(got))}
    return ref in readings or ref.rstrip(".。") in readings


class CopySpan(Task):
    name = "copy_span"
    description = "repeat a corpus passage exactly (12 languages)"
    difficulty_help = "words in the span: 1: 5-10; 2: 20-30; 3: 50-80"
    _WORDS = {1: (5, 10), 2: (20, 30), 3: (50, 80)}
    TEMPLATES = (
        "Repeat the following text exactly, without any change:\n\n{text}",
        "Copy this text word for word and reply with the copy only:\n\n{text}",
        'Please echo back exactly what is between the quotes: "{text}"',
        "Write the text below again, unchanged.\n\n{text}",
        "Reproduce this passage verbatim. Output nothing else.\n\n{text}",
    )

    def _draw(self, rng, split, difficulty):
        lang, words = _span(rng, split, rng.randint(*self._WORDS[difficulty]))
        if words is None or split_of(self.name, *words) != split:
            return None
        text = " ".join(words)
        user = rng.choice(templates_for(self.TEMPLATES, split)).format(text=text)
        return self._example(split, lang, SYSTEM, user, text, difficulty)

    def score(self, example: Example, response: str) -> float:
        """1.0 when the reply is the text exactly, up to spacing, surrounding quotes or code
        fences, a short label ("Answer:") and a final full stop. Case and punctuation inside
        the text must be kept: that is the task."""
        return float(_matches_exactly(example.answer, response))


class ReverseSpan(Task):
    name = "reverse_span"
    description = "write the words of a corpus span in reverse order (12 languages)"
    difficulty_help = "words in the span: 1: 3-5; 2: 6-10; 3: 11-20"
    _WORDS = {1: (3, 5), 2: (6, 10), 3: (11, 20)}
    TEMPLATES = (
        "Reverse the order of the words in this text (keep each word as it is):\n\n{text}",
        "Write these words in reverse order, last word first:\n\n{text}",
        'Take the words of "{text}" and list them backwards, separated by spaces.',
        "Reply with the words below in the opposite order, nothing else.\n\n{text}",
        "Here is a sequence of words:\n{text}\nGive the same words from last to first.",
    )

    def _draw(self, rng, split, difficulty):
        lang, words = _span(rng, split, rng.randint(*self._WORDS[difficulty]))
        if words is None or split_of(self.name, *words) != split:
            return None
        user = rng.choice(templates_for(self.TEMPLATES, split)).format(text=" ".join(words))
        return self._example(split, lang, SYSTEM, user, " ".join(reversed(words)), difficulty)

    def score(self, example: Example, response: str) -> float:
        """1.0 when the reply is the words in reverse order: compared as lists of words, each
        word exactly as written (its own punctuation kept), spacing, surrounding quotes, a
        short label and a final full stop forgiven."""
        return float(_matches_exactly(example.answer, response))


class CountWords(Task):
    name = "count_words"
    description = "count the words of a corpus span (12 languages)"
    difficulty_help = "words in the span: 1: 3-8; 2: 9-20; 3: 21-50"
    _WORDS = {1: (3, 8), 2: (9, 20), 3: (21, 50)}
    TEMPLATES = (
        "How many words does this text have? (Words are separated by spaces.) Answer with a "
        "number.\n\n{text}",
        "Count the words in the following text and reply with the count only:\n\n{text}",
        'How many space-separated words are in "{text}"?',
        "Text:\n{text}\n\nNumber of words (separated by spaces)?",
        "Tell me the number of words in this passage, counting the pieces between spaces.\n\n"
        "{text}",
    )

    def _draw(self, rng, split, difficulty):
        lang, words = _span(rng, split, rng.randint(*self._WORDS[difficulty]))
        if words is None or split_of(self.name, *words) != split:
            return None
        user = rng.choice(templates_for(self.TEMPLATES, split)).format(text=" ".join(words))
        return self._example(split, lang, SYSTEM, user, str(len(words)), difficulty)

    def score(self, example: Example, response: str) -> float:
        """1.0 when the last integer in the reply is the count ("7", "There are 7 words.");
        digits of any script and thousands separators are read."""
        found = integers(response)
        return float(bool(found) and found[-1] == int(example.answer))


class CountChars(Task):
    name = "count_chars"
    description = "count how often a letter occurs in a corpus span, ignoring case (14 languages)"
    difficulty_help = "span length: 1: one word; 2: 3-6 words; 3: 10-20 words"
    _WORDS = {1: (1, 1), 2: (3, 6), 3: (10, 20)}
    TEMPLATES = (
        "How many times does the letter '{char}' occur in the text below? Ignore case. Answer "
        "with a number.\n\n{text}",
        "Count the occurrences of \"{char}\" (upper or lower case) in: {text}",
        "In the text \"{text}\", how many '{char}' are there, counting capitals too?",
        "Text: {text}\nLetter: {char}\nHow many times does the letter appear (case-insensitive)?",
        "Tell me how often the character {char} appears in the following text, whatever its "
        "case.\n\n{text}",
    )

    def _draw(self, rng, split, difficulty):
        lo, hi = self._WORDS[difficulty]
        lang = rng.choice(MAIN_LANGUAGES)
        k = rng.randrange(len(text_units(lang, split)))
        unit, unit_ws = text_units(lang, split)[k], unit_words(lang, split)[k]
        if unit_ws:
            words = words_window(rng, unit_ws, rng.randint(lo, hi))
            if words is None or (difficulty == 1 and len(words[0]) < 5):
                return None
            text = " ".join(words)
        else:  # Chinese, Japanese: a run of characters instead of words
            text = "".join(unit.split())
            n = {1: 4, 2: 12, 3: 40}[difficulty]
            start = rng.randrange(0, max(1, len(text) - n))
            text = text[start:start + n]
        text = unicodedata.normalize("NFC", text)
        if not looks_like(text, lang):
            return None
        letters = sorted({c for c in text.casefold() if c.isalpha()})
        if not letters:
            return None
        char = rng.choice(letters)
        if split_of(self.name, text, char) != split:
            return None
        user = rng.choice(templates_for(self.TEMPLATES, split)).format(char=char, text=text)
        return self._example(split, lang, SYSTEM, user, str(text.casefold().count(char)),
                             difficulty, char=char)

    def score(self, example: Example, response: str) -> float:
        """1.0 when the last integer in the reply is the count (see ``count_words``). The count
        is of the case-folded, NFC-normalised text, as the prompt says."""
        found = integers(response)
        return float(bool(found) and found[-1] == int(example.answer))


class Arithmetic(Task):
    name = "arithmetic"
    description = "add, subtract or multiply two multi-digit integers"
    difficulty_help = ("digits: 1: 2-digit add/sub, 1x2-digit mul; 2: 3-4-digit add/sub, "
                       "2x2 mul; 3: 5-7-digit add/sub, 3x3 mul")
    _DIGITS = {1: ((2, 2), (1, 2)), 2: ((3, 4), (2, 2)), 3: ((5, 7), (3, 3))}
    _OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    _SHOWN = {"+": "+", "-": "-", "*": "×"}
    TEMPLATES = (
        "What is {expr}? Reply with the number only.",
        "Compute {expr}.",
        "Calculate: {expr} =",
        "Please work out {expr} and give the result as a single integer.",
        "{expr} equals what? Answer with just the number.",
    )

    def _draw(self, rng, split, difficulty):
        op = rng.choice("+-*")
        (lo, hi), (mlo, mhi) = self._DIGITS[difficulty]
        if op == "*":
            a, b = (rng.randint(10 ** (d - 1), 10**d - 1) for d in (mlo, mhi))
            a, b = (a, b) if rng.random() < 0.5 else (b, a)
        else:
            a, b = (rng.randint(10 ** (d - 1), 10**d - 1) for d in (rng.randint(lo, hi),) * 2)
        if split_of(self.name, a, op, b) != split:
            return None
        expr = f"{a} {self._SHOWN[op]} {b}"
        user = rng.choice(templates_for(self.TEMPLATES, split)).format(expr=expr)
        return self._example(split, "", SYSTEM, user, str(self._OPS[op](a, b)), difficulty, op=op)

    def score(self, example: Example, response: str) -> float:
        """1.0 when the last integer in the reply is the result ("579", "123 + 456 = 579",
        "-1,234"); a minus sign may be ``-`` or ``−``; thousands separators are read."""
        found = integers(response)
        return float(bool(found) and found[-1] == int(example.answer))


@lru_cache(maxsize=None)
def _english_words(split: str) -> list[str]:
    """Lower-case ASCII words (3+ letters) of the split's English text."""
    words = {w.strip(".,;:!?()\"'").lower() for u in text_units("eng", split) for w in u.split()}
    return sorted(w for w in words if w.isascii() and w.isalpha() and len(w) >= 3)


_ITEM_SPLIT = re.compile(r"[,;、，\s]+")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")


class SortList(Task):
    name = "sort_list"
    description = "sort a short list of integers or lower-case words in ascending order"
    difficulty_help = ("items (integers or words, half and half): 1: 4, integers 0-99; 2: 7, "
                       "integers 0-9,999; 3: 12, integers -9,999-9,999")
    _N = {1: 4, 2: 7, 3: 12}
    TEMPLATES = (
        "Sort these in ascending order and reply with the sorted list, comma-separated: {items}",
        "Put the following items in increasing order (alphabetical for words): {items}",
        "Sort: {items}",
        "Arrange this list from smallest to largest (or A to Z) and give only the list.\n{items}",
        "Here is a list: {items}. Write it sorted in ascending order, separated by commas.",
    )

    def _draw(self, rng, split, difficulty):
        n = self._N[difficulty]
        if rng.random() < 0.5:
            hi = {1: 99, 2: 9999, 3: 9999}[difficulty]
            lo = -hi if difficulty == 3 else 0
            items = [rng.randint(lo, hi) for _ in range(n)]
            ordered = [str(x) for x in sorted(items)]
            shown = [str(x) for x in items]
        else:  # ASCII lower-case words: alphabetical order is then the same in every locale
            shown = rng.sample(_english_words(split), n)
            ordered = sorted(shown)
        if len(set(shown)) < n or split_of(self.name, *shown) != split:
            return None
        user = rng.choice(templates_for(self.TEMPLATES, split)).format(items=", ".join(shown))
        return self._example(split, "", SYSTEM, user, ", ".join(ordered), difficulty)

    @staticmethod
    def items_of(response: str) -> list[str]:
        """The list in a reply: after an introductory line ending with a colon, one item a line
        when it is a bullet or numbered list, else the text after the last colon ("Sorted
        list: ...") split at commas, semicolons and spaces; items case-folded, brackets,
        quotes and stray punctuation dropped, integers read as integers."""
        lines = [ln for ln in drop_intro(response).splitlines() if ln.strip()]
        if len(lines) > 1 and all(_BULLET.match(ln) for ln in lines):
            raw = [_BULLET.sub("", ln) for ln in lines]
        else:  # items hold no colon: what precedes the last one is a label
            raw = _ITEM_SPLIT.split(" ".join(lines).rsplit(":", 1)[-1])
        out = []
        for x in raw:
            x = x.strip().strip("[](){}\"'`.:").replace("−", "-")
            if re.fullmatch(r"-?\d+", x):
                out.append(str(int(x)))
            elif normalize(x):
                out.append(normalize(x))
        return out

    def score(self, example: Example, response: str) -> float:
        """1.0 when the reply lists exactly the sorted items, in order (see :meth:`items_of`:
        "1, 5, 9", "[1, 5, 9]", "1 5 9" and a bullet list all count)."""
        return float(self.items_of(response) == self.items_of(example.answer))
