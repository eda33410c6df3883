"""Takes docs/arena-*.png: `llama4 arena` over real model folders in headless Chromium, one battle
typed and voted, then the leaderboard (wide and phone width). Not a test; run by hand:

    .venv/bin/python tests/arena/screenshots.py docs --db arena.sqlite base=DIR sft=DIR rl=DIR

Fill --db first (e.g. with `llama4 arena auto`) for a leaderboard worth showing.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "Reproduce this passage verbatim. Output nothing else.\n\nThe quick brown fox jumps over the lazy dog."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("models", nargs="+", help="NAME=DIR")
    ap.add_argument("--db", required=True)
    ap.add_argument("--port", type=int, default=8765)
    a = ap.parse_args()
    out = Path(a.out)
    url = f"http://127.0.0.1:{a.port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    srv = subprocess.Popen([sys.executable, "-m", "llama4", "arena", "--models", *a.models, "--db", a.db,
                            "--port", str(a.port), "--max-tokens", "64", "--threads", "1", "--log-level", "warning"],
                           cwd=ROOT, env=env)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        with sync_playwright() as p:
            b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = b.new_page(viewport={"width": 1100, "height": 760})
            page.goto(url + "/")
            page.fill("#prompt", PROMPT)
            page.click("#send")
            page.wait_for_selector("body[data-state=ready]", timeout=120_000)
            page.screenshot(path=str(out / "arena-battle.png"))
            page.click("#vote-a")
            page.wait_for_selector("body[data-state=voted]")
            page.click("#nav-board")
            page.wait_for_selector("#heatmap td")
            page.screenshot(path=str(out / "arena-leaderboard.png"), full_page=True)
            phone = b.new_page(viewport={"width": 390, "height": 844})
            phone.goto(url + "/leaderboard")
            phone.wait_for_selector("#heatmap td")
            phone.screenshot(path=str(out / "arena-phone.png"), full_page=True)
            b.close()
    finally:
        srv.send_signal(signal.SIGINT)
        srv.wait(timeout=60)


if __name__ == "__main__":
    main()
