"""Shared fixtures for the tokenizer tests: our tokenizer and Meta's reference (the oracle).

Helpers are handed out as fixtures (not imported by module name), so the tests work under any
pytest import mode.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest


@pytest.fixture(scope="session")
def tok():
    from llama4.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def meta_tok():
    from llama_models.llama4.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def import_meta_chat_format():
    """Meta's chat_format imports torchvision (for image transforms) at module import. Where
    torchvision is absent we stub the two modules it names; text-only formatting never uses
    them, and image tests replace the transforms themselves."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv = types.ModuleType("torchvision")
        tr = types.ModuleType("torchvision.transforms")
        fn = types.ModuleType("torchvision.transforms.functional")
        tv.transforms, tr.functional = tr, fn
        saved = {k: sys.modules.get(k) for k in (tv.__name__, tr.__name__, fn.__name__)}
        sys.modules.update({tv.__name__: tv, tr.__name__: tr, fn.__name__: fn})
        try:
            return importlib.import_module("llama_models.llama4.chat_format")
        finally:
            # Leave no fake torchvision behind for other tests (the imported module keeps its refs).
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v
    return importlib.import_module("llama_models.llama4.chat_format")


@pytest.fixture(scope="session")
def meta_chat_format():
    return import_meta_chat_format()


@pytest.fixture(scope="session")
def multilingual():
    """Text in at least 12 scripts plus code, emoji and whitespace runs."""
    return MULTILINGUAL


MULTILINGUAL = (
    "Hello world! The quick brown fox jumps over the lazy dog. It's 2025; don't panic.\n"
    "Français : « Où est la bibliothèque ? » Ça coûte 12,50 € — déjà vu.\n"
    "Русский: Съешь же ещё этих мягких французских булок, да выпей чаю.\n"
    "Ελληνικά: Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.\n"
    "العربية: نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر.\n"
    "עברית: דג סקרן שט בים מאוכזב ולפתע מצא חברה.\n"
    "हिन्दी: ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले विष्णुवतार भगवान श्रीराम।\n"
    "ไทย: เป็นมนุษย์สุดประเสริฐเลิศคุณค่า กว่าบรรดาฝูงสัตว์เดรัจฉาน\n"
    "中文：我能吞下玻璃而不伤身体。日本語：いろはにほへと ちりぬるを。\n"
    "한국어: 키스의 고유조건은 입술끼리 만나야 하고 특별한 기술은 필요치 않다.\n"
    "Emoji: 😀👍🏽👨‍👩‍👧‍👦 🇺🇳 ✨🔥 and ZWJ sequences.\n"
    "Code:\n```python\ndef f(x: int) -> int:\n    return x ** 2  # square\n```\n"
    "fn main() { println!(\"{}\", 1 + 2); } // Rust\n"
    "Whitespace:   \t\t  runs\n\n\n\n    indented\r\n\u00a0nbsp\u3000ideographic space   \n"
    "Numbers: 1234567890 3.14159 1e-9 0xDEADBEEF\n"
    "Specials in text: <|begin_of_text|><|eot|><|header_start|>user<|header_end|><|image|>\n"
)
