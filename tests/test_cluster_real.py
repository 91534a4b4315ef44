"""Two and three hotmodel nodes on one real PostgreSQL, each with its own llama-server:
the registry, requests placed on the node that has the model, one load for a burst."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from hotmodel.cluster.postgres import LocalPostgres
from hotmodel.router.supervisor import free_port
from tests.conftest import (
    HotmodelProcess,
    assert_all_gone,
    bearer,
    chat,
    keys,
    last_switch,
    serving_hotmodel,
    start_hotmodel,
    switch,
    wait_until,
    write_config,
)
from tests.tiny_gguf import write_tiny_model

pytestmark = pytest.mark.slow  # drives the real llama-server

KEY = "a-cluster-key-for-the-tests"


def node_config(
    folder: Path, name: str, url: str, models: dict[str, Path], default: str, kv: bool = False
) -> Path:
    return write_config(
        folder / name,
        models,
        default,
        router="parallel = 1" if kv else "",
        extra="auto = true" + ("\nkv_snapshots = true" if kv else ""),
        tail=(
            f'[store]\nurl = "{url}"\n\n'
            f'[cluster]\nnode_id = "{name}"\nkey = "{KEY}"\n'
            "heartbeat_seconds = 0.3\ndead_after_seconds = 3\n"
        ),
    )


@pytest.fixture
def three_models(tiny_models: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    return {
        "t1": tiny_models["tiny"],
        "t2": tiny_models["tiny2"],
        "t3": write_tiny_model(tmp_path / "tiny3.gguf", seed=2),
    }


@contextlib.contextmanager
def two_nodes(
    tmp_path: Path, url: str, models: dict[str, Path]
) -> Iterator[tuple[HotmodelProcess, HotmodelProcess]]:
    """Node a (t1 loaded) and node b (t2 loaded), both seeing each other."""
    with (
        serving_hotmodel(node_config(tmp_path, "a", url, models, "t1")) as a,
        serving_hotmodel(node_config(tmp_path, "b", url, models, "t2")) as b,
    ):
        for node in (a, b):  # each seen alive, with its model loaded (not just registered)
            wait_until("both nodes registered", lambda n=node: ready(n) == {"a", "b"})  # type: ignore[misc]
        yield a, b


def ready(hp: HotmodelProcess) -> set[str]:
    """The nodes ``hp`` sees alive with a model loaded."""
    return {n["id"] for n in cluster(hp)["nodes"] if n["alive"] and n["loaded"]}


def cluster(hp: HotmodelProcess) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(hp.base_url + "/admin/cluster", timeout=10).json()
    return data


def alive(hp: HotmodelProcess) -> list[str]:
    return [n["id"] for n in cluster(hp)["nodes"] if n["alive"]]


def switches(hp: HotmodelProcess) -> list[str]:
    data = httpx.get(hp.base_url + "/admin/switches", timeout=10).json()["data"]
    return [r["to"] for r in data if r["outcome"] == "ok"]


def test_each_node_lists_both_and_a_model_is_served_where_it_is_loaded(
    tmp_path: Path, postgres_url: str, three_models: dict[str, Path]
) -> None:
    with two_nodes(tmp_path, postgres_url, three_models) as (a, b):
        for hp, me in ((a, "a"), (b, "b")):
            seen = cluster(hp)
            assert seen["enabled"] and seen["self"] == me
            assert {n["id"]: n["loaded"][:1] for n in seen["nodes"]} == {"a": ["t1"], "b": ["t2"]}
        before_b = switches(b)
        for stream in (False, True):
            answer = chat(b, "t1", stream=stream)  # only a has t1
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-hotmodel-node"] == "a"
        assert chat(b, "t2").headers["x-hotmodel-node"] == "b"  # its own: served there
        assert switches(b) == before_b  # b never switched to serve t1
        assert switches(a) == ["t1"]


def test_a_burst_for_a_model_no_node_has_loads_it_once_on_one_node(
    tmp_path: Path, postgres_url: str, three_models: dict[str, Path]
) -> None:
    with two_nodes(tmp_path, postgres_url, three_models) as (a, b):
        answers: list[httpx.Response] = []

        def ask(hp: HotmodelProcess) -> None:
            answers.append(chat(hp, "t3", timeout=180))

        threads = [threading.Thread(target=ask, args=(hp,)) for hp in [a, b] * 10]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [r.status_code for r in answers] == [200] * 20, [r.text for r in answers]
        served = {r.headers["x-hotmodel-node"] for r in answers}
        assert len(served) == 1, served  # one node served them all
        loads = switches(a).count("t3") + switches(b).count("t3")
        assert loads == 1  # loaded once, on one node


def test_a_forward_with_a_wrong_cluster_key_is_refused(
    tmp_path: Path, postgres_url: str, three_models: dict[str, Path]
) -> None:
    config = node_config(tmp_path, "solo", postgres_url, three_models, "t1", kv=True)
    with serving_hotmodel(config) as hp:
        refused = httpx.post(
            hp.base_url + "/v1/chat/completions",
            json={"model": "t1", "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-hotmodel-cluster-key": "not-the-key"},
            timeout=30,
        )
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "cluster_key_invalid"
        kv = hp.base_url + "/cluster/kv/"
        assert httpx.get(kv + "kv-0123456789abcdef.bin", timeout=10).status_code == 403
        key = {"x-hotmodel-cluster-key": KEY}
        for name in ("kv-0123456789abcdef.bin", "..%2Fhotmodel.toml", "sessions.sqlite3"):
            assert httpx.get(kv + name, headers=key, timeout=10).status_code == 404, name


def test_a_node_not_in_a_cluster_says_so(tmp_path: Path, three_models: dict[str, Path]) -> None:
    port = free_port("127.0.0.1")
    with serving_hotmodel(write_config(tmp_path, three_models, "t1", port=port)) as hp:
        assert cluster(hp) == {"enabled": False, "self": None, "nodes": []}


def test_a_node_killed_mid_stream_loses_no_request_that_had_not_begun(
    tmp_path: Path, postgres_url: str, real_models: dict[str, Path]
) -> None:
    """Node a serves smollm2, b gemma3. Through b: one long stream and three plain
    requests for smollm2, all forwarded to a. a is killed (-9) mid-stream: the stream
    ends with an error event after what it had received; the three, which had no answer
    yet, complete on b, each turn in b's store."""
    models = {"smollm2": real_models["smollm2"], "gemma3": real_models["gemma3"]}
    a = start_hotmodel(node_config(tmp_path, "a", postgres_url, models, "smollm2"))
    leftovers = list(a.router_pids)
    try:
        with serving_hotmodel(node_config(tmp_path, "b", postgres_url, models, "gemma3")) as b:
            wait_until("both nodes registered", lambda: ready(b) == {"a", "b"})
            results: dict[str, httpx.Response] = {}

            def ask(session: str) -> None:
                results[session] = chat(
                    b, "smollm2", timeout=300, session_id=session, max_tokens=8,
                    messages=[{"role": "user", "content": f"Say {session}."}],
                )  # fmt: skip

            with httpx.stream(
                "POST",
                b.base_url + "/v1/chat/completions",
                json={
                    "model": "smollm2",
                    "stream": True,
                    "max_tokens": 1000,
                    "ignore_eos": True,  # still streaming when a is killed, however it goes
                    "messages": [{"role": "user", "content": "Count to one hundred."}],
                },
                timeout=300,
            ) as stream:
                assert stream.headers["x-hotmodel-node"] == "a"
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                waiting = [threading.Thread(target=ask, args=(f"s{i}",)) for i in range(3)]
                for t in waiting:
                    t.start()
                wait_until("the three queued on a", lambda: busy(a) >= 3)
                os.kill(a.proc.pid, signal.SIGKILL)
                rest = list(lines)
            assert any('"node_lost"' in line for line in rest), rest[-3:]
            for t in waiting:
                t.join()
            for session, answer in results.items():
                assert answer.status_code == 200, answer.text
                assert answer.headers["x-hotmodel-node"] == "b"
                stored = httpx.get(f"{b.base_url}/v1/sessions/{session}", timeout=10).json()
                assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
            assert len(results) == 3
    finally:
        a.proc.kill()
        for pid in leftovers:  # a's llama-server, orphaned by the kill
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def busy(hp: HotmodelProcess) -> int:
    """Requests admitted or waiting upstream on ``hp`` (its /admin/status)."""
    status = hp.status()
    waiting = status.get("upstream_waiting") or {}
    assert isinstance(waiting, dict)
    return int(str(status["in_flight"])) + sum(int(v) for v in waiting.values())


def test_with_postgres_down_each_node_serves_on_its_own_and_comes_back(
    tmp_path: Path, three_models: dict[str, Path]
) -> None:
    base = Path(tempfile.mkdtemp(prefix="hotmodel-pg-down-"))
    base.chmod(0o711)
    server = LocalPostgres(base / "data")
    try:
        url = server.start()
        with two_nodes(tmp_path, url, three_models) as (a, b):
            server.stop()
            wait_until("a's registry error", lambda: cluster(a)["error"])
            for hp, model in ((a, "t1"), (b, "t2"), (b, "t1")):
                answer = chat(hp, model)  # b's t1: forwarded while b still trusts its
                assert answer.status_code == 200, answer.text  # snapshot, else served by b
            wait_until("b counts only itself", lambda: alive(b) == ["b"])
            answer = chat(b, "t3")  # no claim can be made: b loads it itself
            assert (answer.status_code, answer.headers["x-hotmodel-node"]) == (200, "b")
            server.start()  # the same port: the pools connect again
            wait_until("both back", lambda: len(alive(a)) == 2 and cluster(a)["error"] is None)
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def sessions_of(hp: HotmodelProcess, session: str) -> list[str]:
    found = httpx.get(f"{hp.base_url}/v1/sessions/{session}", timeout=10)
    assert found.status_code == 200, found.text
    return [m["role"] for m in found.json()["messages"]]


def test_a_session_started_on_one_node_continues_on_another_with_its_kv_snapshot(
    tmp_path: Path, postgres_url: str, real_models: dict[str, Path]
) -> None:
    """a (smollm2) holds session s; a switches away, keeping s's KV snapshot. Asked of b,
    smollm2 is loaded by b (no node has it): b fetches a's snapshot of s, checks it and
    restores it. Then a stops: s goes on at b, its whole history in the shared store."""
    models = {"smollm2": real_models["smollm2"], "gemma3": real_models["gemma3"]}
    with (
        serving_hotmodel(node_config(tmp_path, "a", postgres_url, models, "smollm2", kv=True)) as a,
        serving_hotmodel(node_config(tmp_path, "b", postgres_url, models, "gemma3", kv=True)) as b,
    ):
        wait_until("both nodes registered", lambda: ready(b) == {"a", "b"})
        history = [{"role": "user", "content": "My name is Ada. " * 20 + "Say hi."}]
        first = chat(a, "smollm2", session_id="s", messages=history, max_tokens=8)
        assert (first.status_code, first.headers["x-hotmodel-node"]) == (200, "a"), first.text
        assert switch(a, "gemma3")[0] == 200  # a keeps s's KV for smollm2 on the way out
        wait_until("a's snapshot published", lambda: "smollm2" not in loaded(b, "a"))
        second = chat(b, "smollm2", session_id="s", max_tokens=4,
                      messages=[{"role": "user", "content": "And now?"}])  # fmt: skip
        assert (second.status_code, second.headers["x-hotmodel-node"]) == (200, "b"), second.text
        restore = last_switch(b)["snapshot"]["restore"]
        assert restore["restored"] and restore["fetched_from"] == "a", restore
        assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 100
        assert sessions_of(b, "s") == ["user", "assistant"] * 2
    # (both stopped) a's turn and b's are in the one store: a third node would see them


def test_a_session_continues_on_another_node_after_its_node_stopped(
    tmp_path: Path, postgres_url: str, three_models: dict[str, Path]
) -> None:
    with two_nodes(tmp_path, postgres_url, three_models) as (a, b):
        first = chat(a, "t1", session_id="s", max_tokens=4)
        assert (first.status_code, first.headers["x-hotmodel-node"]) == (200, "a")
        a.stop()
        wait_until("b alone", lambda: alive(b) == ["b"])
        second = chat(b, "t1", session_id="s", max_tokens=4)
        assert (second.status_code, second.headers["x-hotmodel-node"]) == (200, "b"), second.text
        assert sessions_of(b, "s") == ["user", "assistant"] * 2


def loaded(hp: HotmodelProcess, node_id: str) -> list[str]:
    found = [n["loaded"] for n in cluster(hp)["nodes"] if n["id"] == node_id]
    return list(found[0]) if found else []


def test_a_clients_key_works_on_every_node_and_a_wrong_one_is_refused_where_it_lands(
    tmp_path: Path, postgres_url: str, three_models: dict[str, Path]
) -> None:
    secured = keys(api=["client-key-cluster-000001"], admin=["admin-key-cluster-0000001"])
    configs = []
    for name, default in (("a", "t1"), ("b", "t2")):
        config = node_config(tmp_path, name, postgres_url, three_models, default)
        config.write_text(config.read_text() + "\n" + secured, encoding="utf-8")
        configs.append(config)
    admin = bearer("admin-key-cluster-0000001")
    with serving_hotmodel(configs[0]) as a, serving_hotmodel(configs[1]) as b:
        wait_until(
            "both nodes registered",
            lambda: (
                sum(
                    bool(n["alive"] and n["loaded"])
                    for n in httpx.get(b.base_url + "/admin/cluster", headers=admin).json()["nodes"]
                )
                == 2
            ),
        )
        ok = chat(b, "t1", key="client-key-cluster-000001", session="mine")
        assert (ok.status_code, ok.headers["x-hotmodel-node"]) == (200, "a"), ok.text
        refused = chat(b, "t1", key="not-a-key-of-this-cluster", session="mine")
        assert refused.status_code == 401  # at b's door: never forwarded
        assert "x-hotmodel-node" not in refused.headers or refused.headers["x-hotmodel-node"] == "b"
        # the session is the key's wherever it is read
        mine = httpx.get(
            b.base_url + "/v1/sessions/mine", headers=bearer("client-key-cluster-000001")
        )
        assert mine.status_code == 200 and len(mine.json()["messages"]) == 2
        assert httpx.get(a.base_url + "/v1/sessions/mine", headers=admin).status_code == 404


ROOT = Path(__file__).resolve().parent.parent
DEMO_NODES = ("http://127.0.0.1:18080", "http://127.0.0.1:18081")


def start_cluster_demo(log: Path) -> subprocess.Popen[bytes]:
    """``python3 scripts/bootstrap.py cluster`` as the README says (its own session: only
    it gets the signals sent to it)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(ROOT / "scripts" / "bootstrap.py"), "cluster"],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def demo_ready(demo: subprocess.Popen[bytes], log: Path) -> bool:
    assert demo.poll() is None, log.read_text(errors="replace")
    try:
        found = httpx.get(DEMO_NODES[1] + "/admin/cluster", timeout=5).json()["nodes"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    loaded = {n["id"]: n["loaded"] for n in found if n["alive"]}
    return "smollm2" in loaded.get("node-a", []) and "gemma3" in loaded.get("node-b", [])


@pytest.mark.timeout(900)
def test_the_cluster_demo_serves_two_nodes_and_stops_whole_even_after_a_kill(
    tmp_path: Path, real_models: dict[str, Path]
) -> None:
    """The README's cluster command: both nodes list each other and share work; killed
    outright, its nodes still stop (tied to it) and the next start cleans up after it;
    Ctrl-C stops the nodes, their llama-servers and PostgreSQL."""
    log = tmp_path / "cluster-demo.log"
    demo = start_cluster_demo(log)
    try:
        wait_until("the cluster demo", lambda: demo_ready(demo, log), timeout=600)
        answer = httpx.post(
            DEMO_NODES[0] + "/v1/chat/completions",
            json={
                "model": "gemma3",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
            },
            timeout=120,
        )
        assert (answer.status_code, answer.headers["x-hotmodel-node"]) == (200, "node-b")
        nodes = psutil.Process(demo.pid).children(recursive=True)
        demo.kill()  # no chance to stop anything itself
        demo.wait(10)
        assert_all_gone([p.pid for p in nodes if "postgres" not in p.name()], timeout=120)

        demo = start_cluster_demo(log)  # PostgreSQL, left running, is ours to restart
        wait_until("the cluster demo again", lambda: demo_ready(demo, log), timeout=600)
        nodes = psutil.Process(demo.pid).children(recursive=True)
        demo.send_signal(signal.SIGINT)
        assert demo.wait(120) == 0, log.read_text(errors="replace")[-3000:]
        assert_all_gone([p.pid for p in nodes])
        assert not (ROOT / ".hotmodel" / "cluster" / "postgres" / "postmaster.pid").exists()
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(120)
            except subprocess.TimeoutExpired:
                demo.kill()
