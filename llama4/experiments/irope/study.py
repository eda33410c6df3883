"""The whole study, resumable: ``run_study(out, spec, seeds)`` (``llama4 experiment irope``).

Phases, each skipped when its results are already in ``OUT`` (a killed study continues where it
stopped; a finished one only redraws its report):

1. ``shared/``: one BPE and the tokenized corpus for every variant.
2. ``runs/<variant>-s<seed>/``: the training runs (``training.py``), two processes at a time.
3. ``default/`` (unless ``--default-model``): the README's default model, trained by its recipe.
4. ``probes/<model>/``: ``llama4 eval longppl`` and ``llama4 eval needle`` on every model, tuning off.
5. ``temperature/``: tuning chosen on irope at ``select_k``·L over floor_scale ∈ {C, L} x attn_scale,
   then reported at ``report_ks``·L only; the identity check below floor_scale.
6. ``prefill_cost.json``: peak RSS and tokens/s of the chunked prefill at every evaluated length.
7. ``verdict.json``, ``summary.json``, ``report.md`` and the plots.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from llama4.eval.common import write_json, write_text
from llama4.experiments.irope import plots
from llama4.experiments.irope.probes import (apply_temperature, max_logit_change, passkey_accuracy, prefill_cost,
                                             probe)
from llama4.experiments.irope.spec import VARIANTS, StudySpec
from llama4.experiments.irope.training import prepare_shared, train_all
from llama4.experiments.irope.verdict import criteria

# Changing any of these changes what the runs compute: a study folder refuses a different value.
TRAINING_FIELDS = ("train_len", "chunk", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                   "dense_dim", "nope_interval", "tokenizer_doc_stride", "steps", "corpus_rows", "passkey_rows", "repeat_rows", "lr")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _check_folder(out: Path, spec: StudySpec) -> None:
    path = out / "study.json"
    if path.is_file():
        old = json.loads(path.read_text())["spec"]
        diff = [f for f in TRAINING_FIELDS if old.get(f) != getattr(spec, f)]
        if diff:
            raise ValueError(f"{out} holds a study trained with other settings ({', '.join(diff)}: "
                             f"{[old.get(f) for f in diff]}); choose another --out")
    write_json(path, {"spec": spec.to_dict()})


def _timing(out: Path, phase: str, seconds: float) -> None:
    path = out / "timing.json"
    t = json.loads(path.read_text()) if path.is_file() else {}
    t[phase] = round(t.get(phase, 0.0) + seconds, 1)
    write_json(path, t)


# --------------------------------------------------------------------------------------------
# probes, in worker processes

def _probe_job(job: dict) -> dict:
    import torch

    from llama4.infer.model_dir import load_model_dir

    torch.set_num_threads(job["threads"])
    model, tok, _ = load_model_dir(job["model"])
    apply_temperature(model, job["setting"])
    res = probe(model, tok, job["name"], Path(job["out"]), job["train_len"], job["multiples"],
                job["needle_multiples"], job["depths"], job["n_docs"], job["piece"])
    res.update(name=job["name"], train_len=job["train_len"], setting=job["setting"], model=str(job["model"]),
               probe=_what(job))
    write_json(Path(job["out"]) / "result.json", res)
    return res


def _what(job: dict) -> dict:
    """What a probe's result depends on (not how it was run: label, threads)."""
    return {k: v for k, v in job.items() if k not in ("label", "threads", "out")}


def _done(job: dict) -> bool:
    path = Path(job["out"]) / "result.json"
    return path.is_file() and json.loads(path.read_text()).get("probe") == _what(job)


def run_probes(jobs: list[dict], workers: int) -> list[dict]:
    """Each job's ``result.json``, computing only those missing or made with other settings."""
    todo = [j for j in jobs if not _done(j)]
    if todo:
        say(f"probing {len(todo)} model(s)/setting(s), {workers} at a time: " + ", ".join(j["label"] for j in todo))
        if workers <= 1:
            for j in todo:
                _probe_job(j)
        else:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                for j, _ in zip(todo, pool.map(_probe_job, todo)):
                    say(f"  probed {j['label']}")
    return [json.loads((Path(j["out"]) / "result.json").read_text()) for j in jobs]


def _job(spec: StudySpec, label: str, model: Path, out: Path, threads: int, train_len: int | None = None,
         multiples=None, needle_multiples=None, setting=None) -> dict:
    return {"label": label, "name": label, "model": str(model), "out": str(out), "threads": threads,
            "train_len": train_len or spec.train_len, "setting": setting, "depths": list(spec.depths),
            "multiples": list(spec.multiples if multiples is None else multiples),
            "needle_multiples": list(spec.needle_multiples if needle_multiples is None else needle_multiples),
            "n_docs": spec.n_docs, "piece": spec.piece}


# --------------------------------------------------------------------------------------------
# the default model (point 4 of the issue)

def default_model(out: Path, spec: StudySpec, given: Path | None, train_len: int | None, threads: int,
                  progress: bool) -> tuple[Path, int]:
    """(model folder, its training length): ``given``, or the default recipe trained into OUT/default."""
    from llama4.infer.model_dir import resolve_model_dir

    if given is None:
        run = out / "default"
        if not (run / "final" / "config.json").is_file():
            from llama4.recipes import get_recipe
            from llama4.train import train

            t0 = time.perf_counter()
            cfg = get_recipe(spec.default_recipe).replace(progress=progress, threads=threads)
            say(f"training the default model ({spec.default_recipe}) -> {run}")
            train(cfg, run, resume=(run / "checkpoints").is_dir())
            _timing(out, "default model training", time.perf_counter() - t0)
        given = run
    model = resolve_model_dir(given)
    if train_len is None:
        cfg = next((p / "train_config.json" for p in (model, model.parent) if (p / "train_config.json").is_file()),
                   None)
        if cfg is None:
            raise ValueError(f"--default-model {given}: no train_config.json beside it to read its training "
                             "length from; pass --default-train-len N")
        train_len = json.loads(cfg.read_text())["seq_len"]
    return model, int(train_len)


# --------------------------------------------------------------------------------------------
# temperature tuning: chosen on one length, reported on others

def temperature_study(out: Path, spec: StudySpec, seeds: list[int], base: dict, workers: int,
                      threads: int) -> dict:
    runs = out / "runs"
    grid = [{"floor_scale": f, "attn_scale": a} for f in spec.floor_scales for a in spec.attn_scales]
    k = spec.select_k

    def tag(st):
        return f"f{st['floor_scale']}_a{st['attn_scale']}"

    jobs = [_job(spec, f"irope-s{s} tuned {tag(st)} @{k}L", runs / f"irope-s{s}" / "final",
                 out / "temperature" / "select" / f"s{s}_{tag(st)}", threads, multiples=[k], needle_multiples=[k],
                 setting=st) for st in grid for s in seeds]
    results = run_probes(jobs, workers)
    rows = []
    for st in grid:
        mine = [r for r in results if r["setting"] == st]
        rows.append({"setting": st,
                     "delta": {f"seed {s}": r["longppl"]["delta"][str(k)] for s, r in zip(seeds, mine)},
                     "passkey": {f"seed {s}": passkey_accuracy(r["needle"]) for s, r in zip(seeds, mine)}})
    off = {"delta": {f"seed {s}": base[("irope", s)]["longppl"]["delta"][str(k)] for s in seeds},
           "passkey": {f"seed {s}": passkey_accuracy(base[("irope", s)]["needle"], [k * spec.train_len])
                       for s in seeds}}

    def mean(d):
        return sum(d.values()) / len(d)

    # The pre-registered rule: the highest mean passkey accuracy at select_k·L; ties: the lowest mean Δ.
    best = max(rows, key=lambda r: (round(mean(r["passkey"]), 9), -mean(r["delta"])))
    chosen = best["setting"]

    report_needle = [m for m in spec.needle_multiples if m >= min(spec.report_ks)]
    jobs = [_job(spec, f"irope-s{s} tuned {tag(chosen)} report", runs / f"irope-s{s}" / "final",
                 out / "temperature" / "report" / f"s{s}", threads, multiples=list(spec.report_ks),
                 needle_multiples=report_needle, setting=chosen) for s in seeds]
    tuned = dict(zip(seeds, run_probes(jobs, workers)))

    L = spec.train_len
    gains_d, gains_p, off_d, off_p = [], [], [], []
    for s in seeds:
        b, t = base[("irope", s)], tuned[s]
        d_off = sum(b["longppl"]["delta"][str(m)] for m in spec.report_ks) / len(spec.report_ks)
        d_on = sum(t["longppl"]["delta"][str(m)] for m in spec.report_ks) / len(spec.report_ks)
        off_d.append(d_off)
        gains_d.append(d_off - d_on)
        if report_needle:
            lens = [m * L for m in report_needle]
            p_off = passkey_accuracy(b["needle"], lens)
            off_p.append(p_off)
            gains_p.append(passkey_accuracy(t["needle"], lens) - p_off)
    spread_d = max(off_d) - min(off_d)
    gain_d = sum(gains_d) / len(gains_d)
    measured = {"Δ gain (off - tuned, mean of seeds and k)": round(gain_d, 4), "Δ seed spread (off)": round(spread_d, 4)}
    ok = gain_d > spread_d
    if report_needle:
        spread_p, gain_p = max(off_p) - min(off_p), sum(gains_p) / len(gains_p)
        measured.update({"passkey gain (tuned - off)": round(gain_p, 4), "passkey seed spread (off)": round(spread_p, 4)})
        ok = ok or gain_p > spread_p
    if not ok:
        measured["verdict"] = "no effect at this scale"

    # Identity below floor_scale: positions p < floor_scale - 1 get scale exactly 1.
    from llama4.infer.model_dir import load_model_dir

    model, tok, _ = load_model_dir(runs / f"irope-s{seeds[0]}" / "final")
    n = int(chosen["floor_scale"]) - 1
    identity = {"tokens": n, "setting": chosen, "max_abs_logit_change": max_logit_change(model, tok, chosen, n)}
    return {"grid": rows, "off_at_select": off, "select_k": k, "chosen": chosen, "report_ks": list(spec.report_ks),
            "report_needle_multiples": report_needle, "tuned": {str(s): tuned[s] for s in seeds},
            "effect": {"measured": measured, "pass": ok}, "identity": identity}


# --------------------------------------------------------------------------------------------

def run_study(out, spec: StudySpec, seeds: int = 2, given_default: Path | None = None,
              default_train_len: int | None = None, workers: int = 2, threads: int = 1,
              progress: bool = True) -> dict:
    out = Path(out)
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if given_default is not None and not Path(given_default).exists():
        raise FileNotFoundError(f"--default-model: {given_default} does not exist")
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _check_folder(out, spec)
    seed_list = list(range(seeds))

    t0 = time.perf_counter()
    shared = prepare_shared(out / "shared", spec, say)
    jobs = [(v, s) for s in seed_list for v in VARIANTS]
    summaries = train_all(out / "runs", shared, spec, jobs, workers, threads, say)
    _timing(out, "training (wall, this and earlier invocations)", time.perf_counter() - t0)

    dmodel, dlen = default_model(out, spec, given_default, default_train_len, max(threads, 1) * max(workers, 1),
                                 progress)

    t0 = time.perf_counter()
    pjobs = [_job(spec, f"{v}-s{s}", out / "runs" / f"{v}-s{s}" / "final", out / "probes" / f"{v}-s{s}", threads)
             for v, s in jobs]
    from llama4.eval.needle import shortest_prompt
    from llama4.infer.model_dir import load_tokenizer_for

    least = shortest_prompt(load_tokenizer_for(dmodel), "passkey", "completion")
    pjobs.append(_job(spec, "default", dmodel, out / "probes" / "default", threads, train_len=dlen,
                      needle_multiples=[m for m in spec.needle_multiples if m * dlen >= least]))
    results = run_probes(pjobs, workers)
    base = {(v, s): r for (v, s), r in zip(jobs, results)}
    default = results[-1]
    tuning = temperature_study(out, spec, seed_list, base, workers, threads)
    _timing(out, "probes (wall)", time.perf_counter() - t0)

    t0 = time.perf_counter()
    cost_path = out / "prefill_cost.json"
    cost = json.loads(cost_path.read_text()) if cost_path.is_file() else {}
    for name, model, L in [(f"{v}-s0", out / "runs" / f"{v}-s0" / "final", spec.train_len) for v in spec.cost_variants] + \
                          [("default", dmodel, dlen)]:
        if name not in cost:
            cost[name] = {"train_len": L, "rows": prefill_cost(model, [m * L for m in spec.multiples], spec.piece)}
            write_json(cost_path, cost)
    _timing(out, "prefill cost (wall)", time.perf_counter() - t0)

    rows = criteria(spec, seed_list, base, tuning, default)
    write_json(out / "verdict.json", rows)
    figures = [plots.plot_loss_curves(base, VARIANTS, seed_list, spec.train_len, out / "loss_by_position.png"),
               plots.plot_delta(base, VARIANTS, seed_list, out / "delta.png", tuned=tuning["tuned"]),
               plots.plot_passkey(base, VARIANTS, seed_list, spec.train_len, out / "passkey.png")]
    timing = json.loads((out / "timing.json").read_text())
    summary = {"spec": spec.to_dict(), "seeds": seed_list, "training": {f"{v}-s{s}": summaries[(v, s)] for v, s in jobs},
               "tables": tables(spec, seed_list, base, default), "temperature": tuning, "prefill_cost": cost,
               "verdict": rows, "default_model": {"model": str(dmodel), "train_len": dlen}, "timing_s": timing,
               "this_invocation_s": round(time.perf_counter() - t_start, 1), "figures": [str(f) for f in figures]}
    write_json(out / "summary.json", summary)
    write_text(out / "report.md", report(summary))
    return summary


def tables(spec: StudySpec, seeds, base: dict, default: dict) -> dict:
    """Mean [min, max] over seeds of Δ(k), last-window loss and passkey accuracy per length."""
    L = spec.train_len

    def stat(vals):
        return {"mean": round(sum(vals) / len(vals), 4), "min": round(min(vals), 4), "max": round(max(vals), 4)}

    out = {}
    for v in VARIANTS:
        rs = [base[(v, s)] for s in seeds]
        out[v] = {"delta": {str(k): stat([r["longppl"]["delta"][str(k)] for r in rs]) for k in spec.multiples},
                  "loss_full": {str(k): stat([r["longppl"]["loss_full"][str(k)] for r in rs]) for k in spec.multiples},
                  "passkey": {str(k): stat([passkey_accuracy(r["needle"], [k * L]) for r in rs])
                              for k in spec.needle_multiples}}
    out["default"] = {"delta": {str(k): default["longppl"]["delta"][str(k)] for k in spec.multiples},
                      "loss_full": {str(k): default["longppl"]["loss_full"][str(k)] for k in spec.multiples},
                      "passkey": {str(n // default["train_len"]): passkey_accuracy(default["needle"], [n])
                                  for n in (default.get("needle") or {}).get("lengths", [])}}
    return out


def _fmt(x: dict | float) -> str:
    if isinstance(x, dict):
        return f"{x['mean']:+.3f} [{x['min']:+.3f}, {x['max']:+.3f}]"
    return f"{x:+.3f}"


def report(summary: dict) -> str:
    spec, t = summary["spec"], summary["tables"]
    L = spec["train_len"]
    lines = [f"# iRoPE study ({spec['name']}): L = {L}, C = {spec['chunk']}, {spec['n_layers']} layers x {spec['dim']}, "
             f"{spec['steps']} steps, seeds {summary['seeds']}", ""]
    lines += ["## Verdict", "", "| criterion | threshold | measured | pass |", "|---|---|---|---|"]
    for r in summary["verdict"]:
        m = ", ".join(f"{k}: {v}" for k, v in r["measured"].items())
        lines.append(f"| {r['criterion']} | {r['threshold']} | {m} | {'pass' if r['pass'] else '**fail**'} |")
    ks = spec["multiples"]
    lines += ["", "## Δ(k) in nats: mean [min, max] over seeds", "",
              "| variant | " + " | ".join(f"{k}L" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for v, row in t.items():
        lines.append(f"| {v} | " + " | ".join(_fmt(row["delta"][str(k)]) for k in ks) + " |")
    nks = spec["needle_multiples"]
    lines += ["", "## Passkey exact match by prompt length (both fillers, all depths)", "",
              "| variant | " + " | ".join(f"{k}L" for k in nks) + " |", "|---" * (len(nks) + 1) + "|"]
    for v, row in t.items():
        cells = [row["passkey"].get(str(k)) for k in nks]
        lines.append(f"| {v} | " + " | ".join("" if c is None else (f"{c['mean']:.2f}" if isinstance(c, dict)
                                                                    else f"{c:.2f}") for c in cells) + " |")
    tu = summary["temperature"]
    lines += ["", f"## Temperature tuning, chosen at {tu['select_k']}L: {tu['chosen']}", "",
              "| setting | Δ per seed | passkey per seed |", "|---|---|---|",
              f"| off | {tu['off_at_select']['delta']} | {tu['off_at_select']['passkey']} |"]
    for r in tu["grid"]:
        lines.append(f"| {r['setting']} | {r['delta']} | {r['passkey']} |")
    lines += ["", "## Chunked prefill at length (1 thread, fresh process per model)", "",
              "| model | tokens | s | tokens/s | peak RSS MiB | KV cache MiB |", "|---|---|---|---|---|---|"]
    for name, c in summary["prefill_cost"].items():
        for r in c["rows"]:
            lines.append(f"| {name} | {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} | {r['peak_rss_mib']} | "
                         f"{r['kv_cache_mib']} |")
    lines += ["", f"Wall time (s): {summary['timing_s']}", ""]
    return "\n".join(lines)
