"""What the benchmark scripts share: a demo config in a temporary folder, a
`hotmodel serve` child process that is healthy before use and stopped after,
percentiles, and a description of the machine."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from hotmodel.presets import Presets, load_presets
from hotmodel.router import provision
from hotmodel.router.supervisor import free_port

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Served:
    config: Path
    base_url: str
    pid: int  # the hotmodel process (not its llama-server children)


def demo_presets() -> Presets:
    """The demo's presets (configs/demo.ini, paths resolved), so that a benchmark loads its
    models the way the demo does."""
    return load_presets(ROOT / "configs" / "demo.ini")


def demo_globals() -> dict[str, str]:
    """The demo presets' shared ``[*]`` options."""
    return dict(demo_presets().globals)


def write_demo_config(
    folder: Path, default: str = "smollm2", extra: str = "", shared: dict[str, str] | None = None
) -> Path:
    """hotmodel.toml + models.ini for the two cached demo models, on a free port, with the
    demo presets' options; the ``[*]`` ones are replaced by ``shared`` when given."""
    demo = demo_presets()
    options = dict(demo.globals) if shared is None else shared
    shared_ini = "".join(f"{k} = {v}\n" for k, v in options.items())
    entries = ""
    for m in provision.DEMO_MODELS:
        own = demo.models[m.key].options if m.key in demo.models else {}
        rest = "".join(f"{k} = {v}\n" for k, v in own.items() if k not in ("model", "m"))
        entries += f"[{m.key}]\nmodel = {provision.model_cache_path(m)}\n{rest}"
    (folder / "models.ini").write_text(f"version = 1\n[*]\n{shared_ini}{entries}")
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
            yield Served(config, base, proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summary(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p90_ms": round(pct(ms, 0.9), 3),
        "p99_ms": round(pct(ms, 0.99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
        "n": len(ms),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "gpus": _gpus(),
    }


def llama_cpp() -> dict[str, Any]:
    """The llama-server in use: the pinned llama.cpp build, or another one (PATH), and what
    the binary says of itself."""
    binary = provision.find_llama_server()
    try:
        said = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30
        )
        version = (said.stdout + said.stderr).strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        version = []
    pinned = binary.resolve() == provision.cached_llama_server().resolve()
    return {
        "version": (
            f"{provision.LLAMA_CPP_PACKAGE}=={provision.LLAMA_CPP_VERSION}"
            if pinned
            else f"llama-server at {binary}"
        ),
        "pinned_build": pinned,
        "binary": str(binary),
        "binary_version": [line for line in version if line.startswith(("version", "built"))],
    }
