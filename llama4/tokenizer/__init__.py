"""Tokenizer room: Llama 4's BPE tokenizer, its chat format, and training our own small BPEs.

Public API::

    from llama4.tokenizer import Tokenizer, load_tokenizer
    tok = load_tokenizer()              # the official Llama 4 vocabulary, no network
    ids = tok.encode("Hello", bos=True)
    from llama4.tokenizer.chat_format import encode_dialog_prompt
"""

from llama4.tokenizer.files import TokenizerFileError
from llama4.tokenizer.special_tokens import NUM_SPECIAL_TOKENS, SPECIAL_TOKEN_NAMES, SPLIT_PATTERN
from llama4.tokenizer.streaming import StreamingDecoder
from llama4.tokenizer.tokenizer import Tokenizer, load_tokenizer, official_tokenizer_path

__all__ = [
    "NUM_SPECIAL_TOKENS",
    "SPECIAL_TOKEN_NAMES",
    "SPLIT_PATTERN",
    "StreamingDecoder",
    "Tokenizer",
    "TokenizerFileError",
    "load_tokenizer",
    "official_tokenizer_path",
]
