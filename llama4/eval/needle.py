"""Needle in a haystack: a passkey hidden at a depth of a long filler text, the model asked for it.

For each context length L (tokens) and depth d (percent), the prompt is exactly L tokens: a Llama 4
chat dialog (or a plain completion prompt) whose user turn is an instruction, the haystack, and
the question. The haystack is filler text cut in token space with the needle sentence spliced in
at the sentence boundary at or before d% of it (0: first, 100: last), as the widely used
``LLMNeedleHaystackTester`` places it. Fillers:

* ``random``: a seeded shuffle of short plain sentences ("The grass is green. The sky is blue. ...",
  the passkey-retrieval filler of Mohtashami & Jaggi, 2023);
* ``corpus``: real text, the embedded corpus in one language (``--filler-lang``), repeated as needed.

The needle is a random 5-7 digit number ("The special magic number is 4728193.") or, with
``kind="kv"``, a key-value pair; the score is exact match: 1 if the reply contains the digits (not
as part of a longer number), else 0. Each cell is written as one JSON with the tester's fields
(``model, context_length, depth_percent, version, needle, model_response, score,
test_duration_seconds, test_timestamp_utc``), plus a summary and a heatmap (length x depth).
The depths of one length are generated as one batch; a cell's ``test_duration_seconds`` is its
share of that batch's wall time.

Long prompts go through the engine's chunked prefill (``llama4.infer.generate``, pieces of
``prefill_chunk`` tokens): chunked layers keep one chunk of keys, global layers the whole history,
so memory is the KV cache of the global layers plus one piece.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from llama4.eval.common import check_context, note, pyplot, reply_text, save_figure, write_json

VERSION = 1
# What LLMNeedleHaystackTester writes per cell (our score: exact match, 0 or 1).
FIELDS_OF_THE_TESTER = ("model", "context_length", "depth_percent", "version", "needle", "model_response", "score",
                        "test_duration_seconds", "test_timestamp_utc")
FILLERS = ("random", "corpus")
SYSTEM = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct."
INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it "
               "and memorize it; I will ask you about it.\n\n")
SENTENCES = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
    "The river flows to the sea.", "Birds sing in the morning.", "The road is long and quiet.",
    "Clouds drift over the hills.", "The night is dark and calm.", "A cat sleeps by the window.",
    "Leaves fall in the autumn.",
)
_SENTINEL = "\u2063HAYSTACK\u2063"  # an improbable text part, replaced by the haystack's ids


@dataclass(frozen=True)
class Needle:
    sentence: str  # spliced into the haystack
    question: str
    answer: str  # the digits the reply must contain
    primer: str  # completion format: the prompt ends with this, the answer follows

    @staticmethod
    def make(kind: str, rng: random.Random) -> "Needle":
        n = rng.randint(5, 7)
        digits = str(rng.randrange(10 ** (n - 1), 10 ** n))
        if kind == "passkey":
            return Needle(f"The special magic number is {digits}.", "What is the special magic number?",
                          digits, "The special magic number is")
        if kind == "kv":
            key = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6))
            return Needle(f'The value of the key "{key}" is {digits}.', f'What is the value of the key "{key}"?',
                          digits, f'The value of the key "{key}" is')
        raise ValueError(f"unknown needle kind {kind!r}; expected 'passkey' or 'kv'")


def score_response(response: str, needle: Needle) -> float:
    """Exact match: 1.0 when the needle's digits appear in the reply as a whole number."""
    return 1.0 if re.search(rf"(?<!\d){re.escape(needle.answer)}(?!\d)", response) else 0.0


# --------------------------------------------------------------------------------------------
# filler and prompt, in token space

def filler_ids(tok, kind: str, n_tokens: int, seed: int = 0, lang: str = "eng") -> list[int]:
    """At least ``n_tokens`` ids of filler text (ending at a sentence boundary where possible)."""
    if kind == "random":
        rng = random.Random(seed)
        sample = " ".join(SENTENCES)
        per_sentence = max(1.0, len(tok.encode(sample)) / len(SENTENCES))
        n_sent = int(n_tokens / per_sentence * 1.1) + 16
        ids = tok.encode(" ".join(rng.choice(SENTENCES) for _ in range(n_sent)))
        while len(ids) < n_tokens:
            ids += tok.encode(" " + " ".join(rng.choice(SENTENCES) for _ in range(n_sent)))
        return ids
    if kind == "corpus":
        from llama4.data.corpus import iter_corpus

        text = "\n".join(d.text for d in iter_corpus("all", langs=(lang,)))
        if not text:
            raise ValueError(f"--filler-lang: the corpus has no text in {lang!r}")
        base = tok.encode(text + "\n")
        return base * (n_tokens // len(base) + 1)
    raise ValueError(f"unknown filler {kind!r}; expected one of {', '.join(FILLERS)} (or 'both')")


def _ends_sentence(tok, t: int) -> bool:
    s = tok.decode([t]).rstrip(" ")
    return s.endswith((".", "!", "?", "\n", "\u3002", "\uff01", "\uff1f"))


def _boundary_at_or_before(tok, ids: list[int], pos: int) -> int:
    """The largest p <= pos such that ids[:p] ends a sentence (0 if none)."""
    p = pos
    while p > 0 and not _ends_sentence(tok, ids[p - 1]):
        p -= 1
    return p


def prompt_frame(tok, needle: Needle, fmt: str) -> tuple[list[int], list[int]]:
    """(ids before the haystack, ids after it) of the full prompt."""
    from llama4.tokenizer.chat_format import encode_dialog_prompt

    if fmt == "chat":
        parts = [INSTRUCTION, _SENTINEL, f"\n\n{needle.question} Answer with the number only."]
        ids = encode_dialog_prompt(tok, [{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": parts}])
    elif fmt == "completion":  # a base model continues the primer with the number
        ids = ([tok.bos_id] + tok.encode(INSTRUCTION) + tok.encode(_SENTINEL)
               + tok.encode(f"\n\n{needle.question}\n{needle.primer}"))
    else:
        raise ValueError(f"unknown prompt format {fmt!r}; expected 'chat' or 'completion'")
    s = tok.encode(_SENTINEL)  # each content part is encoded on its own, so it appears verbatim
    i = next(i for i in range(len(ids) - len(s) + 1) if ids[i:i + len(s)] == s)
    return ids[:i], ids[i + len(s):]


def build_prompt(tok, filler: list[int], needle: Needle, length: int, depth: float, fmt: str = "chat") -> list[int]:
    """Exactly ``length`` ids: the frame around ``filler`` cut to fit, with the needle at ``depth``%."""
    head, tail = prompt_frame(tok, needle, fmt)
    needle_ids = tok.encode(" " + needle.sentence)
    budget = length - len(head) - len(tail) - len(needle_ids)
    if budget < 0:
        raise ValueError(f"--lengths: {length} tokens is too short for the prompt (the question and needle "
                         f"alone take {length - budget} tokens)")
    if len(filler) < budget:
        raise ValueError(f"the filler has {len(filler)} tokens, fewer than the {budget} needed")
    hay = filler[:budget]
    at = _boundary_at_or_before(tok, hay, round(budget * depth / 100.0))
    ids = head + hay[:at] + needle_ids + hay[at:] + tail
    assert len(ids) == length, (len(ids), length)
    return ids


def shortest_prompt(tok, kind: str = "passkey", fmt: str = "chat") -> int:
    """About the fewest tokens a prompt can have: the frame, the needle and a sentence of filler."""
    probe = Needle.make(kind, random.Random(0))
    head, tail = prompt_frame(tok, probe, fmt)
    return len(head) + len(tail) + len(tok.encode(" " + probe.sentence)) + 8  # + 8: longer numbers, a sentence


# --------------------------------------------------------------------------------------------
# the sweep

def run_needle(model, tok, model_name: str, lengths: list[int], depths: list[float], out_dir,
               fillers=("random",), kind: str = "passkey", fmt: str = "chat", seed: int = 0,
               filler_lang: str = "eng", max_tokens: int = 24, batch_size: int = 8,
               max_context: int | None = None, prefill_chunk: int = 2048, respond=None,
               progress: bool = True) -> dict:
    """Every (filler, length, depth) cell; writes ``OUT/cells/<filler>/len_<L>_depth_<d>.json``,
    ``OUT/summary.json`` and ``OUT/heatmap.png``; returns the summary.

    ``respond(prompts: list[list[int]], max_tokens) -> list[str]`` replaces the model's
    generation (tests drive the scorer with it); by default the engine generates greedily."""
    from tqdm import tqdm

    if fmt not in ("chat", "completion"):
        raise ValueError(f"unknown prompt format {fmt!r}; expected 'chat' or 'completion'")
    for f in fillers:
        if f not in FILLERS:
            raise ValueError(f"unknown filler {f!r}; expected one of {', '.join(FILLERS)} (or 'both')")
    for flag, v in (("--batch-size", batch_size), ("--max-tokens", max_tokens), ("--prefill-chunk", prefill_chunk)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    lengths, depths = list(dict.fromkeys(lengths)), list(dict.fromkeys(depths))
    out = Path(out_dir)
    # Refuse what cannot run before generating anything: too short for the prompt, beyond the
    # model's limit or the memory (the longest cell).
    least = shortest_prompt(tok, kind, fmt)
    short = [L for L in lengths if L < least]
    if short:
        raise ValueError(f"--lengths: {short[0]} tokens is too short for the prompt (the instructions, question "
                         f"and needle alone take about {least} tokens with this tokenizer)")
    rows = min(batch_size, len(depths))
    for L in sorted(set(lengths)):
        check_context(model, L + max_tokens, rows, max_context, f"needle length {L:,} + {max_tokens} reply tokens",
                      piece=prefill_chunk, say=L == max(lengths))
    if respond is None:
        respond = _engine_responder(model, tok, prefill_chunk)
    cells = []
    bar = tqdm(total=len(fillers) * len(lengths) * len(depths), desc="needle", unit="cell", disable=not progress)
    for filler in fillers:
        for L in lengths:
            pool = filler_ids(tok, filler, L, seed=seed + L, lang=filler_lang)
            for lo in range(0, len(depths), batch_size):
                batch = depths[lo:lo + batch_size]
                needles = [Needle.make(kind, random.Random(f"{seed}/{filler}/{L}/{d}")) for d in batch]
                prompts = [build_prompt(tok, pool, nd, L, d, fmt) for nd, d in zip(needles, batch)]
                t0 = time.perf_counter()
                replies = respond(prompts, max_tokens)
                dt = (time.perf_counter() - t0) / len(batch)
                for d, nd, reply in zip(batch, needles, replies):
                    cell = {"model": model_name, "context_length": L, "depth_percent": d, "version": VERSION,
                            "needle": nd.sentence, "model_response": reply, "score": score_response(reply, nd),
                            "test_duration_seconds": round(dt, 3),
                            "test_timestamp_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S%z"),
                            "filler": filler, "expected_answer": nd.answer, "question": nd.question,
                            "prompt_format": fmt, "prompt_tokens": L}
                    write_json(out / "cells" / filler / f"len_{L}_depth_{_depth_name(d)}.json", cell)
                    cells.append(cell)
                bar.update(len(batch))
    bar.close()
    summary = summarize(cells, model_name, lengths, depths, fillers,
                        config={"kind": kind, "format": fmt, "seed": seed, "filler_lang": filler_lang,
                                "max_tokens": max_tokens, "prefill_chunk": prefill_chunk})
    write_json(out / "summary.json", summary)
    plot_heatmap(summary, out / "heatmap.png")
    note(f"needle: mean score {summary['mean']:.3f} over {len(cells)} cells -> {out}")
    return summary


def _depth_name(d: float) -> str:
    return str(int(d)) if d == int(d) else str(d).replace(".", "p")


def _engine_responder(model, tok, prefill_chunk: int):
    from llama4.infer.generation import generate

    def respond(prompts, max_tokens):
        outs = generate(model, prompts, max_tokens, stop=tok.stop_tokens, prefill_chunk=prefill_chunk)
        return [reply_text(tok, ids) for ids in outs]

    return respond


def summarize(cells: list[dict], model_name: str, lengths, depths, fillers, config: dict | None = None) -> dict:
    per = {}
    for f in fillers:
        mine = [c for c in cells if c["filler"] == f]
        grid = [[next(c["score"] for c in mine if c["context_length"] == L and c["depth_percent"] == d)
                 for L in lengths] for d in depths]  # grid[depth][length]
        per[f] = {"mean": sum(c["score"] for c in mine) / len(mine),
                  "by_length": {str(L): sum(grid[j][i] for j in range(len(depths))) / len(depths)
                                for i, L in enumerate(lengths)},
                  "by_depth": {str(d): sum(row) / len(row) for d, row in zip(depths, grid)},
                  "grid": grid}
    return {"model": model_name, "version": VERSION, "lengths": list(lengths), "depths": list(depths),
            "mean": sum(c["score"] for c in cells) / len(cells), "n_cells": len(cells), "fillers": per,
            "config": config or {}}


def _length_label(n: int) -> str:
    if n % (1 << 20) == 0:
        return f"{n >> 20}m"
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def plot_heatmap(summary: dict, path: Path) -> Path:
    """One panel per filler: context length on x, needle depth on y, score as colour."""
    plt = pyplot()
    fillers = list(summary["fillers"])
    nx, ny = len(summary["lengths"]), len(summary["depths"])
    fig, axes = plt.subplots(1, len(fillers), figsize=(len(fillers) * (2.2 + 0.8 * nx) + 1.2, 2.0 + 0.45 * ny),
                             squeeze=False, layout="constrained")
    for ax, f in zip(axes[0], fillers):
        grid = summary["fillers"][f]["grid"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(summary["lengths"])), [_length_label(L) for L in summary["lengths"]])
        ax.set_yticks(range(len(summary["depths"])), [f"{d:g}%" for d in summary["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{f} filler: mean {summary['fillers'][f]['mean']:.2f}")
        for j, row in enumerate(grid):
            for i, v in enumerate(row):
                ax.text(i, j, f"{v:.0f}" if v in (0, 1) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), label="score (exact match)")
    fig.suptitle(f"needle in a haystack: {summary['model']}")
    return save_figure(fig, path)
