"""Resident companions against the real router: a tiny GGUF marked ``resident = true``
stays loaded, in the same process, while SmolLM2 and a second tiny model are switched
back and forth; it answers while a switch holds the active model's requests; a reload
that removes it unloads it; a router crash brings it back."""

from __future__ import annotations

import concurrent.futures
import os
import signal
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from hotmodel.router.options import devices
from tests.conftest import HotmodelProcess, chat, start_hotmodel, wait_until, write_config

pytestmark = pytest.mark.slow  # drives the real llama-server


def _config(
    folder: Path, real: dict[str, Path], tiny: dict[str, Path], router: str = "", extra: str = ""
) -> Path:
    presets = {"smollm2": real["smollm2"], "tiny2": tiny["tiny2"], "companion": tiny["tiny"]}
    config = write_config(
        folder, presets, "smollm2", router=router, extra=f'gpu_probe = "none"\n{extra}'
    )
    ini = folder / "models.ini"
    ini.write_text(
        ini.read_text().replace(
            f"model = {tiny['tiny']}", f"model = {tiny['tiny']}\nresident = true"
        )
    )
    return config


def router_models(hp: HotmodelProcess) -> dict[str, dict[str, Any]]:
    router = hp.status()["router"]
    assert isinstance(router, dict)
    data = httpx.get(router["url"] + "/models", headers=hp.router_auth(), timeout=10).json()
    return {m["id"]: m["status"] for m in data["data"]}


def child_pid(hp: HotmodelProcess, model: str) -> int:
    """The pid of ``model``'s own llama-server (the router's child on its port)."""
    args = router_models(hp)[model]["args"]
    port = args[args.index("--port") + 1]
    found = [
        p.pid
        for p in hp.descendants()
        if "--port" in (cmd := p.cmdline()) and cmd[cmd.index("--port") + 1] == str(port)
    ]
    assert len(found) == 1, (model, port, found)
    return found[0]


@pytest.mark.parametrize(("policy", "models_max"), [("zero_overlap", 1), ("overlap", 2)])
def test_a_resident_stays_loaded_in_one_process_across_switches(
    tmp_path: Path,
    real_models: dict[str, Path],
    tiny_models: dict[str, Path],
    llama_server: Path,
    policy: str,
    models_max: int,
) -> None:
    config = _config(
        tmp_path, real_models, tiny_models, f"models_max = {models_max}", f'policy = "{policy}"'
    )
    hp = start_hotmodel(config)
    try:
        status = hp.status()
        assert status["residents"] == {"companion": "loaded"}, status
        argv = status["router"]["argv"]  # type: ignore[index]
        spare = devices(llama_server) == ()  # a CPU-only build: room for an exiting process
        assert argv[argv.index("--models-max") + 1] == str(models_max + 1 + spare)
        listed = {m["id"]: m for m in httpx.get(hp.base_url + "/v1/models").json()["data"]}
        assert listed["companion"]["resident"] and not listed["smollm2"]["resident"]
        pid = child_pid(hp, "companion")
        for target in ("tiny2", "smollm2", "tiny2", "smollm2"):
            switched = httpx.post(
                hp.base_url + "/admin/switch", json={"model": target}, timeout=120
            )
            assert switched.status_code == 200, switched.text
            assert switched.json()["to"] == target
            models = router_models(hp)
            assert models["companion"]["value"] == "loaded", models
            assert child_pid(hp, "companion") == pid
        answer = chat(hp, "companion")
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "companion"
        refused = httpx.post(hp.base_url + "/admin/switch", json={"model": "companion"})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "model_resident"
        assert hp.status()["active_model"] == "smollm2"
        assert hp.status()["queues"] == {}  # the resident's request never queued

        # a reload that removes the resident unloads it; the others stay as they are
        ini = tmp_path / "models.ini"
        ini.write_text(ini.read_text().replace("resident = true", "resident = false"))
        reloaded = httpx.post(hp.base_url + "/admin/reload", timeout=120)
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json()["residents"] == {}
        models = router_models(hp)
        assert models["companion"]["value"] == "unloaded", models
        assert models["smollm2"]["value"] == "loaded", models
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        code = hp.stop()
    assert code == 0, hp.output()


def test_a_resident_answers_while_a_switch_holds_the_active_models_requests(
    tmp_path: Path, real_models: dict[str, Path], tiny_models: dict[str, Path], llama_server: Path
) -> None:
    """A long generation on SmolLM2 keeps a zero_overlap switch in its drain (the gate is
    closed: new requests for the active model wait); the resident is answered meanwhile."""
    extra = 'drain_timeout_action = "cancel"\ncancel_grace_seconds = 10'
    config = _config(tmp_path, real_models, tiny_models, extra=extra)
    text = config.read_text().replace(
        "[server]\n", "[server]\nswitch_drain_timeout_seconds = 20\n", 1
    )
    config.write_text(text)
    hp = start_hotmodel(config)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            long = pool.submit(chat, hp, "smollm2", max_tokens=4000, ignore_eos=True)
            wait_until("the long generation runs", lambda: hp.status()["in_flight"] == 1)
            switch = pool.submit(
                httpx.post, hp.base_url + "/admin/switch", json={"model": "tiny2"}, timeout=120
            )
            wait_until(
                "the switch closed the gate",
                lambda: httpx.get(hp.base_url + "/health").json()["status"] == "switching",
            )
            answer = chat(hp, "companion")
            # the switch was still draining when the resident answered
            assert not long.done() and not switch.done()
            assert httpx.get(hp.base_url + "/health").json()["status"] == "switching"
            assert answer.status_code == 200, answer.text
            assert switch.result().status_code == 200, switch.result().text
            long.result()
        assert hp.status()["active_model"] == "tiny2"

        # a router crash: the recovery brings the active model and the resident back
        pid = child_pid(hp, "companion")
        router_pid = hp.status()["router"]["pid"]  # type: ignore[index]
        os.kill(int(router_pid), signal.SIGKILL)
        wait_until(
            "the router and the resident are back",
            lambda: (
                hp.status()["router"]["pid"] != router_pid  # type: ignore[index]
                and hp.status()["residents"] == {"companion": "loaded"}
                and hp.status()["health"] == "ok"
            ),
        )
        assert router_models(hp)["companion"]["value"] == "loaded"
        assert child_pid(hp, "companion") != pid
        assert chat(hp, "companion").status_code == 200
    finally:
        code = hp.stop()
    assert code == 0, hp.output()


def test_a_resident_that_fails_to_load_is_shown_and_refused_and_the_rest_works(
    tmp_path: Path, real_models: dict[str, Path], tiny_models: dict[str, Path], llama_server: Path
) -> None:
    broken = {**tiny_models, "tiny": tiny_models["garbage"]}  # a GGUF llama.cpp cannot load
    hp = start_hotmodel(_config(tmp_path, real_models, broken))
    try:
        status = hp.status()
        assert status["residents"] == {"companion": "failed"}, status
        assert "companion" in status["resident_errors"]  # type: ignore[operator]
        refused = chat(hp, "companion")
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "resident_unavailable"
        assert "failed to load" in refused.json()["error"]["message"]
        assert chat(hp, "smollm2").status_code == 200
        switched = httpx.post(hp.base_url + "/admin/switch", json={"model": "tiny2"}, timeout=120)
        assert switched.status_code == 200, switched.text
    finally:
        code = hp.stop()
    assert code == 0, hp.output()
