"""The dashboard's HTTP side against a real hotmodel on the real router: the page's files,
the live feed ``GET /admin/events``, ``GET /admin/logs``, and all of it with keys set.
(The page itself, in a real browser, is tests/test_ui_browser.py.)"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hotmodel.sse import SseEvent, SseParser
from tests.conftest import (
    HotmodelProcess,
    Serve,
    keys,
    serving_hotmodel,
    start_hotmodel,
    switched,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.slow  # drives the real llama-server

ADMIN = "admin-key-dashboard-0000"
CLIENT = "client-key-dashboard-000"
WAIT_S = 60.0  # a bound on every wait below, not an expected duration


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path], llama_server: Path
) -> Iterator[HotmodelProcess]:
    folder = tmp_path_factory.mktemp("dashboard-api")
    config = write_config(
        folder, {"tiny": tiny_models["tiny"], "tiny2": tiny_models["tiny2"]}, "tiny"
    )
    with serving_hotmodel(config) as hp:
        yield hp


class FeedReader:
    """``GET /admin/events`` read in a thread; events arrive on a queue (None: it ended)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.events: queue.Queue[SseEvent | None] = queue.Queue()
        self.error: BaseException | None = None
        self.status_code = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, headers or {}), daemon=True)
        self._thread.start()

    def _run(self, url: str, headers: dict[str, str]) -> None:
        parser = SseParser()
        try:
            with httpx.stream("GET", url + "/admin/events", headers=headers, timeout=WAIT_S) as r:
                self.status_code = r.status_code
                for chunk in r.iter_raw():
                    for event in parser.feed(chunk):
                        self.events.put(event)
                    if self._stop.is_set():
                        return
        except BaseException as exc:
            self.error = exc
        finally:
            self.events.put(None)

    def next(self, kind: str | None = None) -> SseEvent:
        """The next event (of ``kind``, skipping others); fails if the stream ended first."""
        deadline = time.monotonic() + WAIT_S
        while True:
            event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            assert event is not None, f"the stream ended: {self.error!r}"
            if kind is None or event.event == kind:
                return event

    def close(self) -> None:
        self._stop.set()
        self._thread.join(WAIT_S)

    def ended(self) -> bool:
        """Waits for the end of the stream; True when it ended without an error."""
        while (event := self.events.get(timeout=WAIT_S)) is not None:
            assert event.event in ("status", "phase", "report", "model"), event
        self._thread.join(WAIT_S)
        return self.error is None


def test_the_page_and_its_files_are_served_from_the_package(server: HotmodelProcess) -> None:
    page = httpx.get(server.base_url + "/ui")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/ui/app.js"' in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # no CDN, nothing from outside
    assert httpx.get(server.base_url + "/ui/").text == page.text
    for name in ("app.js", "charts.js", "dom.js", "net.js", "playground.js"):
        asset = httpx.get(f"{server.base_url}/ui/{name}")
        assert asset.status_code == 200
        assert asset.headers["content-type"].startswith("text/javascript")
        assert "https://" not in asset.text
    css = httpx.get(server.base_url + "/ui/style.css")
    assert css.headers["content-type"].startswith("text/css") and "@import" not in css.text
    for missing in ("/ui/nope.js", "/ui/..%2Fpyproject.toml", "/ui/__init__.py"):
        resp = httpx.get(server.base_url + missing)
        assert resp.status_code == 404, missing
        assert resp.json()["error"]["code"] == "not_found"


def test_feed_starts_with_status_then_follows_aswitched(server: HotmodelProcess) -> None:
    reader = FeedReader(server.base_url)
    try:
        first = reader.next()
        assert first.event == "status"
        status = first.json()
        assert set(status) == set(server.status())  # the body of GET /admin/status
        before = status["active_model"]
        target = "tiny2" if before == "tiny" else "tiny"
        report = switched(server, target)
        seen: list[SseEvent] = []
        while not (seen and seen[-1].event == "report"):
            seen.append(reader.next())
        after = reader.next()
    finally:
        reader.close()
    assert report["outcome"] == "ok"
    assert after.event == "status" and after.json()["active_model"] == target
    kinds = [e.event for e in seen]
    # a status before the new command's first phase says where it goes
    assert kinds[0] == "status" and seen[0].json()["switch"]["current"]["to"] == target
    phases = [e.json() for e in seen if e.event == "phase"]
    assert {p["switch_id"] for p in phases} == {report["id"]}
    assert {"phase": "load", "status": "done"}.items() <= next(
        p for p in phases if p["phase"] == "load" and p["status"] == "done"
    ).items()
    assert seen[-1].json() == report  # the same report the switch answered
    models = [e.json() for e in seen if e.event == "model"]
    assert {"model": target, "status": "loaded"}.items() <= next(
        m for m in models if m["model"] == target and m["status"] == "loaded"
    ).items()


def test_a_client_that_leaves_is_unsubscribed(server: HotmodelProcess) -> None:
    # an earlier test's closed feed is unsubscribed in the background: none is left first
    wait_until("earlier feeds gone", lambda: server.status()["dashboard_streams"] == 0)
    base = 0
    reader = FeedReader(server.base_url)
    reader.next("status")
    assert server.status()["dashboard_streams"] == base + 1
    reader.close()  # the connection closes while no event is due
    deadline = time.monotonic() + WAIT_S
    while server.status()["dashboard_streams"] != base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.status()["dashboard_streams"] == base


def test_logs_tail_the_router_log(server: HotmodelProcess) -> None:
    resp = httpx.get(server.base_url + "/admin/logs", params={"lines": 3})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    log_file = Path(body["file"])
    router = server.status()["router"]
    assert isinstance(router, dict) and log_file == Path(router["log_file"])
    assert body["lines"] == log_file.read_text(errors="replace").splitlines()[-3:]
    default = httpx.get(server.base_url + "/admin/logs").json()["lines"]
    assert 3 < len(default) <= 200
    assert any("llama" in line or "srv" in line for line in default)


@pytest.mark.parametrize("lines", ["0", "5001", "-5", "1.5", "", "ten", "99999999999"])
def test_logs_refuse_a_bad_line_count(server: HotmodelProcess, lines: str) -> None:
    resp = httpx.get(server.base_url + "/admin/logs", params={"lines": lines})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "lines"


def test_the_feed_ends_cleanly_when_hotmodel_stops(
    tmp_path: Path, tiny_models: dict[str, Path], llama_server: Path
) -> None:
    """An open dashboard must not hold up the stop: its stream is ended, not cut."""
    hp = start_hotmodel(write_config(tmp_path, {"tiny": tiny_models["tiny"]}, "tiny"))
    try:
        reader = FeedReader(hp.base_url)
        reader.next("status")
    finally:
        code = hp.stop()
    assert code == 0, hp.output()
    assert reader.ended(), reader.error  # a complete response, not a dropped connection


@pytest.fixture(scope="module")
def secured(serve_module: Serve, tiny_models: dict[str, Path]) -> HotmodelProcess:
    return serve_module(
        {"tiny": tiny_models["tiny"]}, "tiny", tail=keys(api=[CLIENT], admin=[ADMIN])
    )


def test_with_keys_the_page_is_open_and_its_data_needs_the_admin_key(
    secured: HotmodelProcess,
) -> None:
    base = secured.base_url
    assert httpx.get(base + "/ui").status_code == 200  # static, no data: a browser loads it
    assert httpx.get(base + "/ui/app.js").status_code == 200
    for path in ("/admin/events", "/admin/logs"):
        assert httpx.get(base + path).status_code == 401
        client = httpx.get(base + path, headers={"authorization": f"Bearer {CLIENT}"})
        assert client.status_code == 403
        assert client.json()["error"]["code"] == "admin_key_required"
    admin = {"authorization": f"Bearer {ADMIN}"}
    assert httpx.get(base + "/admin/logs", headers=admin).status_code == 200
    assert httpx.get(base + "/v1/sessions", headers=admin).status_code == 200  # the page reads it
    reader = FeedReader(base, admin)
    try:
        first = reader.next()
    finally:
        reader.close()
    assert reader.status_code == 200
    assert first.event == "status" and first.json()["active_model"] == "tiny"
