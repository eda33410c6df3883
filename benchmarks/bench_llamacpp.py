"""Ours against llama.cpp on the benchmark shape, same machine, same process, same run.

    .venv/bin/python benchmarks/bench_llamacpp.py [--threads 1 2] [--new 64] [--reps 2]
        [--pp 512 2048] [--no-compile] [--profile]

The benchmark shape (hidden 256, 8 layers, 8 experts top-1, MoE every 2nd layer, vocab 8192;
benchmarks/bench_decode.py's ``bench_args`` with the chunk at llama.cpp's hard-coded 8192, which
changes nothing at these lengths) with random weights is saved once; ours reads it as fp32 and as
``llama4 quantize``'s bf16 / int8 / int4 (g32) folders, llama.cpp (llama-cpp-python 0.3.36)
reads ``llama4 export gguf``'s f32 / f16 / q8_0 / q4_0 files (q4_0 "pure": every matrix
in q4_0, where llama-quantize's default mix would keep the head in q6_K).

* decode: greedy tokens/s at batch 1 after a 512-token prompt, ``--new`` tokens. Ours: the time
  of generate(N+1) minus generate(1) (bench_quant.decode_tps), eager and torch.compile'd;
  llama.cpp: its decode calls timed one token at a time, argmax over the last logits.
* prompt processing: tokens/s of a fresh 512- and 2048-token prompt (ours: generate with
  max_new_tokens=1, whose prefill is eager in both modes; llama.cpp: eval, n_batch 2048,
  n_ubatch 512). Best of ``--reps``, implementations alternating, at each thread count.
* tokens: our fp32 greedy tokens must equal llama.cpp f32's; the others' share equal to them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent / "tests"))
from bench_decode import bench_args  # noqa: E402
from bench_quant import cpu_name, decode_tps  # noqa: E402
from oracles import extra_buffers_crash, llama_cpp_model  # noqa: E402  (tests/: how llama.cpp is opened)

import llama4  # noqa: E402
from llama4.infer import step  # noqa: E402

PROMPT = 512
OURS = ("fp32", "bf16", "int8", "int4")  # int4: group 32
CPP = ("f32", "f16", "q8_0", "q4_0")


def load_avg() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def isa() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = next((l for l in out.splitlines() if l.startswith("Flags")), "").split()
    keep = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")
    return " ".join(f for f in keep if f in flags)


def build(tmp: Path):
    """-> (our models by weights, GGUF paths by type, tokenizer)."""
    from llama4.checkpoint.gguf import write_gguf
    from llama4.data.corpus import iter_corpus
    from llama4.model import Transformer
    from llama4.quant.checkpoint import quantize_dir
    from llama4.tokenizer import Tokenizer
    from llama4.tokenizer.bpe import train_bpe

    tok = Tokenizer.from_ranks(train_bpe([d.text for d in iter_corpus("train")][::5], 2048 + 1024))
    args = bench_args().replace(attention_chunk_size=8192)
    torch.manual_seed(0)
    m = Transformer(args)
    m.init_weights()
    src = llama4.save(m, tmp / "fp32", tokenizer=tok)
    ours = {"fp32": llama4.load(src).eval()}
    for scheme in OURS[1:]:
        ours[scheme] = llama4.load(quantize_dir(src, tmp / scheme, scheme, 32 if scheme == "int4" else None)).eval()
    ggufs = {}
    for t in CPP:
        r = write_gguf(ours["fp32"], tok, tmp / f"bench-{t}.gguf", t, name="bench")
        ggufs[t] = (r.path, r.bytes)
        for n in r.notes:
            print(f"  gguf {t}: {n}")
    return ours, ggufs, args


# --- llama.cpp ---------------------------------------------------------------------------------

def cpp_model(path: Path, threads: int, n_ctx: int):
    return llama_cpp_model(path, n_ctx=n_ctx, n_batch=2048, n_ubatch=512, n_threads=threads,
                           n_threads_batch=threads, logits_all=False, verbose=False)


def cpp_greedy(llm, prompt: list[int], n: int) -> tuple[list[int], float]:
    """-> (n greedy tokens after ``prompt``, seconds of the n decode calls)."""
    import llama_cpp

    def last():
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).argmax())

    llm.reset()
    llm.eval(prompt)
    out = [last()]
    t = time.perf_counter()
    for _ in range(n - 1):
        llm.eval(out[-1:])
        out.append(last())
    llm.eval(out[-1:])  # n decode calls in all, as ours decodes n tokens after the first
    return out, time.perf_counter() - t


def cpp_pp(llm, prompt: list[int]) -> float:
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    return len(prompt) / (time.perf_counter() - t)


# --- ours --------------------------------------------------------------------------------------

def ours_pp(model, prompt: list[int]) -> float:
    t = time.perf_counter()
    llama4.generate(model, prompt, max_new_tokens=1)
    return len(prompt) / (time.perf_counter() - t)


def profile_decode(model, prompt: list[int], new: int, compile: bool) -> str:
    from torch.profiler import ProfilerActivity, profile

    llama4.generate(model, prompt, max_new_tokens=2, compile=compile)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llama4.generate(model, prompt, max_new_tokens=new, compile=compile)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--pp", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--profile", action="store_true", help="also profile our fp32 decode (torch.profiler top ops)")
    a = p.parse_args()
    import llama_cpp

    torch.set_flush_denormal(True)
    print(f"# bench_llamacpp: {cpu_name()}; ISA: {isa()}")
    print(f"# torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; start: {load_avg()}")
    modes = ("eager",) if a.no_compile else ("eager", "compiled")
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 8192, (PROMPT,), generator=g).tolist()
    pps = {n: torch.randint(0, 8192, (n,), generator=g).tolist() for n in a.pp}
    with tempfile.TemporaryDirectory() as tmp:
        ours, ggufs, args = build(Path(tmp))
        crashed = [t for t, (path, _) in ggufs.items() if extra_buffers_crash(str(path))]
        if crashed:
            print(f"# llama.cpp crashed with its extra weight-buffer types (AMX / repacked kernels) on "
                  f"{', '.join(crashed)}: those files run without them here (tests/oracles.py)")
        n_ctx = max([PROMPT + a.new + 8, *a.pp]) + 8
        dec, pp, toks = {}, {}, {}
        for th in a.threads:
            torch.set_num_threads(th)
            # a compiled step's kernels are generated for one thread count (llama4.infer.step):
            # compile afresh at each count, as a process started with that count would
            step._compiled.clear()
            torch._dynamo.reset()
            cpp = {t: cpp_model(path, th, n_ctx) for t, (path, _) in ggufs.items()}
            for name, m in ours.items():  # warm-up and compile
                for mode in modes:
                    llama4.generate(m, prompt, max_new_tokens=2, compile=mode == "compiled")
            for _ in range(a.reps):
                for t, llm in cpp.items():
                    out, s = cpp_greedy(llm, prompt, a.new)
                    toks[("llama.cpp", t)] = out
                    key = ("llama.cpp", t, "", th)
                    dec[key] = max(dec.get(key, 0.0), a.new / s)
                    for n, pr in pps.items():
                        pp[key + (n,)] = max(pp.get(key + (n,), 0.0), cpp_pp(llm, pr))
                for name, m in ours.items():
                    for mode in modes:
                        key = ("ours", name, mode, th)
                        dec[key] = max(dec.get(key, 0.0), decode_tps(m, prompt, a.new, compile=mode == "compiled"))
                        toks[("ours", name, mode)] = llama4.generate(m, prompt, a.new, compile=mode == "compiled")
                    for n, pr in pps.items():
                        key = ("ours", name, "eager", th, n)
                        pp[key] = max(pp.get(key, 0.0), ours_pp(m, pr))
                print(f"  threads {th}: rep done, {load_avg()}", flush=True)
            del cpp

        ref = toks[("llama.cpp", "f32")]
        print(f"\ndecode: batch 1, {PROMPT}-token prompt then {a.new} greedy tokens; prompt processing: a fresh "
              f"prompt of {'/'.join(map(str, a.pp))} tokens; tokens/s, best of {a.reps}; "
              f"threads {'/'.join(map(str, a.threads))}\n")
        cols = [f"decode {th}T" for th in a.threads] + [f"pp{n} {th}T" for n in a.pp for th in a.threads]
        print("| implementation | weights | file MB | mode | " + " | ".join(cols) + " | tokens = llama.cpp f32 |")
        print("|---|---|---|---|" + "---|" * len(cols) + "---|")
        rows = [("llama.cpp", t, "") for t in CPP] + [("ours", n, mode) for n in OURS for mode in modes]
        for impl, w, mode in rows:
            if impl == "llama.cpp":
                mb = ggufs[w][1] / 1e6
                out = toks[(impl, w)]
            else:
                folder = Path(tmp) / w
                mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6
                out = toks[(impl, w, mode)]
            d = [f"{dec[(impl, w, mode, th)]:.0f}" for th in a.threads]
            pmode = "" if impl == "llama.cpp" else "eager"
            q = [f"{pp[(impl, w, pmode, th, n)]:.0f}" for n in a.pp for th in a.threads]
            same = sum(int(x == y) for x, y in zip(out, ref)) / len(ref)
            print(f"| {impl} | {w} | {mb:.1f} | {mode or '-'} | " + " | ".join(d + q) + f" | {same:.2f} |")
        print(f"\nour fp32 eager greedy tokens == llama.cpp f32's: {toks[('ours', 'fp32', 'eager')] == ref}")
        if a.profile:
            torch.set_num_threads(a.threads[0])
            for mode in modes:
                print(f"\n## our fp32 decode, {mode}, {a.threads[0]} thread(s): torch.profiler, top ops by self CPU time\n")
                print(profile_decode(ours["fp32"], prompt, a.new, mode == "compiled"))
    print(f"end: {load_avg()}")


if __name__ == "__main__":
    main()
