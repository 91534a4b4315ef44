"""What the benchmark scripts share: a demo config in a temporary folder and a
`hotmodel serve` child process that is healthy before use and stopped after."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from hotmodel.router import provision
from hotmodel.router.supervisor import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Served:
    config: Path
    base_url: str


def write_demo_config(folder: Path, default: str = "smollm2", extra: str = "") -> Path:
    """hotmodel.toml + models.ini for the two cached demo models, on a free port."""
    models = {m.key: provision.model_cache_path(m) for m in provision.DEMO_MODELS}
    (folder / "models.ini").write_text(
        "version = 1\n" + "".join(f"[{k}]\nmodel = {v}\n" for k, v in models.items())
    )
    path = folder / "hotmodel.toml"
    path.write_text(
        f'[server]\nport = {free_port("127.0.0.1")}\nstate_dir = "state"\n'
        f'[router]\nmodels_preset = "models.ini"\ndefault_model = "{default}"\n'
        f"ctx_size = 4096\n{extra}\n"
    )
    return path


def wait_healthy(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=1, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.01)


@contextlib.contextmanager
def serving(default: str = "smollm2", extra: str = "") -> Iterator[Served]:
    """`hotmodel serve` on the demo models in a temporary folder, healthy, stopped after."""
    with tempfile.TemporaryDirectory(prefix="hotmodel-bench-") as tmp:
        config = write_demo_config(Path(tmp), default, extra)
        port = config.read_text().split("port = ", 1)[1].split("\n", 1)[0]
        base = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "hotmodel", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(base, proc, "hotmodel serve")
            yield Served(config, base)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
