"""GPU probes: nvidia-smi parsing on literal outputs, the NVML path with a fake module.

No GPU is visible on the test machine; what cannot be real here is faked:
the NVML library object and an ``nvidia-smi`` executable that prints a sample.
"""

from __future__ import annotations

import asyncio
import stat
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hotmodel.control import gpu
from hotmodel.control.gpu import (
    GpuDevice,
    GpuReading,
    NoGpu,
    NvidiaSmiProbe,
    NvmlProbe,
    parse_nvidia_smi,
    settled,
)

# Literal outputs of `nvidia-smi --query-gpu=index,name,memory.used,memory.total
# --format=csv,noheader,nounits`.
ONE_H100 = "0, NVIDIA H100 80GB HBM3, 1, 81559\n"
TWO_GPUS = "0, NVIDIA GeForce RTX 4090, 18211, 24564\n1, NVIDIA GeForce RTX 3060, 512, 12288\n"
COMMA_NAME = "0, NVIDIA A100-SXM4-40GB, MIG 1g.5gb, 300, 4864\n"
WITH_NA = "0, GRID T4-16Q, [N/A], [N/A]\n1, Tesla T4, 250, 15360\n"


def test_parse_one_gpu() -> None:
    assert parse_nvidia_smi(ONE_H100) == (GpuDevice(0, "NVIDIA H100 80GB HBM3", 1, 81559),)


def test_parse_two_gpus() -> None:
    devices = parse_nvidia_smi(TWO_GPUS)
    assert [d.index for d in devices] == [0, 1]
    assert devices[0].used_mib == 18211 and devices[1].total_mib == 12288


def test_parse_name_with_commas() -> None:
    (dev,) = parse_nvidia_smi(COMMA_NAME)
    assert dev.name == "NVIDIA A100-SXM4-40GB, MIG 1g.5gb"
    assert (dev.used_mib, dev.total_mib) == (300, 4864)


def test_parse_skips_unreadable_lines() -> None:
    assert parse_nvidia_smi(WITH_NA) == (GpuDevice(1, "Tesla T4", 250, 15360),)
    assert parse_nvidia_smi("") == ()
    assert parse_nvidia_smi("NVIDIA-SMI has failed because it couldn't communicate\n") == ()


@pytest.mark.skipif(sys.platform == "win32", reason="the fake nvidia-smi is a shell script")
def test_nvidia_smi_probe_runs_the_binary(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\ncat <<'EOF'\n" + TWO_GPUS + "EOF\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    snap = NvidiaSmiProbe(str(fake)).read()
    assert snap is not None
    assert snap.used_mib == 18211 + 512
    assert snap.to_json()["devices"][1]["name"] == "NVIDIA GeForce RTX 3060"


@pytest.mark.skipif(sys.platform == "win32", reason="the fake nvidia-smi is a shell script")
def test_nvidia_smi_probe_failure_is_no_reading(tmp_path: Path) -> None:
    assert NvidiaSmiProbe(str(tmp_path / "missing")).read() is None
    failing = tmp_path / "fail"
    failing.write_text("#!/bin/sh\necho 'driver not loaded' >&2\nexit 9\n")
    failing.chmod(0o755)
    assert NvidiaSmiProbe(str(failing)).read() is None


class FakeNvml:
    def __init__(self, used: list[int], fail: bool = False) -> None:
        self.used = used
        self.fail = fail

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802 (NVML's names)
        if self.fail:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return len(self.used)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:  # noqa: N802
        return SimpleNamespace(used=self.used[handle] << 20, total=81559 << 20)

    def nvmlDeviceGetName(self, handle: int) -> bytes:  # noqa: N802
        return b"NVIDIA H100 80GB HBM3"


def test_nvml_probe() -> None:
    snap = NvmlProbe(FakeNvml([1000, 24])).read()
    assert snap is not None
    assert snap.used_mib == 1024
    assert snap.devices[0] == GpuDevice(0, "NVIDIA H100 80GB HBM3", 1000, 81559)
    assert snap.source == "nvml"


def test_nvml_errors_are_no_reading() -> None:
    assert NvmlProbe(FakeNvml([1], fail=True)).read() is None


def test_detect_probe_without_gpu_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "_load_nvml", lambda: None)
    monkeypatch.setenv("PATH", "")
    assert isinstance(gpu.detect_probe("auto"), NoGpu)
    assert isinstance(gpu.detect_probe("nvidia-smi"), NoGpu)
    assert NoGpu().read() is None


def test_detect_probe_prefers_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "_load_nvml", lambda: FakeNvml([5]))
    assert gpu.detect_probe("auto").name == "nvml"
    assert isinstance(gpu.detect_probe("none"), NoGpu)


@pytest.mark.skipif(sys.platform == "win32", reason="the fake nvidia-smi is a shell script")
def test_detect_probe_falls_back_to_nvidia_smi(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '0, NVIDIA L4, 100, 23034'\n")
    fake.chmod(0o755)
    monkeypatch.setattr(gpu, "_load_nvml", lambda: None)
    monkeypatch.setenv("PATH", str(tmp_path))
    probe = gpu.detect_probe("auto")
    assert probe.name == "nvidia-smi"
    snap = probe.read()
    assert snap is not None and snap.used_mib == 100


@pytest.mark.parametrize(
    ("readings", "before", "baseline", "expected"),
    [
        ([], 8000, None, False),
        ([8000], 8000, None, False),  # one reading: cannot tell
        ([900, 880], 8000, None, False),  # still falling by more than the tolerance
        ([900, 890], 8000, None, True),  # fell, then steady
        ([8000, 8000], 8000, None, False),  # never fell: not settled
        ([310], 8000, 300, True),  # back at the baseline
        ([400], 8000, 300, False),
        ([600, 600], None, None, True),  # no "before" reading: steady is enough
    ],
)
def test_settled(
    readings: list[int], before: int | None, baseline: int | None, expected: bool
) -> None:
    assert settled(readings, before, baseline, tolerance_mib=16) is expected


class _Readings:
    """A probe that reads the given used-MiB values in turn, then the last one forever."""

    name = "fake"

    def __init__(self, *used: int) -> None:
        self.used = list(used)
        self.reads = 0

    def read(self) -> GpuReading:
        value = self.used[min(self.reads, len(self.used) - 1)]
        self.reads += 1
        return GpuReading((GpuDevice(0, "fake", value, 81559),), self.name)


def _snap(used: int) -> GpuReading:
    return GpuReading((GpuDevice(0, "fake", used, 81559),), "fake")


class _Clock:
    """A fake monotonic clock that ``asyncio.sleep`` advances: pauses are recorded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        self.pauses: list[float] = []
        monkeypatch.setattr("hotmodel.control.gpu.time.monotonic", lambda: self.now)
        monkeypatch.setattr("hotmodel.control.gpu.asyncio.sleep", self.sleep)

    async def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds


def _settle(probe: _Readings, after_unload: int, timeout: float = 10) -> tuple[int, str | None]:
    last, note = asyncio.run(
        gpu.wait_settled(
            probe,
            _snap(after_unload),
            before_mib=9000,
            baseline_mib=600,
            tolerance_mib=16,
            timeout=timeout,
        )
    )
    return last.used_mib, note


def test_wait_settled_reads_until_memory_stops_falling(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process holds memory (no return to the baseline): settled once two readings
    30 ms or more apart agree; the reads start after 10 ms and back off (not every 100 ms)."""
    clock = _Clock(monkeypatch)
    probe = _Readings(3000, 2400, 2400)
    assert _settle(probe, 4000) == (2400, None)
    assert probe.reads == 3
    assert clock.pauses == [0.01, 0.02, 0.04]


def test_a_short_pause_in_the_release_is_not_taken_for_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """3000 MiB read twice 20 ms apart, then the release goes on: not settled at 3000."""
    _Clock(monkeypatch)
    probe = _Readings(3000, 3000, 2400, 2400)
    assert _settle(probe, 4000) == (2400, None)
    assert probe.reads == 4


def test_wait_settled_at_the_baseline_reads_nothing_more() -> None:
    probe = _Readings(9999)  # never read: at the baseline already
    last, note = asyncio.run(
        gpu.wait_settled(
            probe, _snap(610), before_mib=9000, baseline_mib=600, tolerance_mib=16, timeout=10
        )
    )
    assert (last.used_mib, note, probe.reads) == (610, None, 0)


def test_wait_settled_gives_up_at_its_deadline_with_a_note() -> None:
    probe = _Readings(9000)  # never falls
    last, note = asyncio.run(
        gpu.wait_settled(
            probe, _snap(9000), before_mib=9000, baseline_mib=600, tolerance_mib=16, timeout=0.05
        )
    )
    assert last.used_mib == 9000
    assert note is not None and "settle_timeout_seconds" in note
