"""`demix separate`: the command-line client. Uploads WAVs to a running service, shows
each job's progress, downloads the stems.

Uploads are streamed from disk (an hour-long WAV never sits in memory) with a
progress bar; every file is submitted before any is waited on, so a batch queues at once.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import typing as tp
import uuid
from pathlib import Path

import requests
from tqdm import tqdm

from shared.atomic import atomic_open

POLL_INTERVAL_S = 1.0
RETRIES = 5
"""Attempts for a request that fails on a connection error or a 503 (backing off)."""


class ClientError(RuntimeError):
    """The service refused a request; the message is the service's own."""


@dataclasses.dataclass
class Submitted:
    path: Path
    job: dict


class MultipartFile:
    """A multipart/form-data body with one file part and plain fields, read from disk
    piece by piece; `len()` lets requests send a Content-Length instead of chunks."""

    def __init__(self, path: Path, fields: dict[str, str], on_read: tp.Callable[[int], None]):
        self.boundary = uuid.uuid4().hex
        head = "".join(f'--{self.boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                       for k, v in fields.items())
        head += (f'--{self.boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{path.name}"\r\nContent-Type: audio/wav\r\n\r\n')
        self._parts = [head.encode(), None, f"\r\n--{self.boundary}--\r\n".encode()]
        self._file = open(path, "rb")
        self._size = len(self._parts[0]) + os.path.getsize(path) + len(self._parts[2])
        self._index, self._on_read = 0, on_read

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self._size

    def read(self, size: int = -1) -> bytes:
        while self._index < 3:
            part = self._parts[self._index]
            if part is None:
                chunk = self._file.read(size if size > 0 else 1 << 20)
                if chunk:
                    self._on_read(len(chunk))
                    return chunk
                self._file.close()
            elif part:
                self._parts[self._index] = b""
                return part
            self._index += 1
        return b""

    def close(self) -> None:
        self._file.close()


def _request(method: str, url: str, **kwargs: tp.Any) -> requests.Response:
    """A request retried with backoff while the service is unreachable or answers 503."""
    for attempt in range(RETRIES):
        try:
            response = requests.request(method, url, timeout=kwargs.pop("timeout", 60), **kwargs)
            if response.status_code != 503 or attempt == RETRIES - 1:
                return response
        except requests.ConnectionError:
            if attempt == RETRIES - 1:
                raise
        time.sleep(2 ** attempt)
    raise AssertionError("not reached")


def _raise_for_error(response: requests.Response, action: str) -> None:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            message = f"{error['message']} ({error['code']}, HTTP {response.status_code})"
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {response.status_code}"
        raise ClientError(f"{action}: {message}")


def submit(server: str, path: Path, stems: str) -> dict:
    """Upload one WAV; returns the queued job."""
    with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
              desc=f"upload {path.name}", leave=False) as bar:
        body = MultipartFile(path, {"stems": stems}, bar.update)
        try:
            # No retry here: a half-sent body cannot be replayed from a stream.
            response = requests.post(f"{server}/v1/jobs", data=body, timeout=600,
                                     headers={"Content-Type": body.content_type})
        finally:
            body.close()
    _raise_for_error(response, f"upload of {path}")
    return response.json()


def wait_and_download(server: str, submitted: list[Submitted], out_dir: Path) -> int:
    """Poll every job with a progress bar each, download stems as jobs succeed;
    returns the number of failed jobs."""
    bars = {s.job["id"]: tqdm(total=100, desc=s.path.name, position=i, unit="%",
                              bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
            for i, s in enumerate(submitted)}
    pending = {s.job["id"]: s for s in submitted}
    failures = 0
    try:
        while pending:
            for job_id, item in list(pending.items()):
                response = _request("GET", f"{server}/v1/jobs/{job_id}")
                _raise_for_error(response, f"polling job {job_id}")
                job = response.json()
                bar = bars[job_id]
                bar.set_postfix_str(job["status"], refresh=False)
                bar.update(round(job["progress"] * 100) - bar.n)
                if job["status"] == "succeeded":
                    folder = out_dir / item.path.stem
                    for name, url in job["outputs"].items():
                        _download(url, folder / f"{name}.wav")
                    bar.set_postfix_str(f"saved to {folder}")
                    del pending[job_id]
                elif job["status"] == "failed":
                    bar.set_postfix_str(f"failed: {job['error']['message']}")
                    failures += 1
                    del pending[job_id]
            if pending:
                time.sleep(POLL_INTERVAL_S)
    finally:
        for bar in bars.values():
            bar.close()
    return failures


def _download(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with _request("GET", url, stream=True, timeout=600) as response:
        _raise_for_error(response, f"downloading {url}")
        with atomic_open(target) as file:
            for chunk in response.iter_content(1 << 20):
                file.write(chunk)


def run_separate(server: str, files: tp.Sequence[Path], stems: str, out_dir: Path) -> int:
    """Submit all files, then wait for all; returns a process exit code."""
    server = server.rstrip("/")
    submitted = []
    for path in files:
        try:
            submitted.append(Submitted(path, submit(server, path, stems)))
        except (ClientError, requests.RequestException, OSError) as exc:
            print(f"demix: {exc}", file=sys.stderr)
    if not submitted:
        return 1
    try:
        failures = wait_and_download(server, submitted, out_dir)
    except (ClientError, requests.RequestException) as exc:
        print(f"demix: {exc}", file=sys.stderr)
        return 1
    failed = failures + len(files) - len(submitted)
    print(f"{len(files) - failed} of {len(files)} separated into {out_dir}")
    return 1 if failed else 0
