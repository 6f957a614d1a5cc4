"""Headless Chromium for the playground's test and screenshots: Debian's `chromium` package driven
by Playwright for Python, never Playwright's own browser download (nothing outside is reachable)."""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

CHROMIUM = "/usr/bin/chromium"
# Headless, no sandbox (CI runs as root), and none of the background traffic a desktop browser starts.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def browser_missing() -> Optional[str]:
    """Why the browser cannot run here (None when it can)."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} not found: apt-get install chromium"
    if importlib.util.find_spec("playwright") is None:
        return "playwright not installed: pip install -e '.[browser]'"
    return None


def launch_chromium(playwright):
    """The system Chromium, headless, from a started `sync_playwright()`."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
