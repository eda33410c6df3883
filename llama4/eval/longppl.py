"""Long-context loss probe (LONG_CONTEXT.md §7): does context beyond the training length help or hurt?

For a training length L and multiples k, each evaluation sequence is K·L tokens of held-out corpus
text (K = the largest k; validation documents of one language concatenated, each after its
``<|begin_of_text|>``). One pass over the whole sequence gives every position's loss; because the
model is causal, the loss of a token inside the first k·L tokens is the same whether or not more
text follows, so one pass serves every k. Then

    loss_full(k) = mean NLL of the tokens at positions (k-1)·L+1 .. k·L-1, given everything before
    loss_own(k)  = mean NLL of the same tokens given only their own window (k-1)·L .. k·L-1,
                   run as a fresh sequence at positions 0 .. L-1
    Δ(k)         = loss_full(k) - loss_own(k)                                         (nats)

Both score the same L-1 tokens (the window's first token has no prediction of its own), so text
difficulty cancels: Δ(1) = 0 by construction, Δ > 0 means the extra context hurts (a failure to
extrapolate), Δ <= 0 that it is harmless or helps. Passes go through the KV cache in pieces, so
memory is the global layers' KV plus one piece's logits.
"""

from __future__ import annotations

import math
from pathlib import Path

from llama4.eval.common import check_context, note, pyplot, save_figure, token_nlls, write_json


def corpus_sequences(tok, n_tokens: int, n_docs: int, langs=None) -> tuple[list[list[int]], list[str]]:
    """Up to ``n_docs`` disjoint sequences of ``n_tokens`` ids from the validation split, each in one
    language (round robin over ``langs``); when no language has enough text, the languages' text
    concatenated. -> (sequences, language of each)."""
    from llama4.data.corpus import MAIN_LANGUAGES, iter_corpus

    langs = list(langs or MAIN_LANGUAGES)
    streams = {}
    for lang in langs:
        ids = []
        for d in iter_corpus("val", langs=(lang,)):
            ids += [tok.bos_id] + tok.encode(d.text)
        streams[lang] = ids
    cuts = {lang: [s[i:i + n_tokens] for i in range(0, len(s) - n_tokens + 1, n_tokens)] for lang, s in streams.items()}
    seqs, seq_langs = [], []
    r = 0
    while len(seqs) < n_docs and any(len(c) > r for c in cuts.values()):
        for lang in langs:
            if len(cuts[lang]) > r and len(seqs) < n_docs:
                seqs.append(cuts[lang][r])
                seq_langs.append(lang)
        r += 1
    if not seqs:
        mixed = [t for lang in langs for t in streams[lang]]
        seqs = [mixed[i:i + n_tokens] for i in range(0, len(mixed) - n_tokens + 1, n_tokens)][:n_docs]
        seq_langs = ["+".join(langs)] * len(seqs)
    if not seqs:
        total = sum(len(s) for s in streams.values())
        raise ValueError(f"the validation text of {', '.join(langs)} has {total:,} tokens, fewer than one sequence "
                         f"of {n_tokens:,} (train-len x the largest multiple); use smaller --multiples or "
                         f"--train-len, or more --langs")
    return seqs, seq_langs


def log_bins(n: int, per_octave: int = 8) -> list[tuple[int, int]]:
    """[lo, hi) index ranges of 0..n-1, geometrically growing (positions 1..n on a log axis)."""
    steps = int(per_octave * math.log2(max(n, 2))) + 2
    edges = sorted({min(n, round(2 ** (i / per_octave))) for i in range(steps)} | {1, n + 1})
    return [(a - 1, b - 1) for a, b in zip(edges, edges[1:]) if b > a]


def long_ppl(model, tok, model_name: str, train_len: int, multiples: list[int], n_docs: int = 8, langs=None,
             piece: int = 1024, max_context: int | None = None, progress: bool = True) -> dict:
    """Per-position loss and Δ(k) averaged over ``n_docs`` sequences (see the module docstring)."""
    import torch
    from tqdm import tqdm

    if train_len < 2:
        raise ValueError(f"--train-len must be >= 2 tokens, got {train_len}")
    if not multiples or min(multiples) < 1:
        raise ValueError(f"--multiples must be integers >= 1, got {multiples}")
    if n_docs < 1 or piece < 1:
        raise ValueError(f"--n-docs and --piece must be >= 1, got {n_docs} and {piece}")
    multiples = sorted(set(multiples))
    L, K = train_len, max(multiples)
    T = K * L
    check_context(model, T, 1, max_context, f"longppl at {K} x {L}", piece=piece)
    seqs, seq_langs = corpus_sequences(tok, T, n_docs, langs)
    if len(seqs) < n_docs:
        note(f"longppl: the validation text gives {len(seqs)} sequences of {T:,} tokens (asked for {n_docs})")
    curve = torch.zeros(T - 1, dtype=torch.float64)
    full = {k: [] for k in multiples}
    own = {k: [] for k in multiples}
    for seq in tqdm(seqs, desc="longppl", unit="seq", disable=not progress):
        nll = token_nlls(model, [seq], piece=piece)[0]  # (T-1,): index j is the target at position j+1
        curve += nll.double()
        windows = [seq[(k - 1) * L:k * L] for k in multiples]
        own_nll = token_nlls(model, windows, piece=piece)  # (len(multiples), L-1)
        for i, k in enumerate(multiples):
            full[k].append(float(nll[(k - 1) * L:k * L - 1].double().mean()))
            own[k].append(float(own_nll[i].double().mean()))
    curve /= len(seqs)
    n = len(seqs)
    res = {"model": model_name, "train_len": L, "multiples": multiples, "n_docs": n, "langs": seq_langs,
           "tokens_per_doc": T, "delta": {}, "delta_stderr": {}, "loss_full": {}, "loss_own": {},
           "delta_per_doc": {}}
    for k in multiples:
        d = [f - o for f, o in zip(full[k], own[k])]
        mean = sum(d) / n
        res["delta"][str(k)] = mean
        res["delta_stderr"][str(k)] = (math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1) / n) if n > 1 else None)
        res["loss_full"][str(k)] = sum(full[k]) / n
        res["loss_own"][str(k)] = sum(own[k]) / n
        res["delta_per_doc"][str(k)] = d
    bins = log_bins(T - 1)
    res["curve"] = {"position": [(lo + hi + 1) / 2 for lo, hi in bins],  # mean target position of the bin
                    "loss": [float(curve[lo:hi].mean()) for lo, hi in bins]}
    return res


def write_long_ppl(res: dict, out_dir) -> None:
    out = Path(out_dir)
    write_json(out / "longppl.json", res)
    plot_long_ppl(res, out / "longppl.png")


def plot_long_ppl(res: dict, path: Path) -> Path:
    plt = pyplot()
    L = res["train_len"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(res["curve"]["position"], res["curve"]["loss"], marker=".", lw=1)
    a.set_xscale("log")
    for k in res["multiples"]:
        a.axvline(k * L, color="grey", lw=0.5, ls=":")
    a.set_xlabel("token position (log)")
    a.set_ylabel("loss (nats/token)")
    a.set_title(f"per-position loss, {res['n_docs']} docs (dotted: multiples of L={L})")
    ks = res["multiples"]
    ys = [res["delta"][str(k)] for k in ks]
    errs = [res["delta_stderr"][str(k)] or 0.0 for k in ks]
    b.errorbar(ks, ys, yerr=errs, marker="o", capsize=3)
    b.axhline(0, color="grey", lw=0.8)
    b.set_xscale("log", base=2)
    b.set_xlabel("k (context = k x L)")
    b.set_ylabel("Δ (nats)")
    b.set_title("Δ(k) = loss(last L | k·L) − loss(same | own L)")
    fig.suptitle(f"long-context loss probe: {res['model']}")
    fig.tight_layout()
    return save_figure(fig, path)
