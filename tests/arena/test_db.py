"""The vote store (llama4/arena/db.py): a versioned schema, WAL, one transaction per vote, a
second vote on a battle refused by the database itself, and no acknowledged vote lost when the
server is killed with SIGKILL in the middle of a stream of votes from concurrent voters."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from arena_common import sse_events, write_model
from serving import free_port
from llama4.arena import db

ROOT = Path(__file__).resolve().parents[2]


def battle(i: int, winner: str = "model_a") -> db.Battle:
    conv = [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    return db.Battle(f"b{i}", "x", "y", winner, conv, conv)


def test_schema_is_versioned_wal_and_documented(tmp_path):
    path = tmp_path / "a.sqlite"
    con = db.connect(path)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA user_version").fetchone()[0] == db.SCHEMA_VERSION == 1
    cols = [r[1] for r in con.execute("PRAGMA table_info(battles)")]
    assert cols == ["id", "tstamp", "model_a", "model_b", "winner", "conversation_a", "conversation_b", "turn",
                    "source", "judge"]
    for c in cols:  # every column is described in the module's docstring
        assert f"\n      {c} " in db.__doc__, c
    db.record(con, battle(1))
    con.close()
    con = db.connect(path)  # reopening keeps the data
    assert db.outcomes(con) == [("x", "y", "model_a")]
    con.execute("PRAGMA user_version=7")
    con.close()
    with pytest.raises(ValueError, match="schema version 7"):
        db.connect(path)


def test_not_an_arena_database(tmp_path):
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(ValueError, match="not an arena database"):
        db.connect(other)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="not a readable SQLite database"):
        db.connect(junk)
    with pytest.raises(FileNotFoundError, match="arena database not found"):
        db.open_existing(tmp_path / "missing.sqlite")


def test_second_vote_and_bad_rows_change_nothing(tmp_path):
    con = db.connect(tmp_path / "a.sqlite")
    db.record(con, battle(1, "tie"))
    with pytest.raises(db.DuplicateVote):
        db.record(con, battle(1, "model_b"))
    with pytest.raises(ValueError, match="winner"):
        db.record(con, battle(2, "model_c"))
    with pytest.raises(ValueError, match="both 'x'"):
        db.record(con, db.Battle("b3", "x", "x", "tie", [], []))
    with pytest.raises(db.DuplicateVote):  # all or nothing
        db.record_many(con, [battle(4), battle(1)])
    assert db.outcomes(con) == [("x", "y", "tie")]


def test_concurrent_writers_on_separate_connections(tmp_path):
    path = tmp_path / "a.sqlite"
    db.connect(path).close()

    def write(k):
        con = db.connect(path)
        for i in range(25):
            db.record(con, battle(k * 1000 + i))
        con.close()

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert db.count(db.connect(path)) == 100


def test_kill9_during_a_stream_of_votes_loses_no_acknowledged_vote(tmp_path):
    models = [write_model(tmp_path / n, seed=s) for n, s in (("m0", 0), ("m1", 1))]
    path = tmp_path / "votes.sqlite"
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "llama4", "arena", "--models", f"m0={models[0]}",
                               f"m1={models[1]}", "--port", str(port), "--db", str(path), "--max-tokens", "1",
                               "--rate", "100000", "--threads", "1", "--log-level", "warning"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            assert time.monotonic() < deadline, "the arena server did not start"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        acked: dict[str, str] = {}
        lock, stop = threading.Lock(), threading.Event()
        in_flight = [0]

        def voter(k):
            winners = ["model_a", "model_b", "tie", "tie (bothbad)"]
            i = 0
            with httpx.Client(base_url=url, timeout=30) as c:
                while not stop.is_set():
                    try:
                        r = c.post("/api/battles", json={"prompt": f"voter {k} battle {i}"})
                        bid = sse_events(r)[0]["id"]
                        w = winners[(k + i) % 4]
                        with lock:
                            in_flight[0] += 1
                        v = c.post(f"/api/battles/{bid}/vote", json={"winner": w})
                        with lock:
                            in_flight[0] -= 1
                            if v.status_code == 200:
                                acked[bid] = w
                    except (httpx.HTTPError, IndexError, KeyError):
                        return  # the server is gone
                    i += 1

        threads = [threading.Thread(target=voter, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        while len(acked) < 40 or in_flight[0] == 0:  # kill while votes are on their way
            assert server.poll() is None and time.monotonic() < deadline + 120, "votes did not come in"
            time.sleep(0.0005)
        server.send_signal(signal.SIGKILL)  # no shutdown, no flush: whatever was committed is all there is
        at_kill = in_flight[0]
        server.wait()
        stop.set()
        for t in threads:
            t.join(timeout=30)
        with lock:
            print(f"\n{len(acked)} acknowledged votes, {at_kill} in flight at the kill")
        con = sqlite3.connect(path)
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = dict(con.execute("SELECT id, winner FROM battles").fetchall())
        con.close()
        lost = {b: w for b, w in acked.items() if stored.get(b) != w}
        assert not lost, f"{len(lost)} acknowledged votes lost or changed"
        assert len(stored) >= len(acked)  # at most the in-flight ones committed without an answer
        r = subprocess.run([sys.executable, "-m", "llama4", "arena", "ratings", "--db", str(path), "--json",
                            "--rounds", "100"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert sum(x["battles"] for x in json.loads(r.stdout)) == 2 * len(stored)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
