"""The study's measurements of one trained model, all through the evaluation room's own probes.

* :func:`probe` — ``llama4 eval longppl`` (Δ(k) at k·L, per-position loss) and ``llama4 eval needle``
  (passkey, completion format, random and corpus filler, lengths k·L x depths), written under
  ``OUT/longppl`` and ``OUT/needle`` exactly as the commands write them.
* :func:`apply_temperature` — Llama 4's inference-time temperature tuning on the NoPE layers,
  ``q *= 1 + attn_scale * log1p(floor((p + 1) / floor_scale))``, switched on/off in a loaded model.
* :func:`max_logit_change` — the check that tuning is the identity at and below floor_scale.
* :func:`prefill_cost` — peak RSS and tokens/s of the chunked prefill at each length, each model in
  its own process (``python -m llama4.experiments.irope.probes MODEL L1,L2,..``: lengths ascending,
  so the process's peak RSS after length T is the peak of T).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from llama4.eval.longppl import long_ppl, write_long_ppl
from llama4.eval.needle import run_needle

PASSKEY_REPLY_TOKENS = 12  # " 4728193." is at most 9 tokens with the study's tokenizer


def nope_attention(model) -> list:
    return [layer.attention for layer in model.layers if not layer.attention.use_rope]


def apply_temperature(model, setting: dict | None) -> None:
    """``setting``: ``{"floor_scale": f, "attn_scale": s}`` switches tuning on in every NoPE layer,
    ``None`` switches it off."""
    for attn in nope_attention(model):
        attn.temperature_tuning = setting is not None
        if setting is not None:
            attn.floor_scale, attn.attn_scale = float(setting["floor_scale"]), float(setting["attn_scale"])


@torch.inference_mode()
def max_logit_change(model, tok, setting: dict, n_tokens: int) -> float:
    """Largest |logit(tuned) - logit(off)| over the first ``n_tokens`` positions of held-out text."""
    from llama4.eval.longppl import corpus_sequences

    (ids,), _ = corpus_sequences(tok, n_tokens, 1)
    x = torch.tensor([ids])
    apply_temperature(model, None)
    off = model(x)
    apply_temperature(model, setting)
    on = model(x)
    apply_temperature(model, None)
    return float((on - off).abs().max())


def passkey_accuracy(summary: dict, lengths=None, depths=None) -> float:
    """Mean exact-match over both fillers' cells, optionally only some lengths / depths."""
    vals = []
    for per in summary["fillers"].values():
        for j, d in enumerate(summary["depths"]):
            for i, L in enumerate(summary["lengths"]):
                if (lengths is None or L in lengths) and (depths is None or d in depths):
                    vals.append(per["grid"][j][i])
    return sum(vals) / len(vals) if vals else float("nan")


def probe(model, tok, name: str, out: Path, train_len: int, multiples, needle_multiples, depths, n_docs: int,
          piece: int, seed: int = 0) -> dict:
    """Both probes on a loaded model (its temperature setting as it is); -> {"longppl", "needle"}."""
    out.mkdir(parents=True, exist_ok=True)
    longest = train_len * max(list(multiples) + list(needle_multiples)) + PASSKEY_REPLY_TOKENS
    res = {}
    if multiples:
        res["longppl"] = long_ppl(model, tok, name, train_len, list(multiples), n_docs=n_docs, piece=piece,
                                  max_context=longest, progress=False)
        write_long_ppl(res["longppl"], out / "longppl")
    if needle_multiples:
        res["needle"] = run_needle(model, tok, name, [k * train_len for k in needle_multiples], list(depths),
                                   out / "needle", fillers=("random", "corpus"), kind="passkey", fmt="completion",
                                   seed=seed, max_tokens=PASSKEY_REPLY_TOKENS, batch_size=len(depths),
                                   max_context=longest, prefill_chunk=piece, progress=False)
    return res


# --------------------------------------------------------------------------------------------
# memory and speed of the chunked prefill at each length

def prefill_cost(model_dir: Path, lengths: list[int], piece: int, threads: int = 1) -> list[dict]:
    """[{"tokens", "seconds", "tokens_per_s", "peak_rss_mib", "kv_cache_mib"}] for each length, measured
    in a fresh process (so RSS is this model's alone)."""
    cmd = [sys.executable, "-m", "llama4.experiments.irope.probes", str(model_dir),
           ",".join(map(str, sorted(lengths))), str(piece), str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"prefill measurement of {model_dir} failed:\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _measure(model_dir: str, lengths: list[int], piece: int, threads: int) -> None:
    import resource
    import time

    from llama4.eval.common import kv_cache_bytes
    from llama4.infer import KVCache
    from llama4.infer.model_dir import load_model_dir

    torch.set_num_threads(threads)
    model, _, _ = load_model_dir(model_dir)
    g = torch.Generator().manual_seed(0)
    for T in lengths:
        ids = torch.randint(0, model.args.vocab_size, (1, T), generator=g)
        with torch.inference_mode():
            t0 = time.perf_counter()
            cache = KVCache.for_model(model, 1, T)
            for s in range(0, T, piece):
                cache.prefill(model, ids[:, s:s + piece], 0, piece=piece)
            dt = time.perf_counter() - t0
        del cache
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
        print(json.dumps({"tokens": T, "seconds": round(dt, 3), "tokens_per_s": round(T / dt, 1),
                          "peak_rss_mib": round(rss, 1), "kv_cache_mib": round(kv_cache_bytes(model, 1, T) / 2**20, 2)}),
              flush=True)


if __name__ == "__main__":
    _measure(sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3]), int(sys.argv[4]))
