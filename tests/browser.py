"""Headless Chromium for the dashboard's browser tests (and scripts/dashboard_screenshot.py).

Playwright drives the distribution's ``chromium`` (``python scripts/bootstrap.py
test`` installs it with apt-get), never a browser Playwright downloads: CI
machines have no internet. ``HOTMODEL_CHROMIUM`` names another executable
(Chrome or Chromium on macOS and Windows). A missing browser fails the test
with that advice; it is never skipped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

CHROMIUM_ENV = "HOTMODEL_CHROMIUM"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"  # screenshots the tests leave behind (gitignored)

# Without network, Chromium would stall on DNS lookups, QUIC probes, component and
# sync updates; none of them is needed to render a local page.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> Path:
    """The browser to drive: $HOTMODEL_CHROMIUM, else Debian's, else one on PATH."""
    given = os.environ.get(CHROMIUM_ENV)
    candidates = [given] if given else []
    candidates += ["/usr/bin/chromium"]
    candidates += [shutil.which(n) or "" for n in ("chromium", "chromium-browser", "chrome")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError(
        "no Chromium found: run `python3 scripts/bootstrap.py test` (it installs Debian's "
        f"chromium), or set {CHROMIUM_ENV} to a Chromium or Chrome executable"
    )


@contextlib.contextmanager
def browser_page(width: int = 1360, height: int = 900) -> Iterator[Page]:
    """A fresh page (own cookies and sessionStorage) in a headless Chromium, closed after."""
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(find_chromium()), headless=True, args=ARGS
        )
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            yield context.new_page()
        finally:
            browser.close()


def save_screenshot(page: Page, name: str) -> Path:
    """A full-page PNG under ``test-artifacts/``; its path."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path
