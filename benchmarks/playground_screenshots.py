"""Screenshots of the browser playground after a real exchange: docs/playground-desktop.png and
docs/playground-narrow.png (a phone-sized window), as the README shows them.

    python benchmarks/playground_screenshots.py            # starts its own server (embedded SmolLM2)
    python benchmarks/playground_screenshots.py --url http://127.0.0.1:8000

Needs Debian's chromium (/usr/bin/chromium) and `pip install -e '.[browser]'` (Playwright drives
the system browser; no browser download).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the tests' server harness and browser launcher

from browser import browser_missing, launch_chromium  # noqa: E402

SYSTEM = "You are a concise programming assistant. Answer in Markdown."
TURNS = ("Write a Python function that reverses a string, with a one-line explanation.",
         "Give three tips for naming Python functions, as a short list.")


def _wait_for_reply(page, n: int, timeout_s: float = 180.0) -> None:
    """Until the n-th reply (1-based) has its facts line (polled from outside: the page's CSP
    forbids the eval() that page.wait_for_function uses)."""
    deadline = time.monotonic() + timeout_s
    while page.locator(".msg.assistant .facts").count() < n:
        if time.monotonic() > deadline:
            raise TimeoutError("no reply")
        time.sleep(0.1)


def capture(url: str, out_dir: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    desktop, narrow = out_dir / "playground-desktop.png", out_dir / "playground-narrow.png"
    with sync_playwright() as p:
        chromium = launch_chromium(p)
        page = chromium.new_page(viewport={"width": 1280, "height": 800})
        page.goto(url + "/")
        page.fill("#system", SYSTEM)
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "160")
        for i, question in enumerate(TURNS, 1):
            page.fill("#input", question)
            page.press("#input", "Enter")
            _wait_for_reply(page, i)
        time.sleep(1.5)  # one more /metrics poll for the status strip
        page.screenshot(path=str(desktop))
        page.set_viewport_size({"width": 390, "height": 844})
        page.evaluate("() => { document.getElementById('settings').open = false;"
                      " const log = document.getElementById('log'); log.scrollTop = log.scrollHeight; }")
        time.sleep(0.3)
        page.screenshot(path=str(narrow))
        chromium.close()
    return [desktop, narrow]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running Skiff server without --api-key (default: start one)")
    parser.add_argument("--out", default=str(REPO / "docs"), help="where the PNGs go")
    args = parser.parse_args()
    missing = browser_missing()
    if missing:
        raise SystemExit(missing)
    server = None
    if args.url is None:
        from conftest import SkiffServer

        server = SkiffServer("--max-model-len", "1024").start()
    try:
        for path in capture(args.url or server.url, Path(args.out)):
            print(path)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
