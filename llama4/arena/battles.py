"""The blind battle flow: two contestants drawn at random answer the same turns side by side,
then one vote decides the battle and only then are the names told.

A battle lives in memory while it is undecided (bounded: the oldest undecided ones are dropped
past ``max_pending``); the vote writes it to the database (``db.record``: committed before the
vote is acknowledged) and forgets it. Nothing a client sees before the vote names a model.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import AsyncIterator

from llama4.arena import db
from llama4.arena.contestants import Contestant, ContestantError


class ArenaError(Exception):
    """A request the arena refuses: ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    max_prompt_chars: int = 4000  # one user turn
    max_turns: int = 8  # user turns per battle
    max_tokens: int = 256  # per answer
    max_pending: int = 256  # undecided battles kept in memory

    def __post_init__(self):
        for name in ("max_prompt_chars", "max_turns", "max_tokens", "max_pending"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")


@dataclass
class PendingBattle:
    id: str
    model_a: str
    model_b: str
    conversation_a: list = field(default_factory=list)
    conversation_b: list = field(default_factory=list)
    streaming: bool = False  # a turn is being answered
    voting: bool = False  # its vote is being written
    created: float = field(default_factory=time.time)

    @property
    def turns(self) -> int:
        return sum(m["role"] == "user" for m in self.conversation_a)


class Arena:
    def __init__(self, contestants: dict[str, Contestant], db_path, limits: Limits | None = None):
        if len(contestants) < 2:
            raise ValueError(f"the arena needs at least two models, got {len(contestants)}")
        self.contestants = contestants
        self.limits = limits or Limits()
        self.con = db.connect(db_path)
        self._db_lock = threading.Lock()  # one connection, used from worker threads one at a time
        self.pending: OrderedDict[str, PendingBattle] = OrderedDict()
        self._random = secrets.SystemRandom()

    # --- battles ---------------------------------------------------------------------------------
    def check_prompt(self, prompt) -> str:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ArenaError(400, "field 'prompt' must be a non-empty string")
        if len(prompt) > self.limits.max_prompt_chars:
            raise ArenaError(413, f"the prompt is {len(prompt)} characters; the limit is "
                             f"{self.limits.max_prompt_chars}")
        return prompt

    def new_battle(self) -> PendingBattle:
        a, b = self._random.sample(sorted(self.contestants), 2)  # random pair, random sides
        battle = PendingBattle(secrets.token_urlsafe(16), a, b)
        self.pending[battle.id] = battle
        while len(self.pending) > self.limits.max_pending:
            self.pending.popitem(last=False)
        return battle

    def get(self, battle_id: str) -> PendingBattle:
        b = self.pending.get(battle_id)
        if b is None:
            if self._has(battle_id):
                raise ArenaError(409, "this battle has been decided already; start a new one")
            raise ArenaError(404, f"unknown battle {battle_id!r} (it may have expired: start a new one)")
        return b

    def check_turn(self, battle: PendingBattle) -> None:
        """Refuse a turn the battle cannot take now (before any response is sent)."""
        if battle.streaming or battle.voting:
            raise ArenaError(409, "this battle is still answering or being decided; wait")
        if battle.turns >= self.limits.max_turns:
            raise ArenaError(400, f"a battle has at most {self.limits.max_turns} turns; vote, then start a new one")

    async def turn(self, battle: PendingBattle, prompt: str) -> AsyncIterator[dict]:
        """Both sides answer ``prompt`` (appended to their own conversations); yields events
        ``{"type": "delta", "side": "a"|"b", "text"}``, ``{"type": "end", "side"}``, and
        ``{"type": "error", "message"}`` (the battle is then dropped)."""
        self.check_turn(battle)
        battle.streaming = True
        user = {"role": "user", "content": prompt}
        queue: asyncio.Queue = asyncio.Queue()

        async def answer(side: str, name: str, conversation: list) -> None:
            text = ""
            try:
                async for delta in self.contestants[name].stream(conversation + [user], self.limits.max_tokens):
                    text += delta
                    queue.put_nowait({"type": "delta", "side": side, "text": delta})
                queue.put_nowait({"type": "end", "side": side, "text": text})
            except ContestantError as e:
                queue.put_nowait({"type": "error", "side": side, "message": str(e)})
            except Exception as e:  # never the model's name: the battle is blind
                queue.put_nowait({"type": "error", "side": side, "message": f"an answer failed ({type(e).__name__})"})

        tasks = [asyncio.create_task(answer("a", battle.model_a, battle.conversation_a)),
                 asyncio.create_task(answer("b", battle.model_b, battle.conversation_b))]
        texts, failed = {}, False
        try:
            while len(texts) < 2 and not failed:
                ev = await queue.get()
                if ev["type"] == "end":
                    texts[ev["side"]] = ev.pop("text")
                failed = ev["type"] == "error"
                yield ev
        finally:
            for t in tasks:
                t.cancel()
            battle.streaming = False
            if len(texts) == 2:
                battle.conversation_a += [user, {"role": "assistant", "content": texts["a"]}]
                battle.conversation_b += [user, {"role": "assistant", "content": texts["b"]}]
            else:  # an answer failed or the page went away mid-answer: the battle cannot be judged
                self.pending.pop(battle.id, None)

    # --- votes -----------------------------------------------------------------------------------
    async def vote(self, battle_id: str, winner, judge: str | None = None) -> dict:
        """Record the vote (committed when this returns) and reveal the names."""
        if winner not in db.WINNERS:
            raise ArenaError(400, f"field 'winner' must be one of {', '.join(db.WINNERS)}, got {winner!r}")
        b = self.get(battle_id)
        if b.streaming:
            raise ArenaError(409, "the answers are still streaming; vote when both have finished")
        if b.voting:
            raise ArenaError(409, "a vote for this battle is being recorded already")
        if b.turns == 0:
            raise ArenaError(409, "this battle has no answers yet")
        battle = db.Battle(b.id, b.model_a, b.model_b, winner, list(b.conversation_a), list(b.conversation_b),
                           b.turns, "human", judge)
        b.voting = True
        try:
            await asyncio.to_thread(self._record, battle)  # the commit's fsync off the event loop
        except db.DuplicateVote:
            raise ArenaError(409, "this battle has been decided already; start a new one") from None
        finally:
            b.voting = False
        self.pending.pop(battle_id, None)
        return {"model_a": b.model_a, "model_b": b.model_b, "winner": winner}

    def _record(self, battle: db.Battle) -> None:
        with self._db_lock:
            db.record(self.con, battle)

    def _has(self, battle_id: str) -> bool:
        with self._db_lock:
            return db.has_battle(self.con, battle_id)

    def outcomes(self) -> tuple[tuple, list]:
        """(a key that changes whenever a battle is added, every battle's (model_a, model_b, winner))."""
        with self._db_lock:
            key = self.con.execute("SELECT COUNT(*), MAX(rowid) FROM battles").fetchone()
            return tuple(key), db.outcomes(self.con)

    def close(self) -> None:
        self.con.close()
