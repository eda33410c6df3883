"""What every evaluation shares: atomic output files, parsing of list flags, the KV-memory check
made before a long context is allocated, and per-token losses computed in bounded-memory pieces."""

from __future__ import annotations

import io
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from llama4.tokenizer.files import atomic_write_bytes


# --------------------------------------------------------------------------------------------
# output files (written whole or not at all)

def write_json(path: Path, obj) -> Path:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def write_text(path: Path, text: str) -> Path:
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """A matplotlib figure to PNG, atomically, then closed."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def note(msg: str) -> None:
    """A progress line for the user (stderr, so stdout stays clean for piping)."""
    print(msg, file=sys.stderr, flush=True)


def reply_text(tok, ids) -> str:
    """A generated reply as text: up to its first stop token, without ids the tokenizer does not
    have (a model's vocabulary may be padded past the tokenizer's), stripped."""
    stops = set(tok.stop_tokens)
    cut = next((k for k, t in enumerate(ids) if t in stops), len(ids))
    return tok.decode([t for t in ids[:cut] if 0 <= t < tok.n_words]).strip()


# --------------------------------------------------------------------------------------------
# list flags

_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_length(text: str, flag: str = "--lengths") -> int:
    """Tokens: "4096", "4k" (= 4096), "1m" (= 1048576), "1.5k" (= 1536)."""
    m = _LENGTH.match(text)
    if not m:
        raise ValueError(f"{flag}: {text!r} is not a length in tokens (use e.g. 256, 4k, 1m)")
    value = float(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[m.group(2).lower()]
    if value != int(value) or value < 1:
        raise ValueError(f"{flag}: {text!r} is not a whole positive number of tokens")
    return int(value)


def parse_lengths(text: str, flag: str = "--lengths") -> list[int]:
    items = [t for t in text.split(",")]
    if not text.strip() or any(not t.strip() for t in items):
        raise ValueError(f"{flag}: {text!r} must be a comma-separated list of lengths (e.g. 1k,4k,16k)")
    return [parse_length(t, flag) for t in items]


def parse_depths(text: str, flag: str = "--depths") -> list[float]:
    """Percentages in [0, 100], e.g. "0,25,50,75,100"."""
    out = []
    for t in text.split(","):
        try:
            d = float(t)
        except ValueError:
            raise ValueError(f"{flag}: {t.strip()!r} is not a number (depths are percentages, e.g. "
                             "0,25,50,75,100)") from None
        if not 0.0 <= d <= 100.0 or math.isnan(d):
            raise ValueError(f"{flag}: depth {t.strip()} is outside [0, 100] (percent of the context)")
        out.append(d)
    return out


def parse_ints(text: str, flag: str, minimum: int = 1) -> list[int]:
    out = []
    for t in text.split(","):
        try:
            v = int(t)
        except ValueError:
            raise ValueError(f"{flag}: {t.strip()!r} is not an integer (give a comma-separated list, e.g. "
                             "1,2,4,8)") from None
        if v < minimum:
            raise ValueError(f"{flag}: {v} is below the minimum of {minimum}")
        out.append(v)
    return out


def parse_names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    return names or None


def check_languages(langs: Sequence[str] | None, flag: str = "--langs") -> None:
    """Language codes must be ones the corpus has (ISO 639-3)."""
    if not langs:
        return
    from llama4.data.corpus import language_sizes

    known = language_sizes()
    bad = [lang for lang in langs if lang not in known]
    if bad:
        main = "eng, deu, fra, spa, ita, por, pol, tur, vie, rus, ell, jpn, kor, cmn"
        raise ValueError(f"{flag}: unknown language {bad[0]!r} (codes are ISO 639-3; the corpus has "
                         f"{len(known)} languages, the main ones {main})")


# --------------------------------------------------------------------------------------------
# memory: say what a context costs before allocating it

def available_memory(device) -> int:
    """Bytes free for new tensors on ``device``: the accelerator's free memory, or the host's
    MemAvailable (capped by a cgroup limit, where one is set)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free or 1 << 62, int(limit) - used)
    except (OSError, ValueError):
        pass
    if free is None:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return free


def kv_cache_bytes(model, rows: int, tokens: int) -> int:
    """Bytes ``llama4.infer.KVCache`` allocates for ``rows`` sequences of ``tokens`` tokens: the
    whole history on global (NoPE) layers, one chunk on chunked layers (each with its scratch slot)."""
    from llama4.model import kv_bytes_per_token

    p = next(model.parameters())
    a = model.args
    kv = kv_bytes_per_token(a, dtype_bytes=p.element_size())
    per_layer = 2 * a.n_kv_heads * a.hd * p.element_size()
    n_local = a.n_layers - kv["global_layers"] // per_layer
    local = per_layer * n_local * (min(a.attention_chunk_size or 0, tokens) + 1)
    return rows * (kv["global_layers"] * (tokens + 1) + local)


def check_context(model, tokens: int, rows: int, max_context: int | None, what: str,
                  piece: int = 2048, say: bool = True) -> int:
    """Refuse a context longer than the model serves or than memory holds, before allocating it.

    ``max_context`` defaults to the model's ``max_seq_len``. Returns the estimated bytes (KV cache
    plus one piece's activations and logits) after printing them when ``say``."""
    limit = max_context or model.args.max_seq_len
    if tokens > limit:
        raise ValueError(f"{what}: {tokens:,} tokens is beyond the model's context limit of {limit:,} "
                         f"tokens (its max_seq_len; pass --max-context N to evaluate beyond it)")
    p = next(model.parameters())
    a = model.args
    kv = kv_cache_bytes(model, rows, tokens)
    # One prefill piece: its hidden states, attention output and the logits (float32 for the loss).
    work = rows * min(piece, tokens) * (8 * a.dim * p.element_size() + 2 * 4 * a.vocab_size)
    need = kv + work
    free = available_memory(p.device)
    if say:
        note(f"{what}: {rows} x {tokens:,} tokens: KV cache ~{_human(kv)} (+ ~{_human(work)} per piece of "
             f"{min(piece, tokens):,}); {_human(free)} free on {p.device}")
    if need > 0.9 * free:
        raise ValueError(f"{what}: {rows} x {tokens:,} tokens needs ~{_human(need)} (KV cache {_human(kv)}), "
                         f"more than the {_human(free)} free on {p.device}; use shorter lengths or fewer "
                         f"rows (--batch-size)")
    return need


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# --------------------------------------------------------------------------------------------
# per-token losses through the KV cache, one prefill piece at a time

def token_nlls(model, ids, piece: int = 1024):
    """Negative log-likelihoods in nats, float32 (R, T-1), of ``ids[:, 1:]``, each token given
    every token before it in its row. ``ids``: (R, T) token ids (a list of equal-length lists or a
    tensor). The scoring is :func:`llama4.infer.score.sequence_logprobs` (the server's and lm-eval's
    too): through a KV cache in pieces of ``piece`` tokens, so memory is the cache (bounded on
    chunked layers) plus one piece's logits, whatever T is."""
    import torch

    from llama4.infer.score import sequence_logprobs

    rows = torch.as_tensor(ids, dtype=torch.long).reshape(-1, torch.as_tensor(ids).shape[-1]).tolist()
    return torch.stack([-s.logprobs for s in sequence_logprobs(model, rows, piece=piece)])
