"""policy "auto": the memory estimate from GGUF files and the pure choice."""

from __future__ import annotations

from pathlib import Path

from hotmodel.control.fit import (
    MIB,
    OVERHEAD_MIB,
    choose_policy,
    estimate_mib,
    free_mib,
    kv_shape,
    read_metadata,
)
from hotmodel.control.gpu import GpuDevice, GpuReading
from tests.fakes import FakeGpu, FakeRouter, fake_engine, switch


def test_choose_policy() -> None:
    assert choose_policy("overlap", 1, None, None, 0) == ("overlap", "configured")
    assert choose_policy("auto", 1, 80_000, 100, 512)[0] == "zero_overlap"  # models_max 1
    assert choose_policy("auto", 2, None, 100, 512)[0] == "zero_overlap"  # no GPU
    assert choose_policy("auto", 2, 80_000, None, 512)[0] == "zero_overlap"  # size unknown
    chosen, why = choose_policy("auto", 2, 1000, 600, 512)
    assert chosen == "zero_overlap" and "1000 MiB free < 600 MiB" in why
    assert choose_policy("auto", 2, 1000, 400, 100)[0] == "overlap"


def test_free_memory_of_every_device() -> None:
    snap = GpuReading((GpuDevice(0, "a", 1000, 8000), GpuDevice(1, "b", 500, 8000)), "x")
    assert free_mib(snap) == 7000 + 7500
    assert free_mib(None) is None


def test_estimate_of_the_real_smollm2(real_models: dict[str, Path]) -> None:
    path = real_models["smollm2"]
    shape = kv_shape(
        read_metadata(
            path,
            (
                "general.architecture",
                ".block_count",
                ".attention.head_count",
                ".attention.head_count_kv",
                ".embedding_length",
            ),
        )
    )
    assert shape is not None and (shape.layers, shape.kv_heads) == (30, 3)
    kv_f16 = 4096 * 30 * 3 * (64 + 64) * 2
    expected = round((path.stat().st_size + kv_f16) / MIB) + OVERHEAD_MIB
    assert estimate_mib(path, 4096) == expected
    smaller, larger = estimate_mib(path, 4096, "q8_0", "q8_0"), estimate_mib(path, 8192)
    assert smaller is not None and smaller < expected  # a smaller cache
    assert larger is not None and larger > expected


def test_estimate_of_files_that_are_no_model(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    assert estimate_mib(tiny_models["garbage"], 4096) is None
    assert estimate_mib(tmp_path / "missing.gguf", 4096) is None
    assert estimate_mib(tiny_models["tiny"], 512) is not None  # a real (tiny) GGUF


def test_auto_overlaps_only_when_the_target_fits() -> None:
    roomy = fake_engine(FakeRouter("a"), policy="auto")
    roomy.gpu, roomy.models_max, roomy.estimate = FakeGpu([1000]), 2, lambda m: 2000
    report = switch(roomy, "b")
    assert report.outcome.value == "ok" and report.policy == "overlap"
    assert report.policy_reason is not None and report.policy_reason.startswith("auto:")

    tight = fake_engine(FakeRouter("a"), policy="auto")
    tight.gpu, tight.models_max, tight.estimate = FakeGpu([79_000]), 2, lambda m: 2000
    assert switch(tight, "b").policy == "zero_overlap"

    no_gpu = fake_engine(FakeRouter("a"), policy="auto")
    no_gpu.models_max, no_gpu.estimate = 2, lambda m: 1
    report = switch(no_gpu, "b")
    assert report.policy == "zero_overlap" and "no GPU" in (report.policy_reason or "")


def test_the_largest_context_of_the_presets(tmp_path: Path) -> None:
    from hotmodel.config import RouterConfig
    from hotmodel.control.fit import largest_context
    from hotmodel.presets import load_presets

    ini = tmp_path / "m.ini"
    ini.write_text("[a]\nmodel = a.gguf\n[b]\nmodel = b.gguf\nctx-size = 8192\n")
    router = RouterConfig(models_preset=ini, default_model="a", ctx_size=4096)
    assert largest_context(load_presets(ini), router) == 8192
    ini.write_text("[*]\nc = 1024\n[a]\nmodel = a.gguf\n")
    assert largest_context(load_presets(ini), router) == 1024
    # 0 is the model's own context, read from its GGUF: unknown here, so no bound
    ini.write_text("[a]\nmodel = a.gguf\n[b]\nmodel = b.gguf\nctx-size = 0\n")
    assert largest_context(load_presets(ini), router) is None
