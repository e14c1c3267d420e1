"""A Python client for the demix HTTP API, and `demix separate` built on it.

    from demix.cli.client import Client

    with Client("http://127.0.0.1:8000", api_key=None) as demix:
        models = demix.models()                                # [{"name": "htdemucs", "stems": [...]}, ...]
        job = demix.submit("song.wav", stems="vocals", format="flac")   # model=... to choose one
        job = demix.wait(job["id"], progress=lambda job: print(f"{job['progress']:.0%}"))
        paths = demix.download(job["id"], "separated/song")   # {"vocals": Path(...), ...}
        stems = demix.result(job["id"])                        # {"vocals": b"<flac bytes>", ...}

Uploads stream from disk (an hour-long WAV never sits in memory). Every request is
retried with exponential backoff (bounded) on a connection error or a 503; an upload is
sent again from the file, with the same `Idempotency-Key`, so a service that honours
the key creates one job however often the upload is retried. Refusals raise
`ClientError` carrying the service's error `code` and `message`; `wait` raises
`JobFailed` for a job that failed or was cancelled.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import os
import sys
import time
import typing as tp
import urllib.parse
import uuid
from pathlib import Path

import requests
from tqdm import tqdm

from demix.atomic_files import atomic_open

RETRIES = 5
"""Attempts for a request that fails on a connection error or a 503."""
BACKOFF_S = 0.5
"""Wait before the first retry; doubled for each later one."""
MAX_BACKOFF_S = 8.0
"""Longest wait between two attempts."""
POLL_INTERVAL_S = 1.0
"""Wait between two polls of a job in `wait`."""
TIMEOUT_S = 60.0
"""Longest wait for the service to answer one ordinary request."""
UPLOAD_TIMEOUT_S = 600.0
"""Longest wait for the service between two pieces of an upload or a download."""
CHUNK_BYTES = 1 << 20

FINAL_STATUSES = ("succeeded", "failed", "cancelled")


class ClientError(RuntimeError):
    """The service refused a request (or could not be reached).

    Attributes:
        code: the service's error code (`invalid_stems`, `unsupported_format`, ...), or `unreachable`.
        message: the service's explanation.
        http_status: the HTTP status, or None when the service could not be reached.
        details: any other fields of the service's error object.
    """

    def __init__(self, code: str, message: str, http_status: tp.Optional[int] = None,
                 details: tp.Optional[dict] = None):
        super().__init__(f"{message} ({code}" + (f", HTTP {http_status})" if http_status else ")"))
        self.code, self.message, self.http_status = code, message, http_status
        self.details = details or {}


class JobFailed(ClientError):
    """A job ended without stems: it failed (`code`/`message` are its error) or was cancelled."""

    def __init__(self, job: dict):
        error = job.get("error") or {"code": job["status"], "message": f"job {job['id']} was {job['status']}"}
        super().__init__(error["code"], error["message"])
        self.job = job


class Client:
    """The demix HTTP API at `url`, optionally with an API key (`Authorization: Bearer`)."""

    def __init__(self, url: str, api_key: tp.Optional[str] = None, *, retries: int = RETRIES,
                 backoff_s: float = BACKOFF_S, timeout_s: float = TIMEOUT_S):
        self.url = url.rstrip("/")
        self.retries, self.backoff_s, self.timeout_s = max(1, retries), backoff_s, timeout_s
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "demix-client"
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: tp.Any) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()

    def models(self) -> list[dict]:
        """The service's models (`GET /v1/models`), the default first: each one's `name`,
        `architecture`, `stems` choices, `samplerate`, `origin`, `licence`, `available`."""
        response = self._get("/v1/models")
        _raise_for_error(response)
        return response.json()["models"]

    def submit(self, path: tp.Union[str, os.PathLike], stems: str = "all", *,
               model: tp.Optional[str] = None, callback_url: tp.Optional[str] = None, idempotency_key: tp.Optional[str] = None,
               on_upload: tp.Optional[tp.Callable[[int, int], None]] = None,
               workflow: tp.Union[str, dict, None] = None, preset: tp.Optional[str] = None,
               **output_options: tp.Any) -> dict:
        """Upload a song (any format the service reads) as a new job; returns the queued job's JSON.

        Args:
            path: the audio file, streamed from disk.
            stems: `all`, or one source of the model (htdemucs: `drums`, `bass`, `vocals`, `other`).
            model: one of `models()`; None: the service's default.
            callback_url: an http(s) URL the service POSTs the finished job to.
            idempotency_key: sent as `Idempotency-Key`; a fresh one per call when not given.
            on_upload: called as the upload goes with (bytes of the file sent, file size);
                a retried upload starts again from 0.
            workflow: instead of `model` and `stems`, a chain or ensemble of models (its JSON
                text, or the object): docs/workflows.md.
            preset: instead of `model` and `stems`, a named workflow (`workflows()`).
            output_options: `format`, `sample_format`, `samplerate`, `bitrate`, `clip`, `channels`.
        Raises:
            ClientError: the service refused the upload, or stayed unreachable.
        """
        path = Path(path)
        fields = job_fields(stems, model, callback_url, workflow, preset, output_options)
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}

        def send() -> requests.Response:
            size, sent = path.stat().st_size, 0

            def on_read(count: int) -> None:
                nonlocal sent
                sent += count
                if on_upload is not None:
                    on_upload(sent, size)

            body = MultipartFile(path, fields, on_read)
            try:
                return self.session.post(f"{self.url}/v1/jobs", data=body, timeout=UPLOAD_TIMEOUT_S,
                                         headers={**headers, "Content-Type": body.content_type})
            finally:
                body.close()

        response = self._retrying(send)
        _raise_for_error(response)
        return response.json()

    def submit_url(self, url: str, stems: str = "all", *, callback_url: tp.Optional[str] = None,
                   idempotency_key: tp.Optional[str] = None, **output_options: tp.Any) -> dict:
        """Queue a job whose input the service fetches from `url` (http or https); returns
        the queued job's JSON (its `stage` is `downloading` while the service fetches it).

        Raises:
            ClientError: the service refused the URL (e.g. `url_not_allowed`), or stayed unreachable.
        """
        fields = {"url": url, **job_fields(stems, None, callback_url, None, None, output_options)}
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        response = self._retrying(lambda: self.session.post(f"{self.url}/v1/jobs", data=fields, headers=headers,
                                                             timeout=UPLOAD_TIMEOUT_S))
        _raise_for_error(response)
        return response.json()

    def workflows(self) -> list[dict]:
        """The service's named workflows (`GET /v1/workflows`): each one's `name`, `description`,
        `workflow`, `models`, `enabled` (else `disabled_reason`) and `available`."""
        response = self._get("/v1/workflows")
        _raise_for_error(response)
        return response.json()["workflows"]

    def job(self, job_id: str) -> dict:
        """The job's JSON (`status`, `progress`, `outputs`, ...)."""
        response = self._get(f"/v1/jobs/{job_id}")
        _raise_for_error(response)
        return response.json()

    def wait(self, job_id: str, progress: tp.Optional[tp.Callable[[dict], None]] = None, *,
             poll_interval_s: float = POLL_INTERVAL_S, timeout_s: tp.Optional[float] = None) -> dict:
        """Poll the job until it finishes; returns it once it succeeded.

        Args:
            progress: called with the job's JSON after every poll (its `progress` goes 0 to 1).
            timeout_s: give up after this long (None: wait as long as it takes).
        Raises:
            JobFailed: the job failed or was cancelled.
            TimeoutError: still not finished after `timeout_s`.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if progress is not None:
                progress(job)
            if job["status"] == "succeeded":
                return job
            if job["status"] in FINAL_STATUSES:
                raise JobFailed(job)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is still {job['status']} after {timeout_s}s")
            time.sleep(poll_interval_s)

    def cancel(self, job_id: str) -> dict:
        """Cancel a queued or running job; returns it (a `ClientError`, HTTP 409, if it already ended)."""
        response = self._retrying(lambda: self.session.post(f"{self.url}/v1/jobs/{job_id}/cancel",
                                                            timeout=self.timeout_s))
        _raise_for_error(response)
        return response.json()

    def delete(self, job_id: str) -> None:
        """Delete a job (cancelled first if it has not finished): its record and every file."""
        response = self._retrying(lambda: self.session.delete(f"{self.url}/v1/jobs/{job_id}",
                                                              timeout=self.timeout_s))
        _raise_for_error(response)

    def result(self, job_id: str) -> dict[str, bytes]:
        """Every stem of a succeeded job: name -> the complete file's bytes."""
        response = self._get(f"/v1/jobs/{job_id}/result", timeout=UPLOAD_TIMEOUT_S)
        _raise_for_error(response)
        return {name: base64.b64decode(data) for name, data in response.json().items()}

    def download(self, job_id: str, folder: tp.Union[str, os.PathLike], *,
                 job: tp.Optional[dict] = None) -> dict[str, Path]:
        """Save every stem of a succeeded job into `folder` (`<stem>.<format>`); returns their paths.

        Files appear under their final names only when complete.
        """
        job = job or self.job(job_id)
        if job["status"] != "succeeded":
            raise ClientError("job_not_finished", f"job {job_id} is {job['status']}, not succeeded")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        saved = {}
        for name, url in job["outputs"].items():
            extension = urllib.parse.urlsplit(url).path.rsplit(".", 1)[-1]
            saved[name] = self._download_file(url, folder / f"{name}.{extension}")
        return saved

    def _download_file(self, url: str, target: Path) -> Path:
        with self._retrying(lambda: self.session.get(url, stream=True, timeout=UPLOAD_TIMEOUT_S)) as response:
            _raise_for_error(response)
            with atomic_open(target) as file:
                for chunk in response.iter_content(CHUNK_BYTES):
                    file.write(chunk)
        return target

    def _get(self, path: str, timeout: tp.Optional[float] = None) -> requests.Response:
        return self._retrying(lambda: self.session.get(self.url + path, timeout=timeout or self.timeout_s))

    def _retrying(self, send: tp.Callable[[], requests.Response]) -> requests.Response:
        """`send()` again after a connection error or a 503, backing off, at most `retries` times."""
        for attempt in range(1, self.retries + 1):
            try:
                response = send()
            except requests.ConnectionError as exc:
                if attempt == self.retries:
                    raise ClientError("unreachable", f"cannot reach {self.url}: {exc}") from exc
            else:
                if response.status_code != 503 or attempt == self.retries:
                    return response
                response.close()
            time.sleep(min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S))
        raise AssertionError("not reached")


def _raise_for_error(response: requests.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = dict(response.json()["error"])
        code, message = str(error.pop("code")), str(error.pop("message"))
    except (ValueError, KeyError, TypeError):
        code, message, error = "http_error", response.text[:200] or response.reason, {}
    raise ClientError(code, message, response.status_code, error)


class MultipartFile:
    """A multipart/form-data body with one file part and plain fields, read from disk
    piece by piece; `len()` lets requests send a Content-Length instead of chunks."""

    def __init__(self, path: Path, fields: dict[str, str], on_read: tp.Callable[[int], None]):
        self.boundary = uuid.uuid4().hex
        head = "".join(f'--{self.boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                       for k, v in fields.items())
        head += (f'--{self.boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n')
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
                chunk = self._file.read(size if size > 0 else CHUNK_BYTES)
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


# -- `demix separate` ---------------------------------------------------------------------

@dataclasses.dataclass
class Submitted:
    path: tp.Union[Path, str]  # a file, or the URL the service fetches
    job: dict


def job_fields(stems: str, model: tp.Optional[str], callback_url: tp.Optional[str],
               workflow: tp.Union[str, dict, None], preset: tp.Optional[str],
               output_options: tp.Mapping[str, tp.Any]) -> dict[str, str]:
    """A submission's form fields: a workflow or preset replaces `model` and `stems`."""
    fields = {k: str(v) for k, v in output_options.items() if v is not None}
    if workflow is not None:
        fields["workflow"] = workflow if isinstance(workflow, str) else json.dumps(workflow)
    elif preset:
        fields["preset"] = preset
    else:
        fields["stems"] = stems
        if model:
            fields["model"] = model
    if callback_url:
        fields["callback_url"] = callback_url
    return fields


def is_url(item: tp.Union[str, os.PathLike]) -> bool:
    """Whether a `demix separate` argument is an http(s) address rather than a file."""
    return str(item).lower().startswith(("http://", "https://"))


def output_name(item: tp.Union[str, os.PathLike]) -> str:
    """The stems folder of a file (its stem) or a URL (its last path segment's stem)."""
    if is_url(item):
        return Path(urllib.parse.urlsplit(str(item)).path).stem or "download"
    return Path(item).stem


def submit_with_progress(client: Client, path: tp.Union[Path, str], stems: str,
                         model: tp.Optional[str] = None, workflow: tp.Optional[str] = None,
                         preset: tp.Optional[str] = None) -> dict:
    """Upload one song with a progress bar (or, for a URL, have the service fetch it);
    returns the queued job."""
    if is_url(path):
        return client.submit_url(str(path), stems, model=model)
    with tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
              desc=f"upload {path.name}", leave=False) as bar:
        def on_upload(sent: int, _size: int) -> None:
            bar.update(sent - bar.n)  # negative when a retried upload starts again

        return client.submit(path, stems, model=model, on_upload=on_upload, workflow=workflow, preset=preset)


def wait_and_download(client: Client, submitted: list[Submitted], out_dir: Path) -> int:
    """Poll every job with a progress bar each, download stems as jobs succeed;
    returns the number of jobs that failed or were cancelled."""
    bars = {s.job["id"]: tqdm(total=100, desc=output_name(s.path), position=i, unit="%",
                              bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
            for i, s in enumerate(submitted)}
    pending = {s.job["id"]: s for s in submitted}
    failures = 0
    try:
        while pending:
            for job_id, item in list(pending.items()):
                job = client.job(job_id)
                bar = bars[job_id]
                bar.set_postfix_str(_stage_text(job), refresh=False)
                bar.update(round(job["progress"] * 100) - bar.n)
                if job["status"] == "succeeded":
                    folder = out_dir / output_name(item.path)
                    client.download(job_id, folder, job=job)
                    bar.set_postfix_str(f"saved to {folder}")
                    del pending[job_id]
                elif job["status"] in FINAL_STATUSES:
                    bar.set_postfix_str(f"{job['status']}: {JobFailed(job).message}")
                    failures += 1
                    del pending[job_id]
            if pending:
                time.sleep(POLL_INTERVAL_S)
    finally:
        for bar in bars.values():
            bar.close()
    return failures


def _stage_text(job: dict) -> str:
    if job.get("workflow") and job["status"] == "running":
        steps = [step for step in job["workflow"]["steps"] if step["status"] in ("queued", "running")]
        return ", ".join(f"{step['name']} {step['status']} {round(step['progress'] * 100)}%" for step in steps) \
            or "running"
    download = job.get("download")
    if job.get("stage") == "downloading" and download:
        received = download["received_bytes"] / 2 ** 20
        total = f" of {download['total_bytes'] / 2 ** 20:.1f}" if download.get("total_bytes") else ""
        return f"downloading {received:.1f}{total} MiB"
    return job.get("stage") or job["status"]


def run_separate(server: str, files: tp.Sequence[tp.Union[str, Path]], stems: str, out_dir: Path,
                 api_key: tp.Optional[str] = None, model: tp.Optional[str] = None,
                 workflow: tp.Optional[str] = None, preset: tp.Optional[str] = None) -> int:
    """Submit all files, then wait for all; returns a process exit code. `workflow` (JSON
    text) or `preset` replaces `model` and `stems`."""
    with Client(server, api_key=api_key) as client:
        submitted = []
        for path in (item if is_url(item) else Path(item) for item in files):
            try:
                submitted.append(Submitted(path, submit_with_progress(client, path, stems, model, workflow, preset)))
            except (ClientError, requests.RequestException, OSError) as exc:
                print(f"demix: upload of {path}: {exc}", file=sys.stderr)
        if not submitted:
            return 1
        try:
            failures = wait_and_download(client, submitted, out_dir)
        except (ClientError, requests.RequestException, OSError) as exc:
            print(f"demix: {exc}", file=sys.stderr)
            return 1
    failed = failures + len(files) - len(submitted)
    print(f"{len(files) - failed} of {len(files)} separated into {out_dir}")
    return 1 if failed else 0
