"""The dashboard in a real browser: headless Chromium (Debian's, via Playwright) on a real
hotmodel with two models on the real router.

A test opens ``/ui``, clicks a switch button, waits until the page shows the
new active model and the new history row, and leaves a screenshot in
``test-artifacts/``. Waits are bounded (Playwright's ``expect`` retries until
its timeout); nothing asserts how long anything took.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.browser import browser_page, save_screenshot
from tests.conftest import (
    HotmodelProcess,
    Serve,
    assert_all_gone,
    chat,
    keys,
    serving_hotmodel,
    start_hotmodel,
    switch,
    two_models,
    write_config,
)

pytestmark = pytest.mark.slow  # drives the real llama-server

ADMIN = "admin-key-browser-00000"
WAIT_MS = 60_000  # the bound on each wait for the page (a loaded CI machine is slow)
PNG = b"\x89PNG\r\n\x1a\n"
SOME_TEXT = re.compile(r"\S")  # an answer, whatever it says (SmolLM2 may reply in emoji only)

expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path], llama_server: Path
) -> Iterator[HotmodelProcess]:
    """Two tiny models: a switch takes milliseconds, and it is a real one."""
    folder = tmp_path_factory.mktemp("dashboard-browser")
    presets = {"tiny": tiny_models["tiny"], "tiny2": tiny_models["tiny2"]}
    hp = start_hotmodel(write_config(folder, presets, "tiny"))
    yield hp
    pids = hp.router_pids
    assert hp.stop() == 0, hp.output()
    assert_all_gone(pids)


@pytest.fixture
def page() -> Iterator[Page]:
    with browser_page() as opened:
        errors: list[str] = []
        opened.on("pageerror", lambda exc: errors.append(str(exc)))
        yield opened
        assert not errors, f"the page's JavaScript failed: {errors}"


def _other(hp: HotmodelProcess) -> tuple[str, str]:
    active = hp.status()["active_model"]
    assert isinstance(active, str)
    return active, "tiny2" if active == "tiny" else "tiny"


def _history_len(hp: HotmodelProcess) -> int:
    return len(httpx.get(hp.base_url + "/admin/switches").json()["data"])


def _open(page: Page, hp: HotmodelProcess, active: str) -> None:
    page.goto(hp.base_url + "/ui")
    expect(page.locator("#feed-state")).to_have_text("live")
    expect(page.locator("#active-model")).to_have_text(active)
    expect(page.locator("#history tbody tr")).to_have_count(_history_len(hp))


def test_switch_from_the_dashboard(server: HotmodelProcess, page: Page) -> None:
    chat = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hello dashboard"}], "max_tokens": 4},
        headers={"x-session-id": "browser-demo"},
        timeout=60,
    )
    assert chat.status_code == 200, chat.text
    active, target = _other(server)
    rows_before = _history_len(server)
    _open(page, server, active)
    expect(page.locator(f'#models tr[data-model="{active}"] .badge.active')).to_be_visible()
    expect(page.locator("#logs")).to_contain_text("llama")
    page.locator('#sessions tr[data-session="browser-demo"]').click()
    expect(page.locator("#session-view .message.user")).to_contain_text("hello dashboard")

    page.get_by_role("button", name=f"Switch to {target}", exact=True).click()

    expect(page.locator("#active-model")).to_have_text(target)
    new_row = page.locator(f'#history tbody tr[data-to="{target}"][data-outcome="ok"]').first
    expect(page.locator("#history tbody tr")).to_have_count(rows_before + 1)
    expect(page.locator("#history tbody tr").first).to_have_attribute("data-to", target)
    expect(new_row.locator('svg.phase-bar rect[data-phase="load"]')).to_have_count(1)
    expect(page.locator('#phases li[data-phase="load"].status-done')).to_be_visible()
    expect(page.locator("#switch-message")).to_contain_text(f"active: {target}")
    expect(page.locator(f'#models tr[data-model="{target}"] .badge.active')).to_be_visible()
    expect(page.get_by_role("button", name=f"Switch to {target}", exact=True)).to_be_disabled()
    expect(page.get_by_role("button", name=f"Switch to {active}", exact=True)).to_be_enabled()
    shot = save_screenshot(page, "dashboard-switch.png")

    assert server.status()["active_model"] == target  # the page did switch hotmodel
    data = shot.read_bytes()
    assert data.startswith(PNG) and len(data) > 20_000, (shot, len(data))


def test_a_switch_made_elsewhere_shows_up_live(server: HotmodelProcess, page: Page) -> None:
    active, target = _other(server)
    rows_before = _history_len(server)
    _open(page, server, active)
    resp = httpx.post(server.base_url + "/admin/switch", json={"model": target}, timeout=60)
    assert resp.status_code == 200, resp.text
    switch_id = resp.json()["id"]
    # nothing on the page was touched: the feed brought it
    expect(page.locator("#active-model")).to_have_text(target)
    expect(page.locator("#history tbody tr")).to_have_count(rows_before + 1)
    expect(page.locator("#history tbody tr").first).to_have_attribute("data-id", str(switch_id))
    expect(page.locator("#progress-title")).to_have_text(f"#{switch_id} {active} → {target}")
    expect(page.locator(f'#models tr[data-model="{target}"]')).to_have_attribute(
        "data-status", "loaded"
    )


def test_gpu_memory_is_drawn_per_switch(server: HotmodelProcess, page: Page) -> None:
    """No GPU here, so the chart's data is given to the page's own renderer."""
    _open(page, server, _other(server)[0])
    expect(page.locator("#gpu-chart")).to_contain_text("No GPU visible (probe: none)")
    snap = {"source": "nvml", "used_mib": 0, "devices": []}
    bars = page.evaluate(
        """(snap) => {
            const d = window.hotmodelDashboard;
            const gpu = {before_unload: {...snap, used_mib: 5000}, after_unload: {...snap,
                used_mib: 300}, after_settle: null, after_load: {...snap, used_mib: 2100}};
            d.state.history.set(9999, {id: 9999, from: "a", to: "b", outcome: "ok",
                total_ms: 10, phases: {load: 10}, gpu, started_at: null, policy: "x"});
            d.renderHistory();
            return [...document.querySelectorAll("#gpu-chart rect.gpu-bar")]
                .map((r) => r.querySelector("title").textContent);
        }""",
        snap,
    )
    assert bars == [
        "#9999 before_unload: 5000 MiB",
        "#9999 after_unload: 300 MiB",
        "#9999 after_load: 2100 MiB",
    ]


@pytest.fixture(scope="module")
def secured(serve_module: Serve, tiny_models: dict[str, Path]) -> HotmodelProcess:
    return serve_module({"tiny": tiny_models["tiny"]}, "tiny", tail=keys(admin=[ADMIN]))


def test_with_keys_the_page_asks_for_the_admin_key(secured: HotmodelProcess, page: Page) -> None:
    page.goto(secured.base_url + "/ui")
    expect(page.locator("#key-prompt")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()  # nothing is shown without the key

    page.locator("#key-input").fill("not-the-admin-key-0000")
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#key-error")).to_contain_text("valid API key")
    expect(page.locator("#dashboard")).to_be_hidden()

    page.locator("#key-input").fill(ADMIN)
    page.get_by_role("button", name="Use key").click()
    expect(page.locator("#key-prompt")).to_be_hidden()
    expect(page.locator("#feed-state")).to_have_text("live")
    expect(page.locator("#active-model")).to_have_text("tiny")
    expect(page.locator("#logs")).to_contain_text("llama")
    expect(page.locator("#sessions")).to_contain_text("No sessions yet.")
    assert page.evaluate("sessionStorage.getItem('hotmodel.adminKey')") == ADMIN
    page.reload()  # the key is kept for the tab: no second prompt
    expect(page.locator("#active-model")).to_have_text("tiny")
    expect(page.locator("#key-prompt")).to_be_hidden()
    # the playground's requests carry the key too (a native route, which needs one)
    _try(page, "tiny", "/tokenize")
    expect(page.locator("#try-answer")).to_contain_text("tokens")
    save_screenshot(page, "dashboard-keys.png")


def test_phases_that_ran_beside_the_load_get_a_lane_of_their_own(
    tmp_path: Path, real_models: dict[str, Path], llama_server: Path, page: Page
) -> None:
    """A CPU-only switch with KV snapshots saves and unloads the leaving model while the
    next one loads: the bar draws each phase where it ran (``phase_starts``), those beside
    the load below it. A real switch, its real report."""
    with two_models(tmp_path, real_models, extra="kv_snapshots = true") as hp:
        turn = chat(hp, session_id="lanes", max_tokens=2)  # a session in the slot: a save
        assert turn.status_code == 200, turn.text
        status, report = switch(hp, "gemma3")
        assert status == 200, report
        _open(page, hp, "gemma3")
        rects = page.evaluate(
            """(id) => [...document.querySelectorAll(
                `#history tbody tr[data-id="${id}"] svg.phase-bar rect`)].map((r) => [
                r.dataset.phase, r.dataset.lane, Number(r.getAttribute("x"))])""",
            report["id"],
        )
    lanes = {phase: lane for phase, lane, _ in rects}
    assert set(lanes) == set(report["phases"]), (rects, report["phases"])
    assert lanes == _lanes(report["phases"], report["phase_starts"]), report
    assert lanes["load"] == "main"
    assert lanes["save"] == "beside" and lanes["unload"] == "beside", report
    x = {phase: at for phase, _, at in rects}
    assert sorted(x, key=x.__getitem__) == sorted(x, key=report["phase_starts"].__getitem__)


def _lanes(phases: dict[str, float], starts: dict[str, float]) -> dict[str, str]:
    """charts.js's rule: a phase that starts before the main lane's last phase ended ran
    beside it."""
    lanes, main_end = {}, 0.0
    for phase in sorted(phases, key=starts.__getitem__):
        beside = starts[phase] < main_end - 0.5
        if not beside:
            main_end = starts[phase] + phases[phase]
        lanes[phase] = "beside" if beside else "main"
    return lanes


# --- the playground: each endpoint a model serves ---

EMBED = "smollm2-embed"


@pytest.fixture(scope="module")
def demo_like(
    tmp_path_factory: pytest.TempPathFactory, real_models: dict[str, Path], llama_server: Path
) -> Iterator[HotmodelProcess]:
    """SmolLM2, and its file as a resident embedding model (as configs/demo.ini has it)."""
    folder = tmp_path_factory.mktemp("dashboard-playground")
    config = write_config(folder, {"smollm2": real_models["smollm2"]}, "smollm2")
    with (folder / "models.ini").open("a", encoding="utf-8") as ini:
        ini.write(
            f"[{EMBED}]\nmodel = {real_models['smollm2']}\nembeddings = true\n"
            "pooling = mean\nresident = true\n"
        )
    with serving_hotmodel(config) as hp:
        yield hp


def _try(page: Page, model: str, endpoint: str, *, stream: bool = True) -> None:
    """Pick ``model`` and ``endpoint`` in the playground, send its example, wait for the end."""
    page.locator("#try-model").select_option(model)
    page.locator("#try-endpoint").select_option(endpoint)
    body = page.locator("#try-body")
    expect(body).to_have_value(re.compile(f'"model": "{re.escape(model)}"'))
    checkbox = page.locator("#try-stream")
    if checkbox.is_enabled():
        checkbox.set_checked(stream)
    result = page.locator("#try-result")
    sent = int(result.get_attribute("data-sent") or 0)
    page.get_by_role("button", name="Send", exact=True).click()
    expect(result).to_have_attribute("data-sent", str(sent + 1))
    expect(result).to_have_attribute("data-state", re.compile("^(done|failed)$"))
    assert result.get_attribute("data-state") == "done", page.locator("#try-status").text_content()


def test_the_playground_tries_each_endpoint(demo_like: HotmodelProcess, page: Page) -> None:
    base = demo_like.base_url
    served = {m["id"]: m["endpoints"] for m in httpx.get(base + "/v1/models").json()["data"]}
    page.goto(base + "/ui")
    expect(page.locator("#feed-state")).to_have_text("live")
    expect(page.locator("#try-model option")).to_have_count(2)

    # the picker offers what /v1/models says each model serves (and Responses for chat)
    page.locator("#try-model").select_option("smollm2")
    offered = page.locator("#try-endpoint option").evaluate_all("(os) => os.map((o) => o.value)")
    assert set(offered) - {"/v1/responses"} <= set(served["smollm2"]), offered
    assert {"/v1/chat/completions", "/v1/completions", "/tokenize", "/v1/responses"} <= set(offered)
    page.locator("#try-model").select_option(EMBED)
    offered = page.locator("#try-endpoint option").evaluate_all("(os) => os.map((o) => o.value)")
    assert offered == ["/v1/embeddings", "/tokenize", "/detokenize"], (offered, served[EMBED])

    answer = page.locator("#try-answer")
    _try(page, "smollm2", "/v1/chat/completions")  # streamed
    expect(answer).to_have_text(SOME_TEXT)
    expect(page.locator("#try-status")).to_contain_text("events")
    _try(page, "smollm2", "/v1/chat/completions", stream=False)
    expect(answer).to_have_text(SOME_TEXT)
    _try(page, "smollm2", "/v1/completions", stream=False)
    expect(answer).to_have_text(SOME_TEXT)
    _try(page, "smollm2", "/v1/completions")
    expect(answer).to_have_text(SOME_TEXT)
    _try(page, "smollm2", "/v1/messages")  # Anthropic's stream events
    expect(answer).to_have_text(SOME_TEXT)
    _try(page, "smollm2", "/v1/responses")  # the Responses stream events
    expect(answer).to_have_text(SOME_TEXT)

    tokens = httpx.post(base + "/tokenize", json={"content": "Hello, world!"}).json()["tokens"]
    _try(page, "smollm2", "/tokenize")
    expect(answer).to_contain_text(f"{len(tokens)} tokens")
    expect(answer).to_contain_text('"Hello"')
    _try(page, "smollm2", "/detokenize")  # the example holds the ids tokenize gave
    expect(page.locator("#try-body")).to_have_value(re.compile(str(tokens[-1])))
    expect(answer).to_have_text("Hello, world!")
    _try(page, "smollm2", "/apply-template")
    expect(answer).to_contain_text("Say hello in five words.")

    _try(page, EMBED, "/v1/embeddings")
    expect(answer).to_have_text(re.compile(r"^vector 0: 576 values \[-?\d\.\d{4}, "))
    expect(page.locator("#try-raw")).to_contain_text('"embedding"')
    save_screenshot(page, "dashboard-playground.png")

    # an error is shown as the API's message
    page.locator("#try-model").select_option("smollm2")
    page.locator("#try-endpoint").select_option("/tokenize")
    page.locator("#try-body").fill('{"model": "smollm2", "content": 5}')
    page.get_by_role("button", name="Send", exact=True).click()
    expect(page.locator("#try-result")).to_have_attribute("data-state", "failed")
    expect(page.locator("#try-status")).to_contain_text("HTTP 400")
    assert _history_len(demo_like) == 1  # the start's load only: the resident was no switch


def test_the_cluster_card_shows_the_nodes_only_in_a_cluster(
    server: HotmodelProcess,
    page: Page,
    tmp_path: Path,
    tiny_models: dict[str, Path],
    postgres_url: str,
) -> None:
    _open(page, server, _other(server)[0])
    expect(page.locator("#cluster-card")).to_be_hidden()  # a node of its own
    cluster = (
        f'[store]\nurl = "{postgres_url}"\n\n'
        '[cluster]\nnode_id = "gpu-1"\nkey = "a-cluster-key-for-the-tests"\n'
    )
    config = write_config(tmp_path, {"tiny": tiny_models["tiny"]}, "tiny", tail=cluster)
    with serving_hotmodel(config) as node:
        page.goto(node.base_url + "/ui")
        expect(page.locator("#cluster-card")).to_be_visible()
        row = page.locator('#cluster tr[data-node="gpu-1"]')
        expect(row).to_contain_text("gpu-1 (this)")
        expect(row).to_contain_text("alive")
        expect(row).to_contain_text("tiny")
        save_screenshot(page, "dashboard-cluster.png")
