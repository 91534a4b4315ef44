"""Will the target fit beside the active model? ``[switch] policy = "auto"`` asks here.

The memory a model needs is estimated from its GGUF file alone, without
loading it: the weights (the file's size) plus the KV cache, whose size the
file's metadata gives (layers, KV heads, key/value lengths) times the context
and the cache types. :func:`choose_policy` is the pure decision: overlap
(load the target, then unload the old) only when the GPU's free memory covers
that estimate plus a margin; zero_overlap otherwise, and always without a GPU.
The estimate counts the resident companions not loaded now as well
(:func:`need_beside_residents`): a loaded one is in the GPU's reading already.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from hotmodel.config import RouterConfig
from hotmodel.control.gpu import GpuReading
from hotmodel.presets import Presets

MIB = 1024 * 1024
# Bytes per cached element for llama.cpp's KV cache types (block formats rounded up).
CACHE_BYTES = {
    "f32": 4.0,
    "f16": 2.0,
    "bf16": 2.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "iq4_nl": 18 / 32,
    "q5_0": 22 / 32,
    "q5_1": 24 / 32,
}
# Compute buffers, the CUDA context and the like, beyond weights and KV. Measured with
# a CUDA 13 llama-server on an H200 (docs/performance.md, "GPU memory"): 784 MiB for
# SmolLM2 and 699 MiB for Gemma-3-270M at ctx 4096, beyond weights + KV.
OVERHEAD_MIB = 800

# GGUF value types (gguf.h): fixed sizes, and 8 = string, 9 = array
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_INTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}


class GgufError(ValueError):
    """Not a GGUF file this reader understands."""


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GgufError("truncated GGUF header")
    return data


def _u64(f: BinaryIO) -> int:
    value: int = struct.unpack("<Q", _read(f, 8))[0]
    return value


def _skip(f: BinaryIO, vtype: int) -> None:
    if vtype in _FIXED:
        f.seek(_FIXED[vtype], 1)
    elif vtype == 8:
        f.seek(_u64(f), 1)
    elif vtype == 9:
        itype, count = struct.unpack("<IQ", _read(f, 12))
        if itype in _FIXED:
            f.seek(_FIXED[itype] * count, 1)
        else:
            for _ in range(count):
                _skip(f, itype)
    else:
        raise GgufError(f"unknown GGUF value type {vtype}")


def read_metadata(
    path: Path, wanted: tuple[str, ...] = ("general.architecture",)
) -> dict[str, object]:
    """The integer and string metadata values whose keys end with one of ``wanted``
    (arrays, such as the vocabulary, are skipped without being read)."""
    out: dict[str, object] = {}
    with path.open("rb") as f:
        if _read(f, 4) != b"GGUF":
            raise GgufError(f"{path} is not a GGUF file")
        version = struct.unpack("<I", _read(f, 4))[0]
        if version < 2:
            raise GgufError(f"GGUF version {version} is too old")
        _u64(f)  # tensor count
        for _ in range(_u64(f)):
            key = _read(f, _u64(f)).decode("utf-8", errors="replace")
            vtype = struct.unpack("<I", _read(f, 4))[0]
            if not key.endswith(wanted):
                _skip(f, vtype)
            elif vtype in _INTS:
                out[key] = struct.unpack(_INTS[vtype], _read(f, _FIXED[vtype]))[0]
            elif vtype == 8:
                out[key] = _read(f, _u64(f)).decode("utf-8", errors="replace")
            else:
                _skip(f, vtype)
    return out


@dataclass(frozen=True, slots=True)
class KvShape:
    layers: int
    kv_heads: int
    key_length: int
    value_length: int


def kv_shape(meta: Mapping[str, object]) -> KvShape | None:
    """The KV-shaping numbers of a model's metadata (None when some are missing)."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return None

    def num(key: str) -> int | None:
        value = meta.get(f"{arch}.{key}")
        return value if isinstance(value, int) and value > 0 else None

    layers, heads, embd = num("block_count"), num("attention.head_count"), num("embedding_length")
    kv_heads = num("attention.head_count_kv") or heads
    if layers is None or heads is None or kv_heads is None or embd is None:
        return None
    key_len = num("attention.key_length") or embd // heads
    value_len = num("attention.value_length") or embd // heads
    return KvShape(layers, kv_heads, key_len, value_len)


_WANTED = (
    "general.architecture",
    ".block_count",
    ".attention.head_count",
    ".attention.head_count_kv",
    ".embedding_length",
    ".attention.key_length",
    ".attention.value_length",
    ".context_length",
)


def estimate_mib(path: Path, ctx: int, cache_k: str = "f16", cache_v: str = "f16") -> int | None:
    """Weights + KV cache + overhead, in MiB (None when the file cannot be read).
    ``ctx`` 0 means the model's own training context, as llama-server takes it."""
    try:
        size = path.stat().st_size
        meta = read_metadata(path, _WANTED)
    except (OSError, GgufError):
        return None
    shape = kv_shape(meta)
    if shape is None:
        return None
    if ctx <= 0:
        arch = meta.get("general.architecture")
        trained = meta.get(f"{arch}.context_length")
        ctx = trained if isinstance(trained, int) and trained > 0 else 4096
    per_token = (
        shape.layers
        * shape.kv_heads
        * (
            shape.key_length * CACHE_BYTES.get(cache_k, 2.0)
            + shape.value_length * CACHE_BYTES.get(cache_v, 2.0)
        )
    )
    return round((size + ctx * per_token) / MIB) + OVERHEAD_MIB


def free_mib(reading: GpuReading | None) -> int | None:
    if reading is None or not reading.devices:
        return None
    return sum(max(0, d.total_mib - d.used_mib) for d in reading.devices)


def choose_policy(
    policy: str, models_max: int, free: int | None, need: int | None, margin_mib: int
) -> tuple[str, str]:
    """The policy a switch uses, and why (for the report). Pure."""
    if policy != "auto":
        return policy, "configured"
    if models_max < 2:
        return "zero_overlap", "[router] models_max is 1: two models never run together"
    if free is None:
        return "zero_overlap", "no GPU memory reading"
    if need is None:
        return "zero_overlap", "the target's memory need is unknown (no readable GGUF)"
    if free >= need + margin_mib:
        return "overlap", f"{free} MiB free >= {need} MiB needed + {margin_mib} MiB margin"
    return "zero_overlap", f"{free} MiB free < {need} MiB needed + {margin_mib} MiB margin"


def _option(options: Mapping[str, str], *names: str) -> str | None:
    return next((options[n] for n in names if n in options), None)


def preset_context(presets: Presets, name: str, router: RouterConfig) -> int | None:
    """The context size (tokens) preset ``name`` is loaded with: its own ``ctx-size``
    (its section, then ``[*]``), else ``[router]``'s; None when unknown or 0 (the
    model's own, read from the GGUF by llama-server)."""
    preset = presets.models.get(name)
    if preset is None:
        return None
    ctx = _option({**presets.globals, **preset.options}, "ctx-size", "c")
    try:
        n = int(ctx) if ctx is not None else router.ctx_size
    except ValueError:
        return None
    return n if n > 0 else None


def largest_context(presets: Presets, router: RouterConfig) -> int | None:
    """The largest context any preset is loaded with (None when one is unknown)."""
    sizes = [preset_context(presets, name, router) for name in presets.models]
    return None if not sizes or None in sizes else max(s for s in sizes if s is not None)


def need_beside_residents(
    presets: Presets, name: str, router: RouterConfig, residents: Collection[str]
) -> int | None:
    """What loading ``name`` must find free: its own need, plus that of the ``residents``
    not loaded now (a loaded one is in the GPU's reading already); None when one is
    unknown."""
    needs = [preset_need_mib(presets, n, router) for n in (name, *residents)]
    return None if None in needs else sum(n for n in needs if n is not None)


def preset_need_mib(presets: Presets, name: str, router: RouterConfig) -> int | None:
    """The memory preset ``name`` needs: its GGUF, with its own context and cache
    types where the INI sets them (its section, then ``[*]``), else ``[router]``'s."""
    preset = presets.models.get(name)
    if preset is None or preset.model_path is None:
        return None
    options = {**presets.globals, **preset.options}
    ctx_n = preset_context(presets, name, router)
    if ctx_n is None:
        return None
    return estimate_mib(
        preset.model_path,
        ctx_n,
        _option(options, "cache-type-k", "ctk") or router.cache_type_k,
        _option(options, "cache-type-v", "ctv") or router.cache_type_v,
    )
