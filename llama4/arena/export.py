"""Votes leave as data: FastChat's battle records, and TRL's preference pairs for ``llama4 dpo``.

Battles (every decided battle, in the order decided), FastChat's clean-battle fields::

    {"model_a", "model_b", "winner": "model_a"|"model_b"|"tie"|"tie (bothbad)",
     "tstamp", "turn", "anony": true, "conversation_a": [...], "conversation_b": [...], "source", "judge"}

Pairs (TRL's conversational preference format, read unchanged by ``llama4 dpo --pairs``)::

    {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}

Only battles with a winner become pairs. Skipped, and counted: ties and both-bad (no
preference), multi-turn battles (after the first turn each side's history holds its own
earlier answers, so the two answers no longer share a prompt), and battles whose two answers
are the same text (nothing to prefer).
"""

from __future__ import annotations

import json
from pathlib import Path

from llama4.arena import db
from llama4.tokenizer.files import atomic_write_bytes


def _jsonl(records) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def battle_records(battles: list[db.Battle]) -> list[dict]:
    return [{"model_a": b.model_a, "model_b": b.model_b, "winner": b.winner, "tstamp": b.tstamp, "turn": b.turn,
             "anony": True, "conversation_a": b.conversation_a, "conversation_b": b.conversation_b,
             "source": b.source, "judge": b.judge} for b in battles]


def preference_pairs(battles: list[db.Battle]) -> tuple[list[dict], dict]:
    """(TRL preference records, {"pairs", "ties", "bothbad", "multi_turn", "identical"} counts)."""
    pairs, counts = [], {"pairs": 0, "ties": 0, "bothbad": 0, "multi_turn": 0, "identical": 0}
    for b in battles:
        if b.winner == "tie":
            counts["ties"] += 1
            continue
        if b.winner == "tie (bothbad)":
            counts["bothbad"] += 1
            continue
        if b.turn != 1 or b.conversation_a[:-1] != b.conversation_b[:-1]:
            counts["multi_turn"] += 1
            continue
        win, lose = ((b.conversation_a, b.conversation_b) if b.winner == "model_a"
                     else (b.conversation_b, b.conversation_a))
        if win[-1]["content"] == lose[-1]["content"]:
            counts["identical"] += 1
            continue
        pairs.append({"prompt": win[:-1], "chosen": [win[-1]], "rejected": [lose[-1]]})
    counts["pairs"] = len(pairs)
    return pairs, counts


def export(db_path, out, battles: bool = False) -> dict:
    """Write ``out`` (whole or not at all) from the database; -> counts of what was written/skipped."""
    con = db.open_existing(db_path)
    try:
        rows = db.battles(con)
    finally:
        con.close()
    if battles:
        atomic_write_bytes(Path(out), _jsonl(battle_records(rows)))
        return {"battles": len(rows)}
    pairs, counts = preference_pairs(rows)
    atomic_write_bytes(Path(out), _jsonl(pairs))
    return counts
