"""``llama4 arena ...``: argument parsing only (no torch, numpy or FastAPI import here).

    llama4 arena --models NAME=DIR NAME=DIR [...] [--host 127.0.0.1] [--port 8080] [--db arena.sqlite] [--password P]
    llama4 arena ratings --db FILE [--json]
    llama4 arena export --db FILE [--battles] --out FILE.jsonl
    llama4 arena auto --models NAME=DIR ... --tasks NAME[,NAME] --battles N [--db FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,63}$")

_EPILOG = """\
the page: a prompt box; two models drawn at random answer side by side as "A" and "B"; vote
(A is better / B is better / Tie / Both are bad, keys 1-4), then the names are revealed.
/leaderboard: Bradley-Terry ratings (Elo scale, mean 1000), 95% bootstrap intervals, ranks,
win fractions. Votes go to --db (SQLite, WAL; a vote is acknowledged only once committed).

  llama4 arena ratings --db arena.sqlite --json     [{"model", "rating", "ci_low", "ci_high", "battles"}]
  llama4 arena export --db arena.sqlite --battles --out battles.jsonl   FastChat battles
  llama4 arena export --db arena.sqlite --out pairs.jsonl               TRL preference pairs (llama4 dpo --pairs)
  llama4 arena auto --models base=runs/base sft=runs/sft --tasks tasks --battles 200
"""


def parse_models(items: list[str]) -> dict[str, str]:
    """["NAME=DIR", ...] -> {NAME: DIR}; names unique and plain (they are shown on the page)."""
    out: dict[str, str] = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not path:
            raise ValueError(f"--models: {item!r} is not NAME=DIR")
        if not _NAME.match(name):
            raise ValueError(f"--models: model name {name!r} must be 1-64 letters, digits or ._:+- "
                             "(starting with a letter or digit)")
        if name in out:
            raise ValueError(f"--models: the name {name!r} is given twice")
        out[name] = path
    if len(out) < 2:
        raise ValueError(f"--models: the arena needs at least two models, got {len(out)}")
    for name, path in out.items():
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--models: model directory of {name!r} not found: {path}")
    return out


def _serve(a: argparse.Namespace) -> int:
    if a.arena_command is None and not a.models:
        raise ValueError("--models NAME=DIR NAME=DIR ... is required to serve the arena "
                         "(or use a subcommand: ratings, export, auto)")
    models = parse_models(a.models)
    password = a.password if a.password is not None else os.environ.get("LLAMA4_ARENA_PASSWORD") or None
    if password is not None and not password:
        raise ValueError("--password must not be empty")
    from llama4.arena.battles import Limits

    limits = Limits(max_prompt_chars=a.max_prompt_chars, max_turns=a.max_turns, max_tokens=a.max_tokens)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    from llama4.arena.app import serve

    serve(models, host=a.host, port=a.port, db_path=a.db, password=password, limits=limits, rate_per_minute=a.rate,
          rounds=a.rounds, max_batch=a.max_batch, max_context=a.max_context, dtype=a.dtype, device=a.device,
          temperature=a.temperature, top_p=a.top_p, log_level=a.log_level)
    return 0


def _print_table(rows: list[dict], scores: dict | None = None) -> None:
    head = f"{'rank':>4}  {'model':<24} {'rating':>7}  {'95% CI':>13}  {'battles':>7}"
    print(head + ("  task score" if scores else ""))
    for r in rows:
        line = (f"{r['rank']:>4}  {r['model']:<24} {r['rating']:7.1f}  {r['ci_low']:6.1f}-{r['ci_high']:<6.1f} "
                f"{r['battles']:>7}")
        if scores:
            s = scores.get(r["model"], {}).get("score")
            line += f"  {s:10.3f}" if s is not None else f"  {'-':>10}"
        print(line)


def _board(db_path, rounds: int, seed: int) -> dict:
    from llama4.arena import db
    from llama4.arena.ratings import leaderboard

    con = db.open_existing(db_path)
    try:
        outcomes = db.outcomes(con)
    finally:
        con.close()
    return leaderboard(outcomes, rounds=rounds, seed=seed)


def _ratings(a: argparse.Namespace) -> int:
    from llama4.arena.ratings import ratings_json

    board = _board(a.db, a.rounds, a.seed)
    if a.json:
        print(json.dumps(ratings_json(board)))
        return 0
    if not board["rows"]:
        print(f"{a.db}: no decided battles yet")
        return 0
    _print_table(board["rows"])
    note = " (provisional: the MLE does not exist yet; a weak prior holds the ratings)" if board["provisional"] else ""
    print(f"{board['battles']} battles, {board['rounds']} bootstrap rounds{note}")
    return 0


def _export(a: argparse.Namespace) -> int:
    from llama4.arena.export import export

    counts = export(a.db, a.out, battles=a.battles)
    if a.battles:
        print(f"llama4 arena export: wrote {counts['battles']} battles to {a.out}", file=sys.stderr)
    else:
        print(f"llama4 arena export: wrote {counts['pairs']} preference pairs to {a.out}; skipped "
              f"{counts['ties']} ties, {counts['bothbad']} both-bad, {counts['multi_turn']} multi-turn, "
              f"{counts['identical']} with identical answers", file=sys.stderr)
    return 0


def _auto(a: argparse.Namespace) -> int:
    models = parse_models(a.models)
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks: give a task or suite name (see `llama4 tasks list`)")
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    from llama4.arena.auto import run_auto
    from llama4.arena.ratings import ratings_json

    log = (lambda m: None) if a.json else (lambda m: print(m, file=sys.stderr, flush=True))
    summary = run_auto(models, tasks, a.battles, a.db, split=a.split, seed=a.seed, difficulty=a.difficulty,
                       max_tokens=a.max_tokens, batch_size=a.batch_size, temperature=a.temperature, dtype=a.dtype,
                       device=a.device, log=log)
    board = _board(a.db, a.rounds, a.seed)
    doc = {"db": a.db, "tasks": tasks, "split": a.split, **summary, "ratings": ratings_json(board),
           "provisional": board["provisional"]}
    if a.out:
        from pathlib import Path

        from llama4.eval.common import write_json

        write_json(Path(a.out), doc)
    if a.json:
        print(json.dumps(doc))
        return 0
    o = summary["outcomes"]
    print(f"{summary['battles']} battles on {', '.join(tasks)} ({a.split} split) in {summary['seconds']:.1f} s: "
          f"{o['model_a'] + o['model_b']} decided, {o['tie']} ties, {o['tie (bothbad)']} both wrong")
    print(f"leaderboard of all {board['battles']} battles in {a.db}; task score = mean verifier score of the "
          "model's replies in these battles")
    _print_table(board["rows"], summary["scores"])
    return 0


def _common_db(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--db", required=required, default=None if required else "arena.sqlite",
                   help="the arena's SQLite database" + ("" if required else " (default arena.sqlite)"))


def add_subparser(sub) -> None:
    p = sub.add_parser("arena", help="blind side-by-side arena: web page, votes, Bradley-Terry ratings, export",
                       description="Serve a blind A/B arena page over two or more models (or use a subcommand).",
                       epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", metavar="NAME=DIR", help="models to pit against each other (>= 2)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    _common_db(p, required=False)
    p.add_argument("--password", default=None,
                   help="ask for this password (HTTP Basic, any user name) on every page, vote and the leaderboard; "
                        "also read from $LLAMA4_ARENA_PASSWORD")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per answer at most (default 256)")
    p.add_argument("--max-prompt-chars", type=int, default=4000, help="characters per message at most (default 4000)")
    p.add_argument("--max-turns", type=int, default=8, help="messages per battle at most (default 8)")
    p.add_argument("--rate", type=int, default=60, help="POST requests per minute per client address (default 60)")
    p.add_argument("--rounds", type=int, default=1000, help="bootstrap rounds of the leaderboard (default 1000)")
    p.add_argument("--max-batch", type=int, default=8, help="answers decoded together per model (default 8)")
    p.add_argument("--max-context", type=int, default=None, help="tokens per conversation (default: the model's)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: the model's generation_config.json, else 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: the model's, else 1.0)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.set_defaults(func=_serve, arena_command=None)

    subs = p.add_subparsers(dest="arena_command", required=False, metavar="{ratings,export,auto}")
    r = subs.add_parser("ratings", help="Bradley-Terry ratings with 95%% bootstrap intervals")
    _common_db(r, required=True)
    r.add_argument("--json", action="store_true",
                   help='print [{"model", "rating", "ci_low", "ci_high", "battles"}] (best first)')
    r.add_argument("--rounds", type=int, default=1000, help="bootstrap rounds (default 1000)")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    r.set_defaults(func=_ratings)

    e = subs.add_parser("export", help="battles (FastChat format) or preference pairs (TRL format, for llama4 dpo)",
                        description="Without --battles: TRL conversational preference pairs {\"prompt\", \"chosen\", "
                                    "\"rejected\"} of the decided single-turn battles (ties, both-bad, multi-turn "
                                    "and identical answers are skipped and counted), read by `llama4 dpo --pairs`. "
                                    "With --battles: every battle as FastChat's {\"model_a\", \"model_b\", \"winner\", "
                                    "...}.")
    _common_db(e, required=True)
    e.add_argument("--battles", action="store_true", help="write every battle (FastChat's battle format)")
    e.add_argument("--out", required=True, help="JSONL file to write (replaced whole)")
    e.set_defaults(func=_export)

    u = subs.add_parser("auto", help="battles on held-out task prompts, decided by the task verifiers",
                        description="Each battle: one held-out prompt of the tasks, answered by two of the models "
                                    "(every pair equally often), the task's verifier decides (higher score wins; "
                                    "equal: tie, or both-bad when both score 0). Written to --db beside human votes; "
                                    "prints the leaderboard with each model's mean verifier score.")
    u.add_argument("--models", nargs="+", required=True, metavar="NAME=DIR", help="models (>= 2)")
    u.add_argument("--tasks", required=True, help="task or suite names, comma-separated (see `llama4 tasks list`)")
    u.add_argument("--battles", type=int, required=True, help="number of battles")
    _common_db(u, required=False)
    u.add_argument("--split", default="test", choices=["train", "validation", "test"], help="task split (default test)")
    u.add_argument("--difficulty", type=int, default=1, help="the tasks' difficulty knob (default 1)")
    u.add_argument("--seed", type=int, default=0, help="prompts, pairing and sampling seed (default 0)")
    u.add_argument("--max-tokens", type=int, default=128, help="tokens per reply at most (default 128)")
    u.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default 16)")
    u.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    u.add_argument("--rounds", type=int, default=1000, help="bootstrap rounds of the printed ratings (default 1000)")
    u.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: the checkpoint's)")
    u.add_argument("--device", default=None, help="cpu, cuda, ... (default cpu)")
    u.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    u.add_argument("--out", default=None, help="also write the summary JSON here")
    u.add_argument("--json", action="store_true", help="print the summary as JSON (no progress lines)")
    u.set_defaults(func=_auto)
