"""Language identification: name the language of a passage from the corpus."""

from __future__ import annotations

import random
import re
from functools import lru_cache

from llama4.tasks.base import Example, Task, split_of, templates_for
from llama4.tasks.languages import KNOWN_LANGUAGES, LANGUAGE_NAMES, language_name
from llama4.tasks.sources import looks_like, text_units, window
from llama4.tasks.text import normalize

SYSTEM = "You are a helpful multilingual assistant. Answer briefly."
TEMPLATES = (
    "What language is the following text written in? Answer with the language's English name "
    "only.\n\n{passage}",
    "Identify the language of this passage. Reply with just the name of the language, in "
    "English.\n\nPassage: {passage}",
    'Text: "{passage}"\n\nWhich language is this? Give only its English name.',
    "Name the language of the text below (its English name, nothing else).\n\n{passage}",
    "Here is a passage:\n{passage}\n\nIn which language is it written? Reply with the English "
    "name of the language.",
)
# difficulty -> (languages, passage length in characters)
LEVELS = {1: (14, 200), 2: (len(KNOWN_LANGUAGES), 100), 3: (len(KNOWN_LANGUAGES), 40)}


@lru_cache(maxsize=1)
def _name_patterns() -> tuple[tuple[str, re.Pattern], ...]:
    """Every accepted name (normalised) of every language, as a whole-word regex."""
    out = []
    for code, names in LANGUAGE_NAMES.items():
        for name in names:
            out.append((code, re.compile(rf"(?<!\w){re.escape(normalize(name))}(?!\w)")))
    return tuple(out)


def languages_named(reply: str) -> set[str]:
    """The codes of the languages a reply names (English names and listed aliases)."""
    text = normalize(reply)
    return {code for code, rx in _name_patterns() if rx.search(text)}


class LanguageId(Task):
    name = "langid"
    metric = "exact_match"
    description = "name the language of a corpus passage (help pages and UDHR)"
    difficulty_help = ("1: the 14 main languages, ~200-character passages; 2: 72 languages, "
                       "~100 characters; 3: 72 languages, ~40 characters")

    def _draw(self, rng: random.Random, split: str, difficulty: int) -> Example | None:
        n_langs, n_chars = LEVELS[difficulty]
        lang = rng.choice(KNOWN_LANGUAGES[:n_langs])
        passage = window(rng, rng.choice(text_units(lang, split)), n_chars)
        if len(passage) < n_chars // 3 or not looks_like(passage, lang):
            return None  # too short, or untranslated English / code in a help page
        if split_of(self.name, passage) != split:
            return None  # this exact passage belongs to another split
        user = rng.choice(templates_for(TEMPLATES, split)).format(passage=passage)
        return self._example(split, lang, SYSTEM, user, language_name(lang), difficulty,
                             accepted=list(LANGUAGE_NAMES[lang]))

    def score(self, example: Example, response: str) -> float:
        """1.0 when the reply names the right language and no other.

        Names are matched as whole words after :func:`~llama4.tasks.text.normalize` (case,
        punctuation and spacing ignored), so "French", "french." and "The text is in French."
        all count; the English name or a listed alias ("Farsi" for Persian, "Mandarin" for
        Chinese, the endonym for a few) is accepted. A reply that names two languages
        ("French or Italian") scores 0, as does an ISO code.
        """
        return float(languages_named(response) == {example.lang})
