"""Tasks on the Universal Declaration of Human Rights: which article is this text, quote an
article, translate an article's paragraph. Articles are held out by split for all three
(:data:`llama4.tasks.sources.ARTICLE_SPLITS`)."""

from __future__ import annotations

import random
from functools import lru_cache

from llama4.data.corpus import MAIN_LANGUAGES
from llama4.tasks.base import Example, Task, templates_for
from llama4.tasks.chrf import sentence_chrf
from llama4.tasks.languages import KNOWN_LANGUAGES, language_name
from llama4.tasks.sources import articles_of, window
from llama4.tasks.text import drop_intro, integers, normalize, squash_ws, strip_wrapping
from llama4.tasks.udhr import N_ARTICLES, first_sentence, sentences, udhr_articles

SYSTEM = "You are a helpful assistant who knows the Universal Declaration of Human Rights well."


def udhr_language(lang: str) -> str:
    """The language's name as a UDHR prompt uses it: the corpus's Chinese UDHR is the
    Traditional-script one (``udhr/cmn_hant``), so prompts say so."""
    return "Traditional Chinese" if lang == "cmn" else language_name(lang)


@lru_cache(maxsize=1)
def article_languages() -> tuple[str, ...]:
    """The named languages whose UDHR translation parses into 30 articles (67 of 72)."""
    arts = udhr_articles()
    return tuple(c for c in KNOWN_LANGUAGES if c in arts)


class ArticleNumber(Task):
    name = "udhr_article_number"
    metric = "exact_match"
    description = "give the UDHR article number of a passage of that article, in 67 languages"
    difficulty_help = ("1: the whole article; 2: one of its sentences; "
                       "3: a fragment of ~60 characters")
    TEMPLATES = (
        "Which article of the Universal Declaration of Human Rights is this ({language})? "
        "Answer with the article number only.\n\n{text}",
        "Here is text from the Universal Declaration of Human Rights, in {language}:\n\n{text}\n\n"
        "What is the number of the article it comes from? Reply with the number.",
        'In the Universal Declaration of Human Rights, which article contains: "{text}"? '
        "Give just the number.",
        "This {language} passage is from one article of the UDHR:\n{text}\n"
        "Tell me the article's number (1-30), nothing else.",
        "Universal Declaration of Human Rights, {language} text:\n\n{text}\n\n"
        "From which article (1 to 30) is it taken? Answer with a number.",
    )

    def _draw(self, rng: random.Random, split: str, difficulty: int) -> Example | None:
        lang = rng.choice(article_languages())
        number = rng.choice(articles_of(split))
        article = udhr_articles()[lang][number - 1]
        if difficulty == 1:
            text = article
        else:
            text = rng.choice(sentences(rng.choice(article.split("\n"))))
            if difficulty == 3:
                text = window(rng, text, 60)
        user = rng.choice(templates_for(self.TEMPLATES, split)).format(
            language=udhr_language(lang), text=text)
        return self._example(split, lang, SYSTEM, user, str(number), difficulty, article=number)

    def score(self, example: Example, response: str) -> float:
        """1.0 when the only article numbers (integers 1..30) the reply writes are the right
        one: "13", "Article 13." and "It is Article 13 (of the 1948 declaration)" count (1948 is
        no article number); "12 or 13" does not. Digits of any script count (full-width ``１３``);
        number words ("thirteen") do not."""
        found = {n for n in integers(response) if 1 <= n <= N_ARTICLES}
        return float(found == {int(example.answer)})


class ArticleQuote(Task):
    name = "udhr_article_quote"
    metric = "exact_match"
    description = "quote the start of UDHR article N in a given language, in 67 languages"
    difficulty_help = ("1: its first sentence; 2: its first paragraph; 3: the whole article")
    _WHAT = {1: "the first sentence", 2: "the first paragraph", 3: "the full text"}
    TEMPLATES = (
        "Quote {what} of Article {n} of the Universal Declaration of Human Rights in {language}, "
        "word for word. Reply with the quotation only.",
        "What is {what} of Article {n} of the UDHR, in its {language} version? Quote it exactly.",
        "Write out {what} of Article {n} of the Universal Declaration of Human Rights, as the "
        "official {language} translation words it. Nothing else.",
        "Recite {what} of UDHR Article {n} in {language}, verbatim.",
        "Give me {what} of Article {n} of the Universal Declaration of Human Rights in "
        "{language}. Only the quoted text, please.",
    )

    def _draw(self, rng: random.Random, split: str, difficulty: int) -> Example | None:
        lang = rng.choice(article_languages())
        number = rng.choice(articles_of(split))
        article = udhr_articles()[lang][number - 1]
        answer = {1: first_sentence(article), 2: article.split("\n", 1)[0], 3: article}[difficulty]
        user = rng.choice(templates_for(self.TEMPLATES, split)).format(
            what=self._WHAT[difficulty], n=number, language=udhr_language(lang))
        return self._example(split, lang, SYSTEM, user, answer, difficulty, article=number)

    def score(self, example: Example, response: str) -> float:
        """1.0 when the reply contains the reference text, compared after
        :func:`~llama4.tasks.text.normalize` (case, punctuation and spacing ignored: quotes,
        "Article 3:" labels and line breaks do not matter), and is not a dump: the normalised
        reply may be at most twice the reference plus 40 characters (quoting the whole
        article for its first sentence is fine; reciting the declaration is not).
        ``extra_scores`` gives chrF (0..1) against the reference for partial credit."""
        ref, got = normalize(example.answer), normalize(response)
        return float(bool(ref) and ref in got and len(got) <= 2 * len(ref) + 40)

    def extra_scores(self, example: Example, response: str) -> dict[str, float]:
        best = max(sentence_chrf(r, example.answer)
                   for r in (response.strip(), strip_wrapping(response, final_stop=False)))
        return {"chrf": best / 100.0}


@lru_cache(maxsize=None)
def _aligned_paragraphs(split: str) -> tuple[tuple[int, dict[str, str]], ...]:
    """``(article, {lang: paragraph})`` for each paragraph position of the split's articles,
    over the main languages whose article has as many paragraphs as the English one (a
    translation that merges or splits paragraphs is left out for that article)."""
    arts = udhr_articles()
    out = []
    for number in articles_of(split):
        paras = {lang: arts[lang][number - 1].split("\n") for lang in MAIN_LANGUAGES}
        n = len(paras["eng"])
        for k in range(n):
            out.append((number, {lang: p[k] for lang, p in paras.items() if len(p) == n}))
    return tuple(out)


class Translate(Task):
    name = "udhr_translate"
    metric = "chrf"
    description = ("translate a UDHR paragraph between two of the 14 main languages (half the "
                   "time English and another)")
    difficulty_help = ("the paragraph's length in English: 1: <= 120 characters (mostly one "
                       "sentence); 2: 121-250; 3: > 250")
    _BANDS = {1: (0, 120), 2: (121, 250), 3: (251, 10**6)}
    TEMPLATES = (
        "Translate from {src} to {tgt}. Reply with the translation only.\n\n{text}",
        "Please translate this {src} text into {tgt}:\n\n{text}",
        "{src} text:\n{text}\n\nGive its {tgt} translation, and nothing else.",
        "How would you say this in {tgt}? (The original is {src}.)\n\n{text}",
        "Render the following {src} text in {tgt}. Output only the {tgt} text.\n\n{text}",
    )

    def _draw(self, rng: random.Random, split: str, difficulty: int) -> Example | None:
        lo, hi = self._BANDS[difficulty]
        number, paras = rng.choice(_aligned_paragraphs(split))
        if not lo <= len(paras["eng"]) <= hi or len(paras) < 2:
            return None
        if rng.random() < 0.5:  # half English-centric, half between any two main languages
            other = rng.choice(sorted(set(paras) - {"eng"}))
            src, tgt = ("eng", other) if rng.random() < 0.5 else (other, "eng")
        else:
            src, tgt = rng.sample(sorted(paras), 2)
        user = rng.choice(templates_for(self.TEMPLATES, split)).format(
            src=udhr_language(src), tgt=udhr_language(tgt), text=paras[src])
        return self._example(split, tgt, SYSTEM, user, paras[tgt], difficulty, article=number,
                             source_lang=src)

    @staticmethod
    def readings_of(response: str) -> list[str]:
        """The translation inside a reply, read two ways (the verifier takes the better):
        the reply as it is, and without its wrapping. Wrapping is a first line that only
        introduces the translation ("Here is the translation:"), surrounding quotes and a
        short ``Label:`` prefix ("French:"). Runs of whitespace become one space in both."""
        unwrapped = strip_wrapping(drop_intro(response), final_stop=False)
        return [squash_ws(response), squash_ws(unwrapped)]

    def score(self, example: Example, response: str) -> float:
        """Sentence chrF (sacreBLEU 2 defaults, :mod:`llama4.tasks.chrf`) of the better of
        :meth:`readings_of` the reply against the reference, scaled to 0..1."""
        return max(sentence_chrf(r, example.answer) for r in self.readings_of(response)) / 100.0

    def extra_scores(self, example: Example, response: str) -> dict[str, float]:
        """``exact_match``: a reading of the reply equals the reference after
        :func:`~llama4.tasks.text.normalize` (case, punctuation, spacing ignored)."""
        ref = normalize(example.answer)
        return {"exact_match": float(any(normalize(r) == ref for r in self.readings_of(response)))}
