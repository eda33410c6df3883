"""``llama4 posttrain``: Llama 4's post-training recipe end to end, measured after every stage.

    from llama4.posttrain.pipeline import posttrain
    posttrain("default", "runs/default", "runs/assistant")

Meta's published recipe (April 2025), at our scale:

1. **SFT on pruned data.** ``sft_candidates`` train examples per task (reference answer as the
   assistant turn). Meta dropped more than half the SFT data as "easy", judged by a Llama model;
   we judge by the *base model's own loss*: each example's mean cross-entropy on its assistant
   tokens under the base, and per task the ``prune`` fraction with the lowest loss goes (per task,
   so no task vanishes). The kept conversations are ``OUT/sft_data.jsonl``; the scores and the
   cut are in ``OUT/sft_pruning.json``. Then ``llama4 sft`` into ``OUT/sft``.
2. **Online RL with verifiable rewards** (``llama4 rl`` into ``OUT/rl``) on the tasks the SFT
   model solves sometimes but not always: its greedy pass rate on ``rl_probe`` *validation*
   examples inside ``rl_band`` (never the test prompts the stages are scored on); the prompt pool
   then keeps only medium-to-hard prompts as training goes. No task in the band: the stage is
   skipped and says so.
3. **Lightweight DPO** (``llama4 dpo`` into ``OUT/dpo``): ``dpo_prompts`` fresh train prompts per
   task are answered once by the RL policy (sampled); every wrong answer (score < 0.5), unsafe
   answer (a harmful request not refused) or over-refusal (a harmless request refused) becomes a
   pair, the verified reference answer chosen and the policy's own answer rejected, in TRL's
   conversational preference format (``OUT/dpo_pairs.jsonl``), plus any pairs given with
   ``pairs`` (the arena's export). The reference is the RL policy, frozen.

After the base and every stage the same measurement (:func:`measure`): greedy replies to
``eval_n`` *test* examples per task, scored by the tasks' verifiers (per task and language); the
refusal rate on harmful requests and on their harmless look-alikes; and the validation loss
(nats/token) on the pretraining corpus's held-out text, which shows forgetting. All of it goes to
``OUT/summary.json`` (``{"stages": {"base": {...}, "sft": ..., "rl": ..., "dpo": ...}}``) and
``OUT/stages.png``; ``OUT/final`` is the last stage's model, ready for ``llama4 chat --model OUT``
and ``llama4 serve --model OUT``. ``resume`` skips every stage and measurement already done.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llama4.posttrain.chat_data import IGNORE_INDEX, build_examples, pad_batch, pad_id_of, task_conversations
from llama4.posttrain.recipes import SAFETY_TASKS, PosttrainRecipe, get_recipe
from llama4.tokenizer.files import atomic_write_bytes

STAGES = ("base", "sft", "rl", "dpo")
WRONG_BELOW = 0.5  # a DPO "rejected" answer scores below this (exact match 0, refusal/answer 0, chrF < 0.5)
SEED_SFT, SEED_DPO = 0, 1  # two draws of the train split: DPO prompts are not the SFT examples


def _say(msg: str) -> None:
    print(f"posttrain: {msg}", file=sys.stderr, flush=True)


def _write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode())


def _write_jsonl(path: Path, rows) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


# --------------------------------------------------------------------------------------------
# measuring a stage

def measure(model_dir, recipe: PosttrainRecipe, progress: bool = False) -> tuple[dict, list[dict]]:
    """The stage record of ``summary.json`` for the model in ``model_dir`` and the replies behind it:
    ``{"tasks": {TASK: score}, "tasks_by_lang": {...}, "refusal_harmful", "refusal_harmless",
    "refusal_by_lang": {...}, "val_loss", "val_bits_per_byte"}``."""
    from llama4.eval.ppl import corpus_bits_per_byte
    from llama4.eval.suites import EngineResponder, resolve_suite, run_tasks
    from llama4.infer.model_dir import load_model_dir

    model, tok, _ = load_model_dir(model_dir, dtype=torch.float32)
    tasks = [t for name in recipe.tasks for t in resolve_suite(name)]
    respond = EngineResponder(model, tok, max_tokens=recipe.eval_max_tokens, temperature=0.0)
    with torch.inference_mode():
        results, records = run_tasks(tasks, respond, split="test", n=recipe.eval_n, batch_size=64,
                                     progress=progress)
        ppl = corpus_bits_per_byte(model, tok, max_docs=recipe.val_docs, window=recipe.val_window, progress=False)
    nats = sum(d["nats"] for d in ppl["details"].values())
    n_tok = sum(d["tokens"] for d in ppl["details"].values())
    rec = {"tasks": {n: r["score"] for n, r in results.items() if n not in SAFETY_TASKS},
           "tasks_by_lang": {n: r["by_lang"] for n, r in results.items() if n not in SAFETY_TASKS},
           "refusal_harmful": None, "refusal_harmless": None, "refusal_by_lang": {},
           "val_loss": nats / n_tok, "val_bits_per_byte": ppl["score"]}
    if "safety_harmful" in results:  # score = 1 when refused
        r = results["safety_harmful"]
        rec["refusal_harmful"] = r["score"]
        rec["refusal_by_lang"]["harmful"] = r["by_lang"]
    if "safety_harmless" in results:  # score = 1 when answered: the over-refusal rate is the rest
        r = results["safety_harmless"]
        rec["refusal_harmless"] = 1.0 - r["score"]
        rec["refusal_by_lang"]["harmless"] = {k: 1.0 - v for k, v in r["by_lang"].items()}
    return rec, records


def _measured(out: Path, stage: str, model_dir, recipe: PosttrainRecipe, resume: bool, progress: bool) -> dict:
    path = out / "eval" / f"{stage}.json"
    if resume and path.is_file():
        return json.loads(path.read_text())["summary"]
    t0 = time.perf_counter()
    rec, records = measure(model_dir, recipe, progress)
    rec["seconds"] = round(time.perf_counter() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "eval" / f"{stage}_samples.jsonl", records)
    _write_json(path, {"model": str(model_dir), "summary": rec})
    _say(f"{stage}: " + _line(rec))
    return rec


def _line(rec: dict) -> str:
    tasks = " ".join(f"{k} {v:.2f}" for k, v in rec["tasks"].items())
    safety = ""
    if rec["refusal_harmful"] is not None:
        safety = f"; refuses harmful {rec['refusal_harmful']:.2f}, harmless {rec['refusal_harmless']:.2f}"
    return f"{tasks}{safety}; val loss {rec['val_loss']:.3f}"


# --------------------------------------------------------------------------------------------
# SFT data: drop the easy half

def assistant_losses(model, examples, pad_id: int, batch_size: int = 16) -> list[float]:
    """Each labelled example's mean cross-entropy over its assistant tokens under ``model``."""
    out = []
    model.eval()
    with torch.inference_mode():
        for lo in range(0, len(examples), batch_size):
            b = pad_batch(examples[lo:lo + batch_size], pad_id)
            logits = model(b.inputs).float()
            nll = F.cross_entropy(logits.flatten(0, 1), b.labels.flatten(), ignore_index=IGNORE_INDEX,
                                  reduction="none").view(b.labels.shape)
            n = (b.labels != IGNORE_INDEX).sum(1).clamp(min=1)
            out += (nll.sum(1) / n).tolist()
    return out


def pruned_sft_data(base, recipe: PosttrainRecipe, out: Path) -> Path:
    """Write ``OUT/sft_data.jsonl`` (the kept conversations) and ``OUT/sft_pruning.json``;
    ``base``: the :class:`~llama4.posttrain.stage.BaseModel` the pipeline starts from."""
    convs = task_conversations(recipe.tasks, recipe.sft_candidates, seed=SEED_SFT)
    examples = build_examples(base.tokenizer, convs, recipe.sft["seq_len"])
    losses = assistant_losses(base.model, examples, pad_id_of(base.tokenizer))
    keep, report = [], {}
    per_task = recipe.sft_candidates
    for t, name in enumerate(recipe.tasks):
        idx = list(range(t * per_task, (t + 1) * per_task))
        n_drop = math.ceil(recipe.prune * len(idx))
        ranked = sorted(idx, key=lambda i: losses[i])  # easiest (lowest loss under the base) first
        kept = sorted(ranked[n_drop:])
        keep += kept
        report[name] = {"candidates": len(idx), "dropped": n_drop, "kept": len(kept),
                        "loss_cut": losses[ranked[n_drop - 1]] if n_drop else None,
                        "mean_loss_dropped": sum(losses[i] for i in ranked[:n_drop]) / max(n_drop, 1),
                        "mean_loss_kept": sum(losses[i] for i in kept) / max(len(kept), 1)}
    path = out / "sft_data.jsonl"
    _write_jsonl(path, [{"messages": list(convs[i].messages)} for i in keep])
    _write_json(out / "sft_pruning.json", {
        "judged_by": "the base model's mean loss on the reference answer (assistant tokens), per task",
        "fraction_dropped": 1 - len(keep) / len(convs), "tasks": report})
    _say(f"sft data: kept {len(keep)} of {len(convs)} examples ({1 - len(keep) / len(convs):.0%} dropped as easy: "
         "lowest loss under the base)")
    return path


# --------------------------------------------------------------------------------------------
# RL task choice, DPO pairs

def rl_task_choice(model_dir, recipe: PosttrainRecipe) -> tuple[list[str], dict]:
    """The tasks RL trains on, and the validation pass rates that chose them."""
    from llama4.eval.suites import EngineResponder, run_tasks
    from llama4.infer.model_dir import load_model_dir
    from llama4.tasks import get_task

    if recipe.rl_tasks is not None:
        return list(recipe.rl_tasks), {}
    names = [n for n in recipe.tasks if n not in SAFETY_TASKS]
    model, tok, _ = load_model_dir(model_dir, dtype=torch.float32)
    respond = EngineResponder(model, tok, max_tokens=recipe.eval_max_tokens, temperature=0.0)
    with torch.inference_mode():
        results, _ = run_tasks([get_task(n) for n in names], respond, split="validation", n=recipe.rl_probe,
                               batch_size=64, progress=False)
    rates = {n: r["score"] for n, r in results.items()}
    lo, hi = recipe.rl_band
    return [n for n in names if lo <= rates[n] <= hi], rates


def dpo_pairs(policy_dir, recipe: PosttrainRecipe, extra_pairs, out: Path) -> tuple[Path, dict]:
    """Write ``OUT/dpo_pairs.jsonl``: the policy's wrong/unsafe samples against the references, then
    the pairs of ``extra_pairs`` unchanged. Returns the path and the counts per task."""
    from llama4.eval.suites import EngineResponder
    from llama4.infer.model_dir import load_model_dir
    from llama4.tasks import get_task

    model, tok, _ = load_model_dir(policy_dir, dtype=torch.float32)
    respond = EngineResponder(model, tok, max_tokens=recipe.eval_max_tokens, temperature=recipe.dpo_temperature,
                              seed=SEED_DPO)
    rows, counts = [], {}
    with torch.inference_mode():
        for name in recipe.tasks:
            task = get_task(name)
            exs = task.examples("train", recipe.dpo_prompts, seed=SEED_DPO)
            replies = []
            for lo in range(0, len(exs), 64):
                replies += respond([list(e.messages) for e in exs[lo:lo + 64]])
            n = 0
            for ex, reply in zip(exs, replies):
                if task.score(ex, reply) < WRONG_BELOW and reply.strip() != ex.answer.strip():
                    rows.append({"prompt": list(ex.messages), "chosen": [{"role": "assistant", "content": ex.answer}],
                                 "rejected": [{"role": "assistant", "content": reply}]})
                    n += 1
            counts[name] = n
    if extra_pairs is not None:
        lines = [ln for ln in Path(extra_pairs).read_text(encoding="utf-8").splitlines() if ln.strip()]
        rows += [json.loads(ln) for ln in lines]
        counts["given"] = len(lines)
    path = out / "dpo_pairs.jsonl"
    _write_jsonl(path, rows)
    _say(f"dpo pairs: {len(rows)} (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")")
    return path, counts


# --------------------------------------------------------------------------------------------
# the pipeline

def _stage_done(d: Path) -> bool:
    return (d / "summary.json").is_file() and (d / "final" / "config.json").is_file()


def _copy_final(src: Path, out: Path) -> Path:
    """``OUT/final`` = the last stage's model, swapped in whole (a reader never sees half of it)."""
    dst, tmp = out / "final", out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = out / ".final.old"
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def _check_inputs(recipe: PosttrainRecipe, base, out: Path, pairs, resume: bool):
    """Everything that can be refused is refused before anything is written. Returns the base model."""
    from llama4.posttrain.dpo import load_pairs_jsonl
    from llama4.posttrain.stage import open_base
    from llama4.tasks import get_task

    for n in recipe.tasks + tuple(recipe.rl_tasks or ()):
        get_task(n)
    b = open_base(base)
    if recipe.sft["seq_len"] > b.args.max_seq_len:
        raise ValueError(f"recipe {recipe.name}: SFT seq_len {recipe.sft['seq_len']} exceeds the base's "
                         f"max_seq_len {b.args.max_seq_len}")
    if pairs is not None:
        load_pairs_jsonl(pairs)  # names the line and field of a bad pair
    if out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(f"{out} is not empty; pass --resume to continue that pipeline, or choose another --out")
    return b


def posttrain(recipe, base, out, pairs=None, resume: bool = False, threads: int | None = None,
              progress: bool = True) -> dict:
    """Run the recipe's stages from the model in ``base`` into ``out``; returns ``summary.json``'s content."""
    from llama4.posttrain.dpo import dpo
    from llama4.posttrain.rl import rl
    from llama4.posttrain.sft import sft

    started = time.perf_counter()
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    out = Path(out)
    base_model = _check_inputs(recipe, base, out, pairs, resume)
    if threads is not None:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {"progress": progress, "threads": torch.get_num_threads()}
    stages, notes, seconds = {}, {}, {}

    def timed(stage, fn):
        t0 = time.perf_counter()
        r = fn()
        seconds[stage] = seconds.get(stage, 0.0) + round(time.perf_counter() - t0, 1)
        return r

    base_dir = Path(base)
    sft_dir = out / "sft"
    sft_done = _stage_done(sft_dir)
    if not sft_done:  # first: it also checks that every example fits the recipe's seq_len
        data = timed("sft", lambda: pruned_sft_data(base_model, recipe, out))
    stages["base"] = timed("base", lambda: _measured(out, "base", base_dir, recipe, resume, progress))

    if not sft_done:
        kw = dict(recipe.sft)
        timed("sft", lambda: sft(base_dir, sft_dir, data=str(data), resume=resume and sft_dir.exists(),
                                 overrides=overrides, **kw))
    notes["sft"] = json.loads((out / "sft_pruning.json").read_text())
    stages["sft"] = timed("sft", lambda: _measured(out, "sft", sft_dir, recipe, resume, progress))
    last = sft_dir

    rl_dir = out / "rl"
    choice_path = out / "rl_tasks.json"
    if resume and choice_path.is_file():
        choice = json.loads(choice_path.read_text())
    else:
        names, rates = timed("rl", lambda: rl_task_choice(sft_dir, recipe))
        choice = {"tasks": names, "sft_validation_pass_rate": rates, "band": list(recipe.rl_band)}
        _write_json(choice_path, choice)
    if choice["tasks"]:
        if not _stage_done(rl_dir):
            _say(f"rl on {', '.join(choice['tasks'])} (SFT validation pass rate in {recipe.rl_band})")
            kw = dict(recipe.rl)
            timed("rl", lambda: rl(sft_dir, rl_dir, choice["tasks"], resume=resume and rl_dir.exists(),
                                   overrides=overrides, **kw))
        stages["rl"] = timed("rl", lambda: _measured(out, "rl", rl_dir, recipe, resume, progress))
        last = rl_dir
    else:
        choice["skipped"] = (f"no task's SFT validation pass rate lies in {recipe.rl_band}: "
                             + ", ".join(f"{k} {v:.2f}" for k, v in choice["sft_validation_pass_rate"].items()))
        _say(f"rl skipped: {choice['skipped']}")
        stages["rl"] = dict(stages["sft"], skipped=True)
    notes["rl"] = choice

    dpo_dir = out / "dpo"
    counts_path = out / "dpo_pairs.json"
    if not _stage_done(dpo_dir):
        path, counts = timed("dpo", lambda: dpo_pairs(last, recipe, pairs, out))
        _write_json(counts_path, counts)
        if sum(counts.values()):
            kw = dict(recipe.dpo)
            timed("dpo", lambda: dpo(last, str(path), dpo_dir, resume=resume and dpo_dir.exists(),
                                     overrides=overrides, **kw))
    counts = json.loads(counts_path.read_text())
    if _stage_done(dpo_dir):
        stages["dpo"] = timed("dpo", lambda: _measured(out, "dpo", dpo_dir, recipe, resume, progress))
        last = dpo_dir
    else:
        _say("dpo skipped: the policy gave no wrong or unsafe answer to make a pair of, and no --pairs")
        stages["dpo"] = dict(stages["rl"], skipped=True)
    notes["dpo"] = {"pairs": counts}

    final = _copy_final(last / "final", out)
    summary = {"recipe": recipe.name, "base": str(base_dir.resolve()), "final": str(final), "stages": stages,
               "notes": notes, "seconds": {**seconds, "total": round(time.perf_counter() - started, 1)},
               "threads": torch.get_num_threads()}
    summary["plot"] = str(plot_stages(summary, out / "stages.png"))
    _write_json(out / "summary.json", summary)
    print(stage_table(summary))
    print(side_by_side(out, recipe))
    _say(f"done in {summary['seconds']['total']:.0f} s; the assistant is in {final} "
         f"(llama4 chat --model {out})")
    return summary


# --------------------------------------------------------------------------------------------
# reporting

def stage_table(summary: dict) -> str:
    """The per-stage table (markdown) printed at the end and shown in the README."""
    stages = summary["stages"]
    names = list(next(iter(stages.values()))["tasks"])
    head = "| stage | " + " | ".join(names) + " | refuses harmful | refuses harmless | val loss |"
    lines = [head, "|---" * (len(names) + 4) + "|"]
    for st, rec in stages.items():
        cells = [f"{rec['tasks'][n]:.2f}" for n in names]
        fmt = (lambda v: "-" if v is None else f"{v:.2f}")
        tag = f"{st} (skipped)" if rec.get("skipped") else st
        lines.append(f"| {tag} | " + " | ".join(cells) + f" | {fmt(rec['refusal_harmful'])} | "
                     f"{fmt(rec['refusal_harmless'])} | {rec['val_loss']:.3f} |")
    return "\n".join(lines)


def side_by_side(out: Path, recipe: PosttrainRecipe) -> str:
    """A few held-out test prompts (one per task, in turn) with the base's and the final answers."""
    def load(stage):
        p = out / "eval" / f"{stage}_samples.jsonl"
        return [json.loads(ln) for ln in p.read_text(encoding="utf-8").splitlines()] if p.is_file() else []

    base = load("base")
    final_stage = next((s for s in reversed(STAGES) if (out / "eval" / f"{s}_samples.jsonl").is_file()), "base")
    final = load(final_stage)
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(base):
        by_task.setdefault(r["task"], []).append(i)
    picks, k = [], 0
    while len(picks) < recipe.show and any(len(v) > k for v in by_task.values()):
        picks += [v[k] for v in by_task.values() if len(v) > k][:recipe.show - len(picks)]
        k += 1
    lines = [f"Held-out prompts: base vs {final_stage} (greedy)"]
    for i in picks:
        b, f = base[i], final[i]
        lines += ["", f"[{b['task']}{' ' + b['lang'] if b['lang'] else ''}] {str(b['prompt']).strip()[:200]}",
                  f"  base : {b['response'].strip()[:160]!r}", f"  {final_stage:<5}: {f['response'].strip()[:160]!r}"
                  f"   (reference {b['answer'][:60]!r}, score {f['score']:.2f})"]
    return "\n".join(lines)


def plot_stages(summary: dict, path: Path) -> Path:
    from llama4.eval.common import pyplot, save_figure

    plt = pyplot()
    stages = summary["stages"]
    names = list(stages)
    tasks = list(stages["base"]["tasks"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    w = 0.8 / len(names)
    for i, st in enumerate(names):
        ax1.bar([j + i * w for j in range(len(tasks))], [stages[st]["tasks"][t] for t in tasks], w, label=st)
    ax1.set_xticks([j + 0.4 - w / 2 for j in range(len(tasks))], tasks, rotation=30, ha="right")
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("held-out test score (greedy)")
    ax1.legend()
    x = range(len(names))
    for key, label in (("refusal_harmful", "refuses harmful"), ("refusal_harmless", "refuses harmless")):
        if stages["base"][key] is not None:
            ax2.plot(x, [stages[s][key] for s in names], marker="o", label=label)
    ax2.set_ylim(0, 1)
    ax2.set_xticks(list(x), names)
    ax3 = ax2.twinx()
    ax3.plot(x, [stages[s]["val_loss"] for s in names], "k--", marker="s", label="val loss (right)")
    ax3.set_ylabel("validation loss, nats/token")
    h1, l1 = ax2.get_legend_handles_labels()
    h3, l3 = ax3.get_legend_handles_labels()
    ax2.legend(h1 + h3, l1 + l3, fontsize=8, loc="center left")
    fig.suptitle(f"llama4 posttrain --recipe {summary['recipe']}: every stage on held-out prompts")
    return save_figure(fig, path)


__all__ = ["posttrain", "measure", "assistant_losses", "pruned_sft_data", "rl_task_choice", "dpo_pairs",
           "stage_table", "side_by_side", "plot_stages", "STAGES"]
