"""Bits per byte per language on the corpus's held-out (validation) text.

bits/byte = (summed NLL in nats of the text's tokens) / ln 2 / (UTF-8 bytes of the text). Bytes,
not tokens, so models with different tokenizers compare. Each document is scored as
``<|begin_of_text|>`` + its tokens; every token after BOS is predicted exactly once. A document
longer than the model's context goes in windows of ``window`` tokens that overlap by one token
(the last token of a window is the first, unscored, context token of the next), so a window's
first predictions see only what is in the window. Each window runs through the KV cache in
pieces (:func:`llama4.eval.common.token_nlls`), so memory stays bounded whatever the window.
"""

from __future__ import annotations

import math
import time

from llama4.eval.common import token_nlls


def text_nats(model, tok, text: str, window: int, piece: int = 1024) -> tuple[float, int]:
    """(summed NLL in nats, scored tokens) of ``text`` after BOS."""
    if window < 2:
        raise ValueError(f"the scoring window must be >= 2 tokens, got {window}")
    ids = [tok.bos_id] + tok.encode(text)
    total, n = 0.0, 0
    s = 0
    while s < len(ids) - 1:
        w = ids[s:s + window]
        nll = token_nlls(model, [w], piece=min(piece, window))
        total += float(nll.double().sum())
        n += nll.numel()
        s += window - 1
    return total, n


def corpus_bits_per_byte(model, tok, langs=None, max_docs: int | None = None, window: int | None = None,
                         piece: int = 1024, progress: bool = True) -> dict:
    """``{"metric": "bits_per_byte", "score": over all scored text, "n": documents,
    "by_lang": {lang: bits/byte}, "details": {lang: {docs, tokens, bytes, nats, seconds}}}``.

    ``langs``: ISO 639-3 codes (default: the corpus's main languages); ``max_docs`` caps the
    validation documents per language; ``window``: tokens per scored window (default: the
    model's ``max_seq_len``)."""
    from tqdm import tqdm

    from llama4.data.corpus import MAIN_LANGUAGES, iter_corpus

    langs = list(langs or MAIN_LANGUAGES)
    window = window or model.args.max_seq_len
    docs = {lang: list(iter_corpus("val", langs=(lang,))) for lang in langs}
    for lang, ds in docs.items():
        if not ds:
            raise ValueError(f"language {lang!r} has no validation text in the corpus")
        if max_docs is not None:
            docs[lang] = ds[:max_docs]
    by_lang, details = {}, {}
    all_nats, all_bytes, n_docs = 0.0, 0, 0
    bar = tqdm(total=sum(len(d) for d in docs.values()), desc="ppl", unit="doc", disable=not progress)
    for lang in langs:
        t0 = time.perf_counter()
        nats, n_tok, n_bytes = 0.0, 0, 0
        for d in docs[lang]:
            s, n = text_nats(model, tok, d.text, window, piece)
            nats += s
            n_tok += n
            n_bytes += len(d.text.encode("utf-8"))
            bar.update(1)
        by_lang[lang] = nats / math.log(2) / n_bytes
        details[lang] = {"docs": len(docs[lang]), "tokens": n_tok, "bytes": n_bytes, "nats": nats,
                         "nats_per_token": nats / max(n_tok, 1), "seconds": round(time.perf_counter() - t0, 3)}
        all_nats += nats
        all_bytes += n_bytes
        n_docs += len(docs[lang])
    bar.close()
    return {"metric": "bits_per_byte", "score": all_nats / math.log(2) / all_bytes, "n": n_docs,
            "by_lang": by_lang, "details": details, "window": window}
