"""The arena's vote store: one SQLite file in WAL mode, one row per decided battle.

Schema, version 1 (``PRAGMA user_version``; :data:`SCHEMA_VERSION`)::

    battles(
      id              TEXT PRIMARY KEY,   -- the battle's random id (the page's handle on it)
      tstamp          REAL NOT NULL,      -- unix time of the vote
      model_a         TEXT NOT NULL,      -- the model shown as "A"
      model_b         TEXT NOT NULL,      -- the model shown as "B" (never the same as A)
      winner          TEXT NOT NULL,      -- 'model_a' | 'model_b' | 'tie' | 'tie (bothbad)' (FastChat's)
      conversation_a  TEXT NOT NULL,      -- JSON [{"role", "content"}...]: the user's turns and A's answers
      conversation_b  TEXT NOT NULL,      -- the same user turns and B's answers
      turn            INTEGER NOT NULL,   -- user turns in the battle (1 = single turn)
      source          TEXT NOT NULL,      -- 'human' (the page) | 'auto' (`llama4 arena auto`)
      judge           TEXT                -- who decided: a voter tag, or 'verifier:TASK' for auto
    )

A battle is written once, when it is decided, in its own transaction; the server acknowledges a
vote only after that transaction committed (``synchronous=FULL``: committed means on disk, so
neither a killed server nor a crashed OS loses it). The primary key makes a second vote on the
same battle fail inside the database, so two voters racing on one battle cannot both win.
Undecided battles live only in the server's memory: a restart drops them, and no vote was ever
acknowledged for them.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
SOURCES = ("human", "auto")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS battles (
  id TEXT PRIMARY KEY,
  tstamp REAL NOT NULL,
  model_a TEXT NOT NULL,
  model_b TEXT NOT NULL,
  winner TEXT NOT NULL CHECK (winner IN ({", ".join(f"'{w}'" for w in WINNERS)})),
  conversation_a TEXT NOT NULL,
  conversation_b TEXT NOT NULL,
  turn INTEGER NOT NULL CHECK (turn >= 1),
  source TEXT NOT NULL CHECK (source IN ({", ".join(f"'{s}'" for s in SOURCES)})),
  judge TEXT,
  CHECK (model_a <> model_b)
);
CREATE INDEX IF NOT EXISTS battles_tstamp ON battles (tstamp);
"""


class DuplicateVote(ValueError):
    """The battle was decided already (the vote changes nothing)."""


@dataclass(frozen=True)
class Battle:
    id: str
    model_a: str
    model_b: str
    winner: str
    conversation_a: list
    conversation_b: list
    turn: int = 1
    source: str = "human"
    judge: str | None = None
    tstamp: float | None = None

    def check(self) -> "Battle":
        if self.winner not in WINNERS:
            raise ValueError(f"battle {self.id}: winner {self.winner!r} is not one of {', '.join(WINNERS)}")
        if self.model_a == self.model_b:
            raise ValueError(f"battle {self.id}: model_a and model_b are both {self.model_a!r}")
        if self.source not in SOURCES:
            raise ValueError(f"battle {self.id}: source {self.source!r} is not one of {', '.join(SOURCES)}")
        return self


def connect(path, create: bool = True) -> sqlite3.Connection:
    """An open connection with the schema in place (created when ``create``), WAL on, and
    ``synchronous=FULL``. Autocommit mode: every write below is its own explicit transaction."""
    p = Path(path)
    if not create and not p.is_file():
        raise FileNotFoundError(f"arena database not found: {p}")
    if create:
        p.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = sqlite3.connect(p, timeout=30.0, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("PRAGMA busy_timeout=30000")
        version = con.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            tables = con.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
            if tables and ("battles",) not in tables:
                raise ValueError(f"{p}: an SQLite database of something else (tables: "
                                 f"{', '.join(t[0] for t in tables)}), not an arena database")
            # idempotent, so two processes creating the same file at once both succeed
            con.executescript(_SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};")
        elif version != SCHEMA_VERSION:
            raise ValueError(f"{p}: arena schema version {version}; this llama4 reads version {SCHEMA_VERSION}")
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{p}: not a readable SQLite database ({e})") from None
    return con


def _row(b: Battle, now: float) -> tuple:
    return (b.id, b.tstamp if b.tstamp is not None else now, b.model_a, b.model_b, b.winner,
            json.dumps(b.conversation_a, ensure_ascii=False), json.dumps(b.conversation_b, ensure_ascii=False),
            b.turn, b.source, b.judge)


_INSERT = ("INSERT INTO battles (id, tstamp, model_a, model_b, winner, conversation_a, conversation_b, turn, "
           "source, judge) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def record(con: sqlite3.Connection, battle: Battle) -> None:
    """Write one decided battle in its own transaction; returns once it is committed.
    Raises :class:`DuplicateVote` when the battle was decided before (nothing changes)."""
    battle.check()
    try:
        with con:  # BEGIN ... COMMIT, or ROLLBACK on error
            con.execute("BEGIN IMMEDIATE")
            con.execute(_INSERT, _row(battle, time.time()))
    except sqlite3.IntegrityError:
        raise DuplicateVote(f"battle {battle.id} has a vote already") from None


def record_many(con: sqlite3.Connection, battles) -> int:
    """Write many decided battles in one transaction (all or none); -> how many."""
    now = time.time()
    rows = [_row(b.check(), now) for b in battles]
    try:
        with con:
            con.execute("BEGIN IMMEDIATE")
            con.executemany(_INSERT, rows)
    except sqlite3.IntegrityError as e:
        raise DuplicateVote(f"a battle id is in the database already ({e})") from None
    return len(rows)


def has_battle(con: sqlite3.Connection, battle_id: str) -> bool:
    return con.execute("SELECT 1 FROM battles WHERE id = ?", (battle_id,)).fetchone() is not None


def count(con: sqlite3.Connection) -> int:
    return con.execute("SELECT COUNT(*) FROM battles").fetchone()[0]


def outcomes(con: sqlite3.Connection) -> list[tuple[str, str, str]]:
    """Every battle as (model_a, model_b, winner), in the order they were decided."""
    return con.execute("SELECT model_a, model_b, winner FROM battles ORDER BY tstamp, rowid").fetchall()


def battles(con: sqlite3.Connection) -> list[Battle]:
    """Every battle, with its conversations, in the order they were decided."""
    rows = con.execute("SELECT id, model_a, model_b, winner, conversation_a, conversation_b, turn, source, judge, "
                       "tstamp FROM battles ORDER BY tstamp, rowid").fetchall()
    return [Battle(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5]), r[6], r[7], r[8], r[9]) for r in rows]


def open_existing(path) -> sqlite3.Connection:
    """A connection to a database that must exist (the read-only commands)."""
    return connect(path, create=False)
