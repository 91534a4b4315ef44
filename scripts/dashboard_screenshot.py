#!/usr/bin/env python3
"""Take the README's dashboard picture: a real switch on a running hotmodel, seen in /ui.

    python3 scripts/bootstrap.py demo                      # in one terminal
    .venv/bin/python scripts/dashboard_screenshot.py       # in another

It has a short conversation with the active model (session ``lisbon-trip``),
opens the dashboard in headless Chromium (tests/browser.py: Debian's
chromium, or $HOTMODEL_CHROMIUM), clicks the switch button of the other
model, waits until the page shows it active with its history row, opens the
session and saves the whole page to docs/dashboard.png. ``--key`` (or
``HOTMODEL_ADMIN_KEY``) gives the admin key when keys are set.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import httpx
from playwright.sync_api import expect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.browser: the same Chromium set-up as the tests

from tests.browser import browser_page  # noqa: E402

SESSION = "lisbon-trip"
TURNS = ["I am going to Lisbon in May.", "What should I pack?"]


def converse(client: httpx.Client, url: str) -> None:
    for turn in TURNS:
        resp = client.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": turn}], "max_tokens": 48},
            headers={"x-session-id": SESSION},
        )
        resp.raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:18080")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--key", default=os.environ.get("HOTMODEL_ADMIN_KEY", ""))
    args = parser.parse_args()
    headers = {"authorization": f"Bearer {args.key}"} if args.key else {}
    with httpx.Client(headers=headers, timeout=120) as client:
        status = client.get(args.url + "/admin/status").raise_for_status().json()
        converse(client, args.url)
    active = status["active_model"]
    target = next(name for name in status["presets"] if name != active)
    expect.set_options(timeout=120_000)
    with browser_page(width=1360, height=1000) as page:
        if args.key:  # the page keeps the key in sessionStorage, as after the prompt
            page.goto(args.url + "/ui/nope")
            page.evaluate("(key) => sessionStorage.setItem('hotmodel.adminKey', key)", args.key)
        page.goto(args.url + "/ui")
        expect(page.locator("#active-model")).to_have_text(active)
        page.get_by_role("button", name=f"Switch to {target}", exact=True).click()
        expect(page.locator("#active-model")).to_have_text(target)
        expect(page.locator("#history tbody tr").first).to_have_attribute("data-to", target)
        expect(page.locator("#switch-message")).to_contain_text(f"active: {target}")
        page.locator(f'#sessions tr[data-session="{SESSION}"]').click()
        expect(page.locator("#session-view .message.assistant").first).to_be_visible()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=True)
    print(f"switched {active} -> {target}; saved {args.out}")


if __name__ == "__main__":
    main()
