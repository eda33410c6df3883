"""The tokenizer routes at the server root, as vLLM serves them (lm-eval's ``RemoteTokenizer``
and its ``tokenizer_backend=auto`` probe use exactly these, so it needs no hub tokenizer):

    GET  /tokenizer_info                       -> {"eos_token", "bos_token", "pad_token", ...}
    POST /tokenize {"prompt", "add_special_tokens"} -> {"tokens", "count", "max_model_len"}
    POST /detokenize {"tokens"}                -> {"prompt"}

Unlike :meth:`Tokenizer.encode` (which keeps special-token spellings as plain text, so user text
can never inject a control token), ``/tokenize`` reads a special token's spelling as that token,
as a Hugging Face tokenizer does: clients find the id of ``eos_token`` by tokenizing its spelling.
"""

from __future__ import annotations

import re
from functools import lru_cache

from llama4.server import protocol as P
from llama4.server.errors import APIError
from llama4.server.logprobs import token_text


@lru_cache(maxsize=4)
def _special_pattern(names: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(re.escape(s) for s in sorted(names, key=len, reverse=True)))


def encode_with_special_tokens(tok, text: str, add_special_tokens: bool) -> list[int]:
    ids = [tok.bos_id] if add_special_tokens else []
    pos = 0
    for m in _special_pattern(tuple(tok.special_tokens)).finditer(text):
        ids += tok.encode(text[pos:m.start()])
        ids.append(tok.special_tokens[m.group()])
        pos = m.end()
    return ids + tok.encode(text[pos:])


def tokenizer_info(tok, max_model_len: int) -> dict:
    sp = {i: s for s, i in tok.special_tokens.items()}
    return {"tokenizer_class": type(tok).__name__, "bos_token": sp[tok.bos_id], "eos_token": sp[tok.eos_id],
            "pad_token": sp[tok.pad_id], "unk_token": None, "chat_template": None,
            "model_max_length": max_model_len, "vocab_size": tok.n_words}


def tokenize(tok, req: P.TokenizeRequest, max_model_len: int) -> P.TokenizeResponse:
    ids = encode_with_special_tokens(tok, req.prompt, req.add_special_tokens)
    return P.TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids,
                              token_strs=[token_text(tok, i) for i in ids] if req.return_token_strs else None)


def detokenize(tok, req: P.DetokenizeRequest) -> P.DetokenizeResponse:
    bad = next((i for i, t in enumerate(req.tokens) if not 0 <= t < tok.n_words), None)
    if bad is not None:
        raise APIError(400, f"Invalid 'tokens.{bad}': token id {req.tokens[bad]} is outside the vocabulary "
                       f"[0, {tok.n_words}).", f"tokens.{bad}", "invalid_value")
    return P.DetokenizeResponse(prompt=tok.decode(req.tokens))
