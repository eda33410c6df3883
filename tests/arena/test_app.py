"""The arena's HTTP side (llama4/arena/app.py, battles.py): blind streamed battles on real tiny
models, votes acknowledged only when committed, and safety (password, caps, rate, malformed
votes change nothing, model text never becomes markup)."""

from __future__ import annotations

import concurrent.futures
import json
import sqlite3
from pathlib import Path

import httpx
import pytest

from arena_common import ScriptedContestant, serving_app, sse_events, write_model
from llama4.arena import db
from llama4.arena.app import create_app
from llama4.arena.battles import Arena, Limits
from llama4.arena.contestants import EngineContestant

STATIC = Path(__file__).resolve().parents[2] / "llama4" / "arena" / "static"


def rows(path) -> list[tuple]:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT id, model_a, model_b, winner, turn FROM battles ORDER BY rowid").fetchall()
    finally:
        con.close()


@pytest.fixture(scope="module")
def engines(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("arena-models")
    return {"alpha": write_model(root / "alpha", seed=0), "bravo": write_model(root / "bravo", seed=1)}


@pytest.fixture(scope="module")
def real_arena(engines, tmp_path_factory):
    path = tmp_path_factory.mktemp("arena-db") / "votes.sqlite"
    contestants = {name: EngineContestant(d, max_batch=8, temperature=1.0) for name, d in engines.items()}
    arena = Arena(contestants, path, Limits(max_tokens=12))
    with serving_app(create_app(arena, rounds=100)) as url:
        yield url, path


def battle(client: httpx.Client, prompt: str, battle_id: str | None = None) -> tuple[str, list[dict]]:
    url = f"/api/battles/{battle_id}/turns" if battle_id else "/api/battles"
    r = client.post(url, json={"prompt": prompt})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    evs = sse_events(r)
    return (battle_id or evs[0]["id"]), evs


def test_battle_streams_both_sides_blind_then_the_vote_reveals_and_is_stored(real_arena):
    url, path = real_arena
    with httpx.Client(base_url=url, timeout=60) as c:
        bid, evs = battle(c, "Hello there")
        assert evs[0]["type"] == "battle" and evs[-1] == {"type": "done"}
        assert {e["side"] for e in evs if e["type"] == "delta"} == {"a", "b"}  # both streamed
        assert sorted(e["side"] for e in evs if e["type"] == "end") == ["a", "b"]
        text = {s: "".join(e["text"] for e in evs if e["type"] == "delta" and e["side"] == s) for s in "ab"}
        _, evs2 = battle(c, "And a follow-up", bid)  # goes to both
        assert sorted(e["side"] for e in evs2 if e["type"] == "end") == ["a", "b"]
        assert all("alpha" not in str(e) and "bravo" not in str(e) for e in evs + evs2)  # blind until the vote
        before = len(rows(path))
        r = c.post(f"/api/battles/{bid}/vote", json={"winner": "model_b"})
        assert r.status_code == 200, r.text
        got = r.json()
        assert {got["model_a"], got["model_b"]} == {"alpha", "bravo"} and got["winner"] == "model_b"
        # acknowledged => committed: another connection sees it right away
        after = rows(path)
        assert len(after) == before + 1 and after[-1] == (bid, got["model_a"], got["model_b"], "model_b", 2)
        con = db.open_existing(path)
        stored = [b for b in db.battles(con) if b.id == bid][0]
        con.close()
        assert [m["content"] for m in stored.conversation_a if m["role"] == "user"] == ["Hello there", "And a follow-up"]
        assert stored.conversation_a[1]["content"] == text["a"] and stored.conversation_b[1]["content"] == text["b"]
        board = c.get("/api/leaderboard").json()
        assert {r["model"] for r in board["rows"]} == {"alpha", "bravo"} and board["battles"] == len(after)
        assert all(r["ci_low"] <= r["rating"] <= r["ci_high"] for r in board["rows"])


def test_concurrent_voters_all_recorded(real_arena):
    url, path = real_arena
    before = len(rows(path))

    def one(i):
        with httpx.Client(base_url=url, timeout=120) as c:
            bid, _ = battle(c, f"question {i}")
            r = c.post(f"/api/battles/{bid}/vote", json={"winner": ["model_a", "model_b", "tie", "tie (bothbad)"][i % 4]})
            assert r.status_code == 200, r.text
            return bid

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(one, range(12)))
    stored = {r[0] for r in rows(path)}
    assert len(rows(path)) == before + 12 and set(ids) <= stored


@pytest.fixture()
def scripted(tmp_path):
    """An arena of two scripted contestants (replies with markup in them), its URL and database."""
    def make(password=None, rate=1000, delay=0.01, **limits):
        contestants = {"left": ScriptedContestant("<script>window.pwned=1</script><b>bold?</b>", delay),
                       "right": ScriptedContestant('<img src=x onerror="window.pwned=2">plain', delay)}
        path = tmp_path / f"s{len(list(tmp_path.iterdir()))}.sqlite"
        return create_app(Arena(contestants, path, Limits(**limits)), password=password, rate_per_minute=rate,
                          rounds=100), path
    return make


def test_malformed_votes_get_4xx_and_change_nothing(scripted):
    app, path = scripted()
    with serving_app(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        bid, _ = battle(c, "hi")
        bad = [(f"/api/battles/nope/vote", {"winner": "model_a"}, 404),
               (f"/api/battles/{bid}/vote", {"winner": "model_c"}, 400),  # wrong side
               (f"/api/battles/{bid}/vote", {"winner": "A"}, 400),
               (f"/api/battles/{bid}/vote", {"winner": None}, 400),
               (f"/api/battles/{bid}/vote", {"side": "model_a"}, 400),
               (f"/api/battles/{bid}/vote", [1, 2], 400)]
        for route, body, status in bad:
            r = c.post(route, json=body)
            assert r.status_code == status and r.json()["error"], (body, r.status_code, r.text)
        r = c.post(f"/api/battles/{bid}/vote", content=b"{not json")
        assert r.status_code == 400 and "JSON" in r.json()["error"]
        assert rows(path) == []  # nothing changed
        assert c.post(f"/api/battles/{bid}/vote", json={"winner": "tie"}).status_code == 200
        once = rows(path)
        r = c.post(f"/api/battles/{bid}/vote", json={"winner": "model_a"})  # double vote
        assert r.status_code == 409 and "decided" in r.json()["error"]
        assert rows(path) == once and once[0][3] == "tie"
        r = c.post(f"/api/battles/{bid}/turns", json={"prompt": "more?"})  # a decided battle takes no turn
        assert r.status_code == 409 and rows(path) == once


def test_vote_while_streaming_is_refused(scripted):
    app, path = scripted(delay=0.5)
    with serving_app(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/api/battles", json={"prompt": "slow"}) as r:
            lines = r.iter_lines()  # kept: dropping it would close the stream (and the battle with it)
            bid = json.loads(next(lines)[6:])["id"]
            v = httpx.post(f"{url}/api/battles/{bid}/vote", json={"winner": "model_a"}, timeout=30)
            assert v.status_code == 409 and "streaming" in v.json()["error"]
            t = httpx.post(f"{url}/api/battles/{bid}/turns", json={"prompt": "x"}, timeout=30)
            assert t.status_code == 409
        assert rows(path) == []


def test_password_guards_page_votes_and_leaderboard(scripted):
    app, path = scripted(password="s3cret")
    with serving_app(app) as url:
        for method, route in [("GET", "/"), ("GET", "/leaderboard"), ("GET", "/api/leaderboard"),
                              ("GET", "/static/app.js"), ("POST", "/api/battles"), ("POST", "/api/battles/x/vote")]:
            for auth in (None, ("u", "wrong"), ("u", "")):
                r = httpx.request(method, url + route, auth=auth, json={"prompt": "x", "winner": "tie"}, timeout=30)
                assert r.status_code == 401 and "Basic" in r.headers["www-authenticate"], (route, auth, r.status_code)
        assert httpx.get(url + "/health").status_code == 200
        with httpx.Client(base_url=url, auth=("anyone", "s3cret"), timeout=30) as c:
            assert c.get("/api/leaderboard").status_code == 200
            bid, _ = battle(c, "hi")
            assert c.post(f"/api/battles/{bid}/vote", json={"winner": "model_a"}).status_code == 200
        assert len(rows(path)) == 1


def test_prompt_length_turns_and_rate_are_capped_with_clear_messages(scripted):
    app, _ = scripted(max_prompt_chars=50, max_turns=2, rate=6)
    with serving_app(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/api/battles", json={"prompt": "x" * 51})
        assert r.status_code == 413 and "51 characters" in r.json()["error"] and "50" in r.json()["error"]
        assert c.post("/api/battles", json={"prompt": "   "}).status_code == 400
        bid, _ = battle(c, "one")
        battle(c, "two", bid)
        r = c.post(f"/api/battles/{bid}/turns", json={"prompt": "three"})
        assert r.status_code == 400 and "at most 2 turns" in r.json()["error"]
        assert c.post("/api/battles", json={"prompt": "again"}).status_code == 200  # the 6th POST within a minute
        r = c.post("/api/battles", json={"prompt": "and again"})  # the 7th
        assert r.status_code == 429 and "at most 6 a minute" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
        assert c.get("/api/leaderboard").status_code == 200  # reading is not rate-limited


def test_model_text_travels_as_json_and_the_page_never_makes_markup(scripted):
    app, _ = scripted()
    with serving_app(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        _, evs = battle(c, "<b>hi</b>")
        text = "".join(e["text"] for e in evs if e["type"] == "delta")
        assert "<script>" in text and "onerror" in text  # delivered verbatim, as JSON strings
        page = c.get("/")
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and page.headers["x-content-type-options"] == "nosniff"
        js = c.get("/static/app.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert c.get("/static/style.css").headers["content-type"].startswith("text/css")
        assert c.get("/static/../db.py").status_code == 404 and c.get("/static/index.htm").status_code == 404
    source = (STATIC / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in source, sink
    html = (STATIC / "index.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script>" not in html  # no CDN, no inline script


def test_static_files_ship_with_the_package():
    import tomllib
    from importlib import resources

    for name in ("index.html", "app.js", "style.css"):
        assert resources.files("llama4.arena").joinpath("static", name).is_file()
    cfg = tomllib.loads((STATIC.parents[2] / "pyproject.toml").read_text())
    globs = cfg["tool"]["setuptools"]["package-data"]["*"]
    assert {"*.html", "*.js", "*.css"} <= set(globs), globs


def test_arena_needs_two_models(tmp_path):
    with pytest.raises(ValueError, match="at least two models"):
        Arena({"solo": ScriptedContestant("x")}, tmp_path / "a.sqlite")
