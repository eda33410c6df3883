"""English names of the languages the tasks use (ISO 639-3 code -> name, accepted aliases).

Only languages whose English name is unambiguous among those in the table: the corpus has
several "Chinese" and a dozen "Quechua" UDHR translations, which a name cannot tell apart, so
one of each is kept. The first name is the reference answer; aliases are also accepted.
"""

from __future__ import annotations

from llama4.data.corpus import MAIN_LANGUAGES

# fmt: off
LANGUAGE_NAMES: dict[str, tuple[str, ...]] = {
    # the 14 main languages (help pages + UDHR)
    "eng": ("English",), "deu": ("German", "Deutsch"), "fra": ("French", "Français"),
    "spa": ("Spanish", "Castilian", "Español"), "ita": ("Italian", "Italiano"),
    "por": ("Portuguese", "Brazilian Portuguese", "Português"), "pol": ("Polish",),
    "tur": ("Turkish",), "vie": ("Vietnamese",), "rus": ("Russian",),
    "ell": ("Greek", "Modern Greek"), "jpn": ("Japanese",), "kor": ("Korean",),
    "cmn": ("Chinese", "Mandarin", "Mandarin Chinese", "Traditional Chinese",
            "Simplified Chinese"),
    # widely known languages from the UDHR translations
    "arb": ("Arabic", "Standard Arabic"), "heb": ("Hebrew",), "hin": ("Hindi",),
    "ben": ("Bengali", "Bangla"), "tam": ("Tamil",), "tel": ("Telugu",), "mar": ("Marathi",),
    "guj": ("Gujarati",), "kan": ("Kannada",), "mal": ("Malayalam",), "npi": ("Nepali",),
    "urd": ("Urdu",), "pes": ("Persian", "Farsi"), "tha": ("Thai",), "lao": ("Lao", "Laotian"),
    "khm": ("Khmer", "Cambodian"), "mya": ("Burmese", "Myanmar"), "ukr": ("Ukrainian",),
    "bel": ("Belarusian", "Belarusan"), "bul": ("Bulgarian",), "mkd": ("Macedonian",),
    "srp": ("Serbian",), "hrv": ("Croatian",), "slv": ("Slovenian", "Slovene"),
    "ces": ("Czech",), "slk": ("Slovak",), "hun": ("Hungarian",), "ron": ("Romanian",),
    "nld": ("Dutch", "Flemish"), "dan": ("Danish",), "swe": ("Swedish",),
    "isl": ("Icelandic",), "fin": ("Finnish",), "ekk": ("Estonian",), "lvs": ("Latvian",),
    "lit": ("Lithuanian",), "cat": ("Catalan",), "eus": ("Basque",), "glg": ("Galician",),
    "cym": ("Welsh",), "mlt": ("Maltese",), "als": ("Albanian",), "hye": ("Armenian",),
    "kat": ("Georgian",), "kaz": ("Kazakh",), "uzn": ("Uzbek",), "khk": ("Mongolian",),
    "ind": ("Indonesian", "Bahasa Indonesia"), "tgl": ("Tagalog", "Filipino"),
    "swh": ("Swahili", "Kiswahili"), "amh": ("Amharic",), "hau": ("Hausa",),
    "yor": ("Yoruba",), "zul": ("Zulu", "isiZulu"), "xho": ("Xhosa", "isiXhosa"),
    "som": ("Somali",), "afr": ("Afrikaans",), "epo": ("Esperanto",),
}
# fmt: on

# The 14 main languages, then the others in table order: langid's difficulty 1 uses the first.
KNOWN_LANGUAGES = tuple(MAIN_LANGUAGES) + tuple(c for c in LANGUAGE_NAMES if c not in MAIN_LANGUAGES)


def language_name(code: str) -> str:
    """The English name of a language of :data:`LANGUAGE_NAMES`."""
    if code not in LANGUAGE_NAMES:
        raise ValueError(f"no English name for language {code!r}; known: {', '.join(LANGUAGE_NAMES)}")
    return LANGUAGE_NAMES[code][0]
