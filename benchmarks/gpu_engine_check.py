"""The compiled engine on an accelerator: requests joining and leaving (power-of-two row
prefixes, guard-light calls) give the eager tokens; then tokens/s for 1 and 8 requests.

    python benchmarks/gpu_engine_check.py [--device cuda]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from llama4.infer.engine import Engine, EngineConfig
from llama4.model import Transformer

from bench_decode import bench_args  # benchmarks/ is on sys.path when run as a script


def run(eng: Engine, prompts: list[list[int]], n: list[int]) -> list[list[int]]:
    reqs = [eng.submit(p, k) for p, k in zip(prompts, n)]
    while not all(r.finished for r in reqs):
        eng.step()
    return [r.output for r in reqs]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(p.parse_args().device)
    torch.manual_seed(0)
    model = Transformer(bench_args())
    model.init_weights()
    model = model.to(dev).eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(8192) for _ in range(rng.randint(5, 300))] for _ in range(10)]
    lens = [8 + 7 * i % 40 for i in range(10)]
    eager = run(Engine(model, EngineConfig(max_batch=4)), prompts, lens)
    compiled_eng = Engine(model, EngineConfig(max_batch=4, compile=True))
    t = time.perf_counter()
    compiled = run(compiled_eng, prompts, lens)
    print(f"{dev}: 10 requests through 4 rows, compiled tokens == eager: {compiled == eager} "
          f"(first pass, compiles included, {time.perf_counter() - t:.0f} s)")
    for k in (1, 4):
        for name, eng in (("eager", Engine(model, EngineConfig(max_batch=4))), ("compiled", compiled_eng)):
            run(eng, prompts[:k], [4] * k)
            t = time.perf_counter()
            run(eng, prompts[:k], [1] * k)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            run(eng, prompts[:k], [65] * k)
            tn = time.perf_counter() - t
            print(f"  {k} request(s), {name}: {k * 64 / (tn - t1):.0f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
