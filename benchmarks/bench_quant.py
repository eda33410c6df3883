"""Quantized weights against fp32 on the same machine, in the same run: quality and decode speed.

    .venv/bin/python benchmarks/bench_quant.py [--model /work/pt_runs/base_metap/final]
        [--schemes bf16 fp16 int8 int4:32 int4:64 int4:128] [--threads 1] [--new 64] [--reps 3]
        [--no-quality] [--bench-shape] [--compiled] [--no-trained]

Each scheme is written by ``llama4 quantize``'s own code (llama4.quant.checkpoint.quantize_dir)
into a temporary folder and read back by ``llama4.load``, which picks the compute paths (printed).

* quality (the trained model): Δ validation loss vs fp32 in nats/token per language (the corpus's
  held-out text, llama4.eval.ppl), top-1 agreement with fp32 teacher-forced on validation text
  (first 512 tokens of 2 documents per language), and greedy agreement: one held-out prompt per
  language (its first 24 tokens), 32 greedy tokens, the share equal to fp32's at the same position.
* speed: greedy decode tokens/s at batch 1 after a 64-token prompt, measured as
  (time of generate(N+1) - time of generate(1)) so prefill cancels, schemes alternating, best of
  ``--reps``; ratio vs fp32 from the same run; eager (the default decode path). ``--bench-shape``
  adds the issue's benchmark shape (hidden 256, 8 layers, random weights) for speed only.
* ``--compiled``: eager and torch.compile'd decode (llama4.infer.step; quantized layers take the
  fused dequantizing reductions of llama4/quant/fused.py where they measured faster) at batch 1
  and 8 (64-token prompts), with the bytes a step reads (weights touched + KV), the
  share of the roofline (those bytes at the measured read bandwidth), tokens equal to fp32's and
  compiled tokens equal to eager's. One thread count per process (``--threads``): inductor bakes
  it into the kernels.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import llama4
from llama4.quant.checkpoint import quantize_dir

sys.path.insert(0, str(Path(__file__).parent))  # bench_decode: shapes, bytes per step, bandwidth

PROMPT, GREEDY_PROMPT, GREEDY_NEW = 64, 24, 32


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
        flags = next((l for l in out.splitlines() if l.startswith("Flags")), "")
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
        return f"{name} ({', '.join(isa)}), {os.cpu_count()} cores"
    except (OSError, StopIteration):
        return platform.processor() or "unknown cpu"


def parse_scheme(s: str) -> tuple[str, int | None]:
    name, _, g = s.partition(":")
    return name, (int(g) if g else (32 if name == "int4" else None))


def label(scheme, g) -> str:
    return f"{scheme} g{g}" if g else scheme


def decode_tps(model, prompt, new: int, **kw) -> float:
    def timed(n):
        t = time.perf_counter()
        llama4.generate(model, prompt, max_new_tokens=n, **kw)
        return time.perf_counter() - t
    return new / max(timed(new + 1) - timed(1), 1e-9)


def val_docs(tok, per_lang: int):
    from llama4.data.corpus import MAIN_LANGUAGES, iter_corpus

    out = {}
    for lang in MAIN_LANGUAGES:
        docs = list(iter_corpus("val", langs=(lang,)))[:per_lang]
        out[lang] = [[tok.bos_id] + tok.encode(d.text) for d in docs]
    return out


@torch.inference_mode()
def top1_agreement(ref, model, seqs) -> float:
    same = total = 0
    for ids in seqs:
        x = torch.tensor([ids[:512]])
        a, b = ref(x).argmax(-1), model(x).argmax(-1)
        same += int((a == b).sum())
        total += a.numel()
    return same / total


def greedy_agreement(ref_out, model, prompts) -> tuple[float, float, int]:
    """(share of positions equal to fp32's, mean tokens before the first difference, prompts
    whose whole continuation is fp32's)."""
    same = total = prefix = whole = 0
    for p, r in zip(prompts, ref_out):
        o = llama4.generate(model, p, max_new_tokens=GREEDY_NEW)
        same += sum(int(x == y) for x, y in zip(o, r))
        total += len(r)
        n = next((i for i, (x, y) in enumerate(zip(o, r)) if x != y), len(r))
        prefix += n
        whole += int(n == len(r))
    return same / total, prefix / len(prompts), whole


def quality(src: Path, variants: dict, max_docs: int | None) -> None:
    from llama4.eval.ppl import corpus_bits_per_byte
    from llama4.infer.model_dir import load_tokenizer_for

    tok = load_tokenizer_for(src)
    ref = llama4.load(src)
    base = corpus_bits_per_byte(ref, tok, max_docs=max_docs, progress=False)["details"]
    docs = val_docs(tok, 2)
    seqs = [s for v in docs.values() for s in v]
    prompts = [v[0][:GREEDY_PROMPT] for v in docs.values()]
    ref_out = [llama4.generate(ref, p, max_new_tokens=GREEDY_NEW) for p in prompts]
    langs = list(base)
    print(f"\n## quality vs fp32 (validation text; {sum(d['tokens'] for d in base.values())} tokens, "
          f"{len(langs)} languages)\n")
    print(f"| scheme | Δ nats/token mean | Δ max (lang) | Δ min (lang) | top-1 agreement | greedy: same position "
          f"| greedy: tokens before 1st difference (of {GREEDY_NEW}) | greedy: identical prompts |")
    print("|---|---|---|---|---|---|---|---|")
    per_lang = {}
    for name, path in variants.items():
        m = llama4.load(path)
        det = corpus_bits_per_byte(m, tok, max_docs=max_docs, progress=False)["details"]
        d = {l: det[l]["nats_per_token"] - base[l]["nats_per_token"] for l in langs}
        toks = sum(base[l]["tokens"] for l in langs)
        mean = (sum(det[l]["nats"] for l in langs) - sum(base[l]["nats"] for l in langs)) / toks
        hi, lo = max(d, key=d.get), min(d, key=d.get)
        per_lang[name] = d
        share, before, whole = greedy_agreement(ref_out, m, prompts)
        print(f"| {name} | {mean:+.4f} | {d[hi]:+.4f} ({hi}) | {d[lo]:+.4f} ({lo}) | "
              f"{top1_agreement(ref, m, seqs):.3f} | {share:.3f} | {before:.1f} | {whole}/{len(prompts)} |", flush=True)
    print("\nper language, Δ nats/token (fp32 nats/token in the header):\n")
    print("| scheme | " + " | ".join(f"{l} ({base[l]['nats_per_token']:.3f})" for l in langs) + " |")
    print("|---|" + "---|" * len(langs))
    for name, d in per_lang.items():
        print(f"| {name} | " + " | ".join(f"{d[l]:+.4f}" for l in langs) + " |")


def step_bytes(model, batch: int, context: int, compiled: bool) -> int:
    """Bytes one decode step reads: bench_decode.decode_step_bytes's fp32 count (weights touched +
    KV), with each quantized module's fp32 weight replaced by what its path reads: the compact
    fused form (compiled, 1 row), a kernel's packed form, or the fp32 copy."""
    from bench_decode import decode_step_bytes

    from llama4.quant.layers import QuantExperts, QuantLinear

    a = model.args
    total = decode_step_bytes(a, context, batch)
    touched = 1 - (1 - a.top_k / a.n_experts) ** batch  # share of routed experts a step reads
    for m in model.modules():
        if isinstance(m, QuantLinear):
            if compiled and m.fused_rows >= batch:
                now = sum(getattr(m, f"f_{k}").nbytes for k in m._fused)
            elif m.path == "dequant":
                now = sum(t.nbytes for t in m.stored().values())
            else:
                now = sum(getattr(m, f"k_{k}").nbytes for k in m._kernel)
            total += now - 4 * m.in_features * m.out_features
        elif isinstance(m, QuantExperts):
            e, d, f = m.dims["w1"]
            if compiled and m.fused and batch == 1:
                now = sum(getattr(m, f"f_{w}_{p}").nbytes for w in m.NAMES for p in m._fused)
            elif m.path == "fp32" or (batch > 1 and "k_w1" in m._buffers):
                now = 3 * e * d * f * 4
            else:
                now = sum(t.nbytes for w in m.NAMES for t in m.stored(w).values())
            total += round((now - 3 * e * d * f * 4) * touched)
    return total


def speed_compiled(title: str, src: Path, variants: dict, new: int, reps: int, batches=(1, 8)) -> None:
    """Eager and compiled decode, batch 1 and 8, schemes alternating; bytes per step, roofline."""
    from bench_decode import read_bandwidth

    # every model here shares Transformer.forward's code object: one Dynamo cache entry per
    # (model, batch) pair, more than the default limit of 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    models = {"fp32": llama4.load(src)}
    for name, path in variants.items():
        models[name] = llama4.load(path)
    bw = read_bandwidth()
    V = models["fp32"].args.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V, (max(batches), PROMPT), generator=g).tolist()
    ctx = PROMPT + new // 2
    print(f"\n## decode, {title}: {PROMPT}-token prompt(s), {new} new tokens, best of {reps} (spread: "
          f"worst/best), schemes alternating; read bandwidth {bw:.1f} GB/s "
          f"({torch.get_num_threads()} thread(s)); load {os.getloadavg()}\n")
    print("| batch | mode | weights | tokens/s | spread | vs fp32 (same mode) | MB read / step | "
          "% of roofline | same tokens as fp32 | compiled == eager | paths (compiled: fused layers) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for B in batches:
        prompt = prompts[0] if B == 1 else prompts[:B]
        outs, res = {}, {}
        for mode in ("eager", "compiled"):
            comp = mode == "compiled"
            for n, m in models.items():  # warm up, compile, reference tokens
                outs[mode, n] = llama4.generate(m, prompt, max_new_tokens=new, compile=comp)
            runs = {n: [] for n in models}
            for _ in range(reps):
                for n, m in models.items():
                    runs[n].append(B * decode_tps(m, prompt, new, compile=comp))
            for n, m in models.items():
                best, worst = max(runs[n]), min(runs[n])
                res[mode, n] = best
                nb = step_bytes(m, B, ctx, comp) if n != "fp32" else None
                if nb is None:
                    from bench_decode import decode_step_bytes
                    nb = decode_step_bytes(m.args, ctx, B)
                roof = B * bw * 1e9 / nb
                paths = "" if n == "fp32" else ", ".join(f"{c} x {p}" for p, c in _path_counts(m, comp and B == 1).items())
                same = outs[mode, n] == outs[mode, "fp32"]
                ce = "" if mode == "eager" else ("yes" if outs["compiled", n] == outs["eager", n] else "no")
                print(f"| {B} | {mode} | {n} | {best:.1f} | {worst / best:.2f} | {best / res[mode, 'fp32']:.2f}x | "
                      f"{nb / 1e6:.1f} | {100 * best / roof:.0f}% | {'yes' if same else 'no'} | {ce} | {paths} |",
                      flush=True)
    print(f"\nload at the end {os.getloadavg()}")


def speed(title: str, src: Path, variants: dict, new: int, reps: int) -> None:
    models = {"fp32": llama4.load(src)}
    for name, path in variants.items():
        models[name] = llama4.load(path)
    prompt = torch.randint(0, models["fp32"].args.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist()
    ref = llama4.generate(models["fp32"], prompt, max_new_tokens=new)
    best = {n: 0.0 for n in models}
    for _ in range(reps):
        for n, m in models.items():
            best[n] = max(best[n], decode_tps(m, prompt, new))
    size = {n: sum(f.stat().st_size for f in Path(variants.get(n, src)).glob("*.safetensors")) for n in models}
    print(f"\n## decode speed, {title}: batch 1, {PROMPT}-token prompt, {new} new tokens, eager, best of {reps}\n")
    print("| weights | file MB | tokens/s | vs fp32 | same greedy tokens as fp32 | paths |")
    print("|---|---|---|---|---|---|")
    for n, m in models.items():
        same = llama4.generate(m, prompt, max_new_tokens=new) == ref
        paths = "fp32" if n == "fp32" else ", ".join(
            f"{c} x {p}" for p, c in _path_counts(m).items())
        print(f"| {n} | {size[n] / 1e6:.1f} | {best[n]:.1f} | {best[n] / best['fp32']:.2f}x | "
              f"{'yes' if same else 'no'} | {paths} |", flush=True)


def _path_counts(model, compiled: bool = False) -> dict:
    from collections import Counter

    from llama4.quant.layers import QuantExperts, QuantLinear

    def path(m):
        if compiled and (m.fused if isinstance(m, QuantExperts) else m.fused_rows):
            return "fused"
        return m.path
    return dict(Counter(path(m) for m in model.modules() if isinstance(m, (QuantLinear, QuantExperts))))


def bench_shape_dir(tmp: Path, width: int = 256) -> Path:
    """The benchmark shape, or with ``width`` the same shape scaled in width (heads of 32, experts
    2x and the dense FFN 4x the width, as at 256): at 1024 a step reads ~16x the bytes, out of any
    L3, where at 256 a 16-bit step fits this CPU class's 32 MB L3."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_decode import bench_args

    from llama4.model import Transformer

    torch.manual_seed(0)
    args = bench_args()
    if width != args.dim:
        args = args.replace(dim=width, n_heads=width // 32, n_kv_heads=max(1, width // 128), expert_dim=2 * width,
                            dense_dim=4 * width)
    m = Transformer(args)
    m.init_weights()
    return llama4.save(m, tmp / "bench_fp32")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/work/pt_runs/base_metap/final")
    p.add_argument("--schemes", nargs="+", default=["bf16", "fp16", "int8", "int4:32", "int4:64", "int4:128"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-docs", type=int, default=None, help="validation documents per language (default all)")
    p.add_argument("--no-quality", action="store_true")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--bench-shape", action="store_true", help="also time the issue's benchmark shape")
    p.add_argument("--bench-width", type=int, default=256, help="--bench-shape scaled to this hidden size")
    p.add_argument("--compiled", action="store_true",
                   help="speed: eager and compiled decode at batch 1 and 8, bytes per step, roofline")
    p.add_argument("--no-trained", action="store_true", help="speed: skip the trained model")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    print(f"# bench_quant: {cpu_name()}; load {os.getloadavg()}; torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; model {a.model}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = Path(a.model)
        variants = {}
        trained = not a.no_quality or not (a.no_speed or a.no_trained)
        for s in a.schemes if trained else ():  # the trained model only where something reads it
            scheme, g = parse_scheme(s)
            variants[label(scheme, g)] = quantize_dir(src, tmp / s.replace(":", "_"), scheme, g)
        if not a.no_quality:
            quality(src, variants, a.max_docs)
        run = speed_compiled if a.compiled else speed
        if not a.no_speed and not a.no_trained:
            run(f"trained model {src}", src, variants, a.new, a.reps)
        if a.bench_shape:
            bsrc = bench_shape_dir(tmp, a.bench_width)
            bvars = {}
            for s in a.schemes:
                scheme, g = parse_scheme(s)
                bvars[label(scheme, g)] = quantize_dir(bsrc, tmp / ("bench_" + s.replace(":", "_")), scheme, g)
            run(f"benchmark shape (hidden {a.bench_width}, 8 layers, random weights)", bsrc, bvars, a.new, a.reps)


if __name__ == "__main__":
    main()
