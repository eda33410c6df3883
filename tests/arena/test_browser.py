"""The arena page in a real browser: headless Chromium (Debian's ``chromium``) driven by
Playwright. It loads the page, sends a prompt from the keyboard, waits for both streams, votes,
sees the names revealed and the leaderboard change; phone width stacks the answers; and a model
answer full of markup stays text. A missing Chromium fails the test (``bash scripts/setup.sh``
installs it), it never skips.

Screenshots go to the test's temporary folder, or to $LLAMA4_ARENA_SCREENSHOTS when set. (The
ones in docs/ show `llama4 arena` over real post-training runs: tests/arena/screenshots.py.)"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from arena_common import ScriptedContestant, serving_app, write_model
from oracles import require
from llama4.arena.app import create_app
from llama4.arena.battles import Arena, Limits
from llama4.arena.contestants import EngineContestant

sync_api = require("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"no Chromium at {CHROMIUM}: the arena's browser test needs Debian's `chromium` package "
                    "(`apt-get install -y chromium`; `bash scripts/setup.sh` installs it where it can). "
                    "This test fails rather than skips without it.", pytrace=False)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def shots(tmp_path) -> Path:
    d = Path(os.environ.get("LLAMA4_ARENA_SCREENSHOTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def board_rows(page) -> list[list[str]]:
    page.wait_for_selector("#board tbody tr")
    return page.eval_on_selector_all("#board tbody tr", "rs => rs.map(r => [...r.cells].map(c => c.textContent))")


def test_battle_vote_reveal_and_leaderboard_in_chromium(browser, tmp_path, one_thread):
    dirs = {n: write_model(tmp_path / n, seed=s) for n, s in (("alpha", 0), ("bravo", 1))}
    contestants = {n: EngineContestant(d, temperature=1.0) for n, d in dirs.items()}
    arena = Arena(contestants, tmp_path / "votes.sqlite", Limits(max_tokens=24))
    out = shots(tmp_path)
    with serving_app(create_app(arena, rounds=100)) as url:
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("#prompt:focus")  # the message box has the focus: type right away
        page.keyboard.type("Write a short greeting.")
        page.keyboard.press("Control+Enter")
        page.wait_for_selector("body[data-state=ready]", timeout=60_000)
        for side in "ab":
            assert page.get_attribute(f"#side-{side}", "data-done") == "true"
            assert page.text_content(f"#log-{side} .msg.user") == "Write a short greeting."
            assert page.text_content(f"#log-{side} .msg.assistant") != ""  # the stream arrived
        labels = [page.text_content("#label-a"), page.text_content("#label-b")]
        assert labels == ["Model A", "Model B"]  # blind
        page.screenshot(path=str(out / "arena_battle.png"))
        page.keyboard.press("2")  # B is better, from the keyboard
        page.wait_for_selector("body[data-state=voted]")
        revealed = [page.text_content("#label-a"), page.text_content("#label-b")]
        assert sorted(t.split(": ")[1] for t in revealed) == ["alpha", "bravo"]
        assert "saved" in page.text_content("#result") and "B is better" in page.text_content("#result")
        assert "winner" in page.get_attribute("#side-b", "class")

        page.click("#nav-board")
        assert page.url.endswith("/leaderboard")
        first = board_rows(page)
        assert len(first) == 2 and [r[4] for r in first] == ["1", "1"]  # one battle each
        winner = revealed[1].split(": ")[1]
        assert first[0][1] == winner  # the one voted better is on top
        assert page.eval_on_selector_all("#heatmap td", "tds => tds.map(t => t.textContent)") == ["–", "100%", "0%", "–"] or \
            page.eval_on_selector_all("#heatmap td", "tds => tds.map(t => t.textContent)") == ["–", "0%", "100%", "–"]

        page.click("#nav-battle")  # a second battle, decided the other way: the leaderboard changes
        page.fill("#prompt", "Another one")
        page.click("#send")
        page.wait_for_selector("body[data-state=ready]", timeout=60_000)
        page.click("#vote-a")
        page.wait_for_selector("body[data-state=voted]")
        a_name = page.text_content("#label-a").split(": ")[1]
        page.click("#nav-board")
        # (no wait_for_function: the page's Content-Security-Policy forbids eval, Playwright's too)
        page.wait_for_selector("#board tbody tr:first-child td:nth-child(5):text-is('2')")
        second = board_rows(page)
        assert [r[4] for r in second] == ["2", "2"] and second != first
        page.screenshot(path=str(out / "arena_leaderboard.png"), full_page=True)
        assert not errors, errors

        phone = browser.new_page(viewport={"width": 390, "height": 844})
        phone.goto(url + "/")
        a = phone.eval_on_selector("#side-a", "e => e.getBoundingClientRect().toJSON()")
        b = phone.eval_on_selector("#side-b", "e => e.getBoundingClientRect().toJSON()")
        assert b["top"] >= a["bottom"] and a["width"] > 300  # stacked, full width
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        phone.close()
        page.close()
    assert a_name in ("alpha", "bravo")


def test_model_markup_stays_text_in_chromium(browser, tmp_path):
    contestants = {"left": ScriptedContestant("<script>window.pwned=1</script><b>bold?</b>"),
                   "right": ScriptedContestant('<img src=x onerror="window.pwned=2"><i>x</i>')}
    arena = Arena(contestants, tmp_path / "votes.sqlite", Limits())
    with serving_app(create_app(arena, rounds=100)) as url:
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#prompt", '<img src=y onerror="window.pwned=3">')
        page.click("#send")
        page.wait_for_selector("body[data-state=ready]")
        page.wait_for_timeout(300)  # time for any injected handler to have run
        assert page.evaluate("window.pwned") is None
        texts = page.eval_on_selector_all(".msg", "ms => ms.map(m => m.textContent)")
        assert '<img src=y onerror="window.pwned=3">' in texts
        assert any("<script>window.pwned=1</script><b>bold?</b>" == t for t in texts) or \
            any('<img src=x onerror="window.pwned=2"><i>x</i>' == t for t in texts)
        assert page.eval_on_selector_all(".log img, .log script, .log b, .log i", "es => es.length") == 0
        page.close()
