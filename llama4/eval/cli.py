"""``llama4 eval``: argument parsing, then a call into the evaluation room.

    llama4 eval --model DIR --suite tasks|safety|ppl|TASK [--out DIR] [--limit N] ...
    llama4 eval --model DIR --lm-eval-tasks T1,T2 [--include-path P]
    llama4 eval needle  --model DIR --lengths 1k,4k,16k --depths 0,25,50,75,100 [--filler random|corpus|both]
    llama4 eval longppl --model DIR --train-len L --multiples 1,2,4,8 [--n-docs N]

Outputs go to ``--out`` (default ``DIR/eval/<suite>``, ``DIR/eval/needle``, ``DIR/eval/longppl``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

_EPILOG = """\
suites:
  tasks     every verifiable task of llama4.tasks (generated answers, scored by each task's verifier)
  safety    the safety tasks (refuse harmful requests, answer harmless look-alikes)
  ppl       bits per byte per language on the corpus's held-out text
  TASK      any single task name (see `llama4 tasks list`)

output: OUT/results.json = {"model", "suite", "tasks": {TASK: {"metric", "score", "n", "by_lang"}}, "config", ...}
        plus OUT/results.md (a Markdown table) and OUT/samples.jsonl (every prompt, reply, score);
        OUT defaults to MODEL/eval/SUITE (MODEL/eval/lm-eval for --lm-eval-tasks).

long-context probes (options after the subcommand):
  llama4 eval needle --model DIR --lengths 1k,4k,16k --depths 0,25,50,75,100 [--filler random|corpus|both]
  llama4 eval longppl --model DIR --train-len 256 --multiples 1,2,4,8,16 [--n-docs 8]
"""


def _model_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--model", required=required, help="model directory (HF layout + tokenizer.model), or a "
                   "training run's directory (RUN/final is used)")
    p.add_argument("--out", default=None, help="output directory (default: MODEL/eval/<what>)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples / needles / sampling")
    p.add_argument("--max-context", type=int, default=None,
                   help="longest context to allow (default: the model's max_seq_len)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_subparser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model: task suites, bits/byte, lm-eval tasks, needle, longppl",
                       description="Evaluate a model on a suite (or lm-eval tasks); the subcommands `needle` and "
                                   "`longppl` probe long contexts.",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(p, required=False)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--suite", help="tasks | safety | ppl | a task name")
    what.add_argument("--lm-eval-tasks", metavar="T1,T2", help="lm-evaluation-harness tasks, run in process")
    p.add_argument("--include-path", default=None, help="extra lm-eval task YAMLs (with --lm-eval-tasks)")
    p.add_argument("--limit", type=int, default=None,
                   help="examples per task (default 100); for ppl: validation documents per language (default all)")
    p.add_argument("--split", default="test", help="train | validation | test (default test)")
    p.add_argument("--difficulty", type=int, default=1, help="the tasks' difficulty knob (default 1)")
    p.add_argument("--langs", default=None, help="only these languages (ISO 639-3, comma-separated)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per reply at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.set_defaults(func=_eval)

    subs = p.add_subparsers(dest="eval_command", required=False, metavar="{needle,longppl}")
    n = subs.add_parser("needle", help="needle in a haystack: passkey retrieval at lengths x depths",
                        description="A passkey hidden at each depth of filler text of each length; exact match. "
                                    "Writes OUT/cells/<filler>/len_L_depth_D.json, OUT/summary.json, OUT/heatmap.png.")
    _model_args(n, required=True)
    n.add_argument("--lengths", required=True, help="prompt lengths in tokens, e.g. 1k,4k,16k (1k = 1024)")
    n.add_argument("--depths", default="0,25,50,75,100", help="needle depths in percent (default 0,25,50,75,100)")
    n.add_argument("--filler", default="random", choices=["random", "corpus", "both"],
                   help="random sentences, corpus text, or both (default random)")
    n.add_argument("--filler-lang", default="eng", help="language of the corpus filler (default eng)")
    n.add_argument("--needle", default="passkey", choices=["passkey", "kv"], help="passkey number or key-value")
    n.add_argument("--format", default="chat", choices=["chat", "completion"],
                   help="Llama 4 chat dialog or a plain completion prompt (default chat)")
    n.add_argument("--batch-size", type=int, default=8, help="depths generated together (default 8)")
    n.add_argument("--max-tokens", type=int, default=24, help="reply tokens at most (default 24)")
    n.add_argument("--prefill-chunk", type=int, default=2048, help="prefill piece in tokens (default 2048)")
    n.set_defaults(func=_needle)

    lp = subs.add_parser("longppl", help="long-context loss probe: per-position loss and Δ(k)",
                         description="Δ(k) = loss(last L tokens | whole k·L context) − loss(same tokens | only "
                                     "their own L), on held-out corpus text. Writes OUT/longppl.json, OUT/longppl.png.")
    _model_args(lp, required=True)
    lp.add_argument("--train-len", type=int, required=True, help="L: the length the model was trained at")
    lp.add_argument("--multiples", default="1,2,4,8,16,32,64", help="k values (default 1,2,4,...,64)")
    lp.add_argument("--n-docs", type=int, default=8, help="sequences averaged (default 8)")
    lp.add_argument("--langs", default=None, help="languages of the text (default: the 14 main ones)")
    lp.add_argument("--piece", type=int, default=1024, help="tokens per forward piece (default 1024)")
    lp.set_defaults(func=_longppl)


# --------------------------------------------------------------------------------------------

def _load(a):
    import torch

    from llama4.infer.model_dir import load_model_dir

    if a.threads:
        torch.set_num_threads(a.threads)
    return load_model_dir(a.model, dtype=a.dtype, device=a.device)


def _out(a, what: str) -> Path:
    return Path(a.out) if a.out else Path(a.model) / "eval" / what


def _config(a, *names) -> dict:
    return {k: getattr(a, k) for k in names}


def _eval(a) -> int:
    from llama4.eval.common import check_languages, parse_names
    from llama4.eval.suites import SPLITS, results_document, results_markdown, write_results

    if a.model is None:
        raise ValueError("--model DIR is required (llama4 eval --model DIR --suite NAME; see llama4 eval --help)")
    if a.suite is None and a.lm_eval_tasks is None:
        raise ValueError("say what to run: --suite tasks|safety|ppl|TASK, --lm-eval-tasks T1,T2, or a subcommand "
                         "(needle, longppl)")
    if a.split not in SPLITS:
        raise ValueError(f"--split: unknown split {a.split!r}; expected one of {', '.join(SPLITS)}")
    for flag, v in (("--batch-size", a.batch_size), ("--max-tokens", a.max_tokens), ("--limit", a.limit)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    langs = parse_names(a.langs)
    check_languages(langs)
    if a.lm_eval_tasks is not None:
        return _lm_eval(a)
    from llama4.eval.suites import EngineResponder, resolve_suite, run_tasks

    tasks = resolve_suite(a.suite)  # unknown suite: an error before the model loads
    model, tok, name = _load(a)
    out = _out(a, a.suite)
    t0 = time.perf_counter()
    if tasks is None:  # ppl
        from llama4.eval.ppl import corpus_bits_per_byte

        r = corpus_bits_per_byte(model, tok, langs, max_docs=a.limit, window=a.max_context,
                                 progress=not a.no_progress)
        details = {"details": r.pop("details"), "window": r.pop("window")}
        doc = results_document(name, a.suite, {"ppl": r}, config=_config(a, "limit", "langs", "max_context"),
                               **details, seconds=round(time.perf_counter() - t0, 2))
        records = None
    else:
        respond = EngineResponder(model, tok, max_tokens=a.max_tokens, temperature=a.temperature, seed=a.seed,
                                  max_context=a.max_context)
        a.limit = a.limit or 100
        results, records = run_tasks(tasks, respond, split=a.split, n=a.limit, seed=a.seed,
                                     difficulty=a.difficulty, langs=langs, batch_size=a.batch_size,
                                     progress=not a.no_progress)
        doc = results_document(name, a.suite, results,
                               config=_config(a, "split", "limit", "difficulty", "langs", "batch_size", "max_tokens",
                                              "temperature", "seed"),
                               seconds=round(time.perf_counter() - t0, 2))
    write_results(out, doc, records)
    print(results_markdown(doc), end="")
    print(f"wrote {out / 'results.json'}")
    return 0


def _lm_eval(a) -> int:
    from llama4.eval.common import parse_names
    from llama4.eval.harness import run_lm_eval
    from llama4.eval.suites import results_markdown, write_results
    from llama4.infer.model_dir import resolve_model_dir

    names = parse_names(a.lm_eval_tasks)
    if not names:
        raise ValueError("--lm-eval-tasks: give at least one task name (T1,T2)")
    if a.include_path is not None and not Path(a.include_path).exists():
        raise FileNotFoundError(f"--include-path: {a.include_path} does not exist")
    resolve_model_dir(a.model)  # a missing directory: our error, before lm-eval starts
    out = _out(a, "lm-eval")
    t0 = time.perf_counter()
    doc = run_lm_eval(model_dir=a.model, tasks=names, include_path=a.include_path, limit=a.limit,
                      batch_size=a.batch_size, out_dir=str(out), dtype=a.dtype, device=a.device)
    doc.setdefault("seconds", round(time.perf_counter() - t0, 2))
    write_results(out, doc)
    print(results_markdown(doc), end="")
    print(f"wrote {out / 'results.json'}")
    return 0


def _needle(a) -> int:
    from llama4.eval.common import check_languages, parse_depths, parse_lengths
    from llama4.eval.needle import run_needle

    lengths = parse_lengths(a.lengths)
    depths = parse_depths(a.depths)
    check_languages([a.filler_lang], "--filler-lang")
    model, tok, name = _load(a)
    fillers = ("random", "corpus") if a.filler == "both" else (a.filler,)
    run_needle(model, tok, name, lengths, depths, _out(a, "needle"), fillers=fillers, kind=a.needle, fmt=a.format,
               seed=a.seed, filler_lang=a.filler_lang, max_tokens=a.max_tokens, batch_size=a.batch_size,
               max_context=a.max_context, prefill_chunk=a.prefill_chunk, progress=not a.no_progress)
    print(f"wrote {_out(a, 'needle') / 'summary.json'} and heatmap.png")
    return 0


def _longppl(a) -> int:
    from llama4.eval.common import check_languages, parse_ints, parse_names
    from llama4.eval.longppl import long_ppl, write_long_ppl

    multiples = parse_ints(a.multiples, "--multiples")
    langs = parse_names(a.langs)
    check_languages(langs)
    model, tok, name = _load(a)
    res = long_ppl(model, tok, name, a.train_len, multiples, n_docs=a.n_docs, langs=langs, piece=a.piece,
                   max_context=a.max_context, progress=not a.no_progress)
    out = _out(a, "longppl")
    write_long_ppl(res, out)
    for k in res["multiples"]:
        print(f"k={k:>3}  loss_full {res['loss_full'][str(k)]:.4f}  loss_own {res['loss_own'][str(k)]:.4f}  "
              f"delta {res['delta'][str(k)]:+.4f}")
    print(f"wrote {out / 'longppl.json'} and longppl.png")
    return 0
