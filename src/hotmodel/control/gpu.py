"""GPU memory probes: NVML when ``nvidia-ml-py`` is importable, else ``nvidia-smi``, else none.

A probe answers one question, "how much memory is in use on each GPU now?",
as a :class:`GpuReading`. Switches take readings around the unload and load
and wait for memory to settle after an unload (:func:`settled`). Parsing of
``nvidia-smi`` output is a pure function tested on literal samples.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from hotmodel.config import GpuProbeKind

log = logging.getLogger("hotmodel.gpu")

NVIDIA_SMI_QUERY = [
    "--query-gpu=index,name,memory.used,memory.total",
    "--format=csv,noheader,nounits",
]
_SMI_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class GpuDevice:
    index: int
    name: str
    used_mib: int
    total_mib: int


@dataclass(frozen=True, slots=True)
class GpuReading:
    """Memory use of every visible GPU at one moment."""

    devices: tuple[GpuDevice, ...]
    source: str

    @property
    def used_mib(self) -> int:
        return sum(d.used_mib for d in self.devices)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "used_mib": self.used_mib,
            "devices": [asdict(d) for d in self.devices],
        }


class GpuProbe(Protocol):
    name: str

    def read(self) -> GpuReading | None:
        """The memory in use now; None when it cannot be read."""
        ...


class NoGpu:
    name = "none"

    def read(self) -> GpuReading | None:
        return None


def parse_nvidia_smi(text: str) -> tuple[GpuDevice, ...]:
    """Parse ``nvidia-smi --query-gpu=index,name,memory.used,memory.total
    --format=csv,noheader,nounits`` output. Lines that do not parse are skipped
    (e.g. ``[N/A]`` values on some virtualized GPUs)."""
    devices = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 4:
            continue
        # A GPU name may itself contain commas: index first, two numbers last.
        index, used, total = parts[0], parts[-2], parts[-1]
        name = ", ".join(parts[1:-2])
        try:
            devices.append(GpuDevice(int(index), name, int(float(used)), int(float(total))))
        except ValueError:
            continue
    return tuple(devices)


class NvidiaSmiProbe:
    name = "nvidia-smi"

    def __init__(self, binary: str) -> None:
        self._binary = binary

    def read(self) -> GpuReading | None:
        try:
            out = subprocess.run(
                [self._binary, *NVIDIA_SMI_QUERY],
                capture_output=True,
                text=True,
                timeout=_SMI_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("nvidia-smi failed: %r", exc)
            return None
        if out.returncode != 0:
            log.warning("nvidia-smi exited %s: %s", out.returncode, out.stderr.strip()[:200])
            return None
        devices = parse_nvidia_smi(out.stdout)
        return GpuReading(devices, self.name) if devices else None


class NvmlProbe:
    """Reads memory through NVML (``nvidia-ml-py``, imported as ``pynvml``)."""

    name = "nvml"

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml

    def read(self) -> GpuReading | None:
        nvml = self._nvml
        try:
            devices = []
            for i in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(i)
                mem = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = nvml.nvmlDeviceGetName(handle)
                if isinstance(name, bytes):
                    name = name.decode()
                devices.append(GpuDevice(i, str(name), int(mem.used) >> 20, int(mem.total) >> 20))
        except Exception as exc:  # NVMLError has many subclasses; any means "no reading"
            log.warning("NVML read failed: %r", exc)
            return None
        return GpuReading(tuple(devices), self.name) if devices else None


def _load_nvml() -> Any | None:
    try:
        import pynvml  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no GPU
        log.debug("NVML unavailable: %r", exc)
        return None
    return pynvml


def detect_probe(kind: GpuProbeKind = "auto") -> GpuProbe:
    """The best probe available for ``kind``; ``NoGpu`` when there is none."""
    if kind in ("auto", "nvml") and (nvml := _load_nvml()) is not None:
        probe: GpuProbe = NvmlProbe(nvml)
        if probe.read() is not None:
            return probe
    if kind in ("auto", "nvidia-smi") and (smi := shutil.which("nvidia-smi")):
        probe = NvidiaSmiProbe(smi)
        if probe.read() is not None:
            return probe
    if kind not in ("auto", "none"):
        log.warning("GPU probe %r requested but not available; GPU readings will be null", kind)
    return NoGpu()


def settled(
    readings: Sequence[int], before_mib: int | None, baseline_mib: int | None, tolerance_mib: int
) -> bool:
    """Has GPU memory settled after an unload?

    ``readings`` are the used MiB read since the unload finished; ``before_mib``
    was read before the unload, ``baseline_mib`` before any model was loaded.
    Settled once the latest reading is back at the baseline, or once memory
    has fallen below ``before_mib`` and stopped falling (the last two readings
    within ``tolerance_mib``). Memory that never falls (another process holds
    it) is not settled: the caller's deadline ends that wait.
    """
    if not readings:
        return False
    last = readings[-1]
    if baseline_mib is not None and last <= baseline_mib + tolerance_mib:
        return True
    fell = before_mib is None or last < before_mib - tolerance_mib
    return fell and len(readings) >= 2 and readings[-2] - last <= tolerance_mib


# Memory is usually back by the first or second reading after the unload (the router
# answers once the child has exited); a fixed 100 ms poll cost every switch 100 ms
# on a GPU shared with another process (measured on an H200). Start fast, back off.
SETTLE_POLL_FIRST_S = 0.01
SETTLE_POLL_MAX_S = 0.1
# "Stopped falling" compares readings at least this far apart: two fast readings
# inside a short pause of a release must not pass for the end of it.
SETTLE_STABLE_S = 0.03


def _stable_window(readings: Sequence[int], times: Sequence[float]) -> list[int]:
    """The last reading, after the latest one taken :data:`SETTLE_STABLE_S` or more before
    it (only the last when there is none): what :func:`settled` compares."""
    for reading, at in zip(reversed(readings[:-1]), reversed(times[:-1]), strict=True):
        if times[-1] - at >= SETTLE_STABLE_S:
            return [reading, readings[-1]]
    return [readings[-1]]


async def wait_settled(
    probe: GpuProbe,
    after_unload: GpuReading,
    before_mib: int | None,
    baseline_mib: int | None,
    tolerance_mib: int,
    timeout: float,
) -> tuple[GpuReading, str | None]:
    """Read memory (after 10 ms, backing off to every 100 ms) until :func:`settled` or
    ``timeout`` (``[switch] settle_timeout_seconds``); the last reading, and a note when
    it gave up. Back at the baseline ends the wait at once; "stopped falling" needs two
    readings :data:`SETTLE_STABLE_S` apart."""
    readings = [after_unload.used_mib]
    times = [time.monotonic()]
    last = after_unload
    deadline = times[0] + timeout
    pause = SETTLE_POLL_FIRST_S
    while not settled(_stable_window(readings, times), before_mib, baseline_mib, tolerance_mib):
        if time.monotonic() >= deadline:
            return last, (
                f"memory still at {readings[-1]} MiB after {timeout:g}s "
                "([switch] settle_timeout_seconds); going on"
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, SETTLE_POLL_MAX_S)
        reading = await asyncio.to_thread(probe.read)
        if reading is None:
            break
        last = reading
        readings.append(reading.used_mib)
        times.append(time.monotonic())
    return last, None
