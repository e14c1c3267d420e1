"""`/v1/jobs`: submit a WAV, poll the job, fetch its stems."""
from __future__ import annotations

import base64
import time
import typing as tp
import zipfile

from flask import Blueprint, Response, current_app, request, stream_with_context, url_for

from demix.catalogue import warm_model_notes
from demix.errors import BadRequest, IllegalTransition, JobFinished, JobNotFinished, JobNotFound, shown
from demix.jobs.estimates import queue_position
from demix.jobs.idempotency import ANONYMOUS_OWNER, HEADER as IDEMPOTENCY_HEADER, parse_key
from demix.jobs.job_json import job_json as public_job_json
from demix.jobs.records import Job, JobStatus
from demix.intake.job_request import FILE_FIELD, URL_FIELD
from demix.jobs.lifecycle import cancel_job, delete_job
from demix.audio.output_formats import OutputOptions
from demix.readiness import ready_workers
from demix.intake.submission import IdempotentSubmit, find_existing_job, submit_upload, submit_url
from demix.storage.local import StoredFile
from demix.workflows.runs import workflow_view
from demix.intake.uploads import ensure_room_for_upload

from demix.api.auth import request_owner
from demix.api.downloads import send_stored_file
from demix.api.upload_requests import JSON, json_body_fields, refuse_oversized_body, upload_path

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

BASE64_CHUNK_BYTES = 3 * 256 * 1024
"""Bytes of a stem encoded per piece of the /result stream (a multiple of 3, so pieces
concatenate into one valid base64 string)."""

ZIP_CHUNK_BYTES = 1 << 20
"""Bytes of a stem copied per piece of the stems.zip stream."""


def _services():
    return current_app.extensions["demix"]


def job_json(job: Job) -> dict:
    """The public view of a job (`demix.jobs.job_json`), with absolute URLs under this request's host."""
    services = _services()
    position = queue_position(services.jobs.redis, job)
    if job.status is JobStatus.QUEUED and job.queue and position is None:
        # A worker took it between reading the record and its rank: show it as it is now.
        job = services.jobs.get(job.id)
        position = queue_position(services.jobs.redis, job)
    served = job.model in warm_model_notes(ready_workers(services.jobs.redis)) \
        if job.status is JobStatus.QUEUED else None
    return public_job_json(job, url_for("jobs.get_job", job_id=job.id, _external=True),
                           retention_s=services.settings.retention_s,
                           queue_position=position, now=time.time(), model_served=served,
                           workflow=workflow_view(job, services.jobs) if job.workflow else None)


def idempotency_owner() -> str:
    """Whose `Idempotency-Key` this is: the request's API key owner (one shared owner when
    the API is open)."""
    return request_owner() or ANONYMOUS_OWNER


def _job_response(job: Job, status: int):
    response = current_app.json.response(job_json(job))
    response.status_code = status
    response.headers["Location"] = url_for("jobs.get_job", job_id=job.id)
    return response


def answer_before_upload() -> tp.Optional[Response]:
    """What a job submission gets from its headers alone, before its body is read: the
    job of an earlier submit with the same `Idempotency-Key` (200); None when the body decides.
    The HTTP front (`demix.api.front`) asks this as soon as a large body's headers are in,
    so a repeat, an owner at its limit, a body over its size limit or a full disk costs no upload.

    Raises:
        BadRequest: a malformed `Idempotency-Key`.
        TooManyActiveJobs: the owner is at `DEMIX_MAX_ACTIVE_JOBS_PER_KEY`.
        RequestEntityTooLarge: the announced body is over its limit (413, whatever the disk).
        InsufficientStorage: the disk lacks room for the announced body.
    """
    services = _services()
    key = parse_key(request.headers.get(IDEMPOTENCY_HEADER))
    idempotent = IdempotentSubmit(idempotency_owner(), key) if key is not None else None
    # A repeat is answered even at the limit: it adds no job.
    if idempotent is not None and (existing := find_existing_job(idempotent, services)) is not None:
        return _job_response(existing, 200)
    services.limits.check(request_owner())
    refuse_oversized_body()  # before the disk: a body that will never be read needs no room
    ensure_room_for_upload(services, request.content_length or 0)
    return None


@bp.post("")
def create_job():
    """Accept an upload (`file`) or an http(s) `url` to fetch it from, the `model` and `stems`
    choice, output options and an optional `callback_url`; answer 202 with the queued job,
    or 200 with the job an earlier submit with the same `Idempotency-Key` created."""
    services = _services()
    early = answer_before_upload()
    if early is not None:
        return early
    key = parse_key(request.headers.get(IDEMPOTENCY_HEADER))
    idempotent = IdempotentSubmit(idempotency_owner(), key) if key is not None else None
    fields = json_body_fields() if request.mimetype == JSON else request.form
    upload, url = request.files.get(FILE_FIELD), fields.get(URL_FIELD, "").strip()
    if upload is not None and url:
        raise BadRequest("send either the file field 'file' or the field 'url', not both",
                         code="file_and_url")
    if url:
        job, created = submit_url(url, fields, services, owner=request_owner(), idempotent=idempotent)
        return _job_response(job, 202 if created else 200)
    if upload is None:
        raise BadRequest("missing the multipart file field 'file' (the audio file to separate), "
                         "or the field 'url' (an http or https address to fetch it from)",
                         code="missing_file")
    # A part over the upload limit was already refused while it streamed (`CappedUploadFile`).
    path = upload_path(upload)
    ensure_room_for_upload(services)  # the upload itself may have used up the room
    # An upload not moved into a job is deleted after the request (`discard_unclaimed_uploads`).
    job, created = submit_upload(path, request.form, services, owner=request_owner(), idempotent=idempotent)
    return _job_response(job, 202 if created else 200)


@bp.get("/<job_id>")
def get_job(job_id: str):
    return job_json(_visible_job(job_id))


def _visible_job(job_id: str) -> Job:
    """The job, if the request's API key may see it.

    Raises:
        JobNotFound: no such job, or another key's: the same answer either way, so ids
            of other keys' jobs cannot be probed.
    """
    job = _services().jobs.get(job_id)
    # A workflow's runs are its own business, not jobs of anyone's.
    if (_services().api_keys and job.owner != request_owner()) or job.workflow_unit:
        raise JobNotFound(f"no job with id {shown(job_id)}")
    return job


@bp.post("/<job_id>/cancel")
def cancel(job_id: str):
    """Cancel a queued or running job: 200 with the cancelled job; 409 if it already finished."""
    services = _services()
    _visible_job(job_id)  # 404 for unknown ids (and other keys' jobs), before anything else
    try:
        job = cancel_job(services.jobs, services.storage, job_id)
    except IllegalTransition as exc:
        status = exc.details.get("status")
        raise JobFinished(f"job {job_id} already {status}; only queued or running jobs can be "
                          "cancelled (DELETE removes a finished job)", details={"status": status}) from None
    return job_json(job)


@bp.delete("/<job_id>")
def delete(job_id: str):
    """Delete a job (cancelling it first if it is not finished): its record and every file."""
    services = _services()
    _visible_job(job_id)  # 404 for unknown ids and other keys' jobs
    delete_job(services.jobs, services.storage, job_id)
    return "", 204


@bp.get("/<job_id>/result")
def get_result(job_id: str):
    """All stems as one JSON object: stem name -> base64 of the complete encoded file.

    Streamed piece by piece, so a long track's stems never sit in memory whole.
    """
    job = _succeeded_job(job_id)
    return Response(stream_with_context(_result_json(_stem_files(job))), mimetype="application/json")


@bp.get("/<job_id>/stems.zip")
def get_stems_zip(job_id: str):
    """All stems of a job in one zip, streamed as it is built."""
    job = _succeeded_job(job_id)
    response = Response(stream_with_context(_zip_stream(_stem_files(job))), mimetype="application/zip")
    response.headers["Content-Disposition"] = f'attachment; filename="{job.id}_stems.zip"'
    return response


def _stem_files(job: Job) -> list[tuple[str, StoredFile]]:
    extension = _output(job).extension
    return [(name, _services().storage.stem(job.id, name, extension, job.attempts))
            for name in job.outputs]


def _output(job: Job) -> OutputOptions:
    return OutputOptions.from_dict(job.output)


class _Pipe:
    """A write-only file for zipfile that hands what it wrote to a generator."""

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.offset = 0

    def write(self, data: bytes) -> int:
        self.pending.append(bytes(data))
        self.offset += len(data)
        return len(data)

    def tell(self) -> int:
        return self.offset

    def flush(self) -> None:
        pass

    def drain(self) -> bytes:
        data, self.pending = b"".join(self.pending), []
        return data


def _zip_stream(files: tp.Sequence[tuple[str, StoredFile]]) -> tp.Iterator[bytes]:
    pipe = _Pipe()
    # Stored, not deflated: audio barely compresses, and the stream starts at once.
    with zipfile.ZipFile(pipe, "w", compression=zipfile.ZIP_STORED) as archive:  # type: ignore[arg-type]
        for name, stored in files:
            with stored.open() as source, archive.open(stored.name, "w", force_zip64=True) as target:
                while piece := source.read(ZIP_CHUNK_BYTES):
                    target.write(piece)
                    yield pipe.drain()
    yield pipe.drain()


def _result_json(files: tp.Sequence[tuple[str, StoredFile]]) -> tp.Iterator[bytes]:
    yield b"{"
    for index, (name, stored) in enumerate(files):
        yield (", " if index else "").encode() + f'"{name}": "'.encode()
        with stored.open() as file:
            while piece := file.read(BASE64_CHUNK_BYTES):
                yield base64.b64encode(piece)
        yield b'"'
    yield b"}"


@bp.get("/<job_id>/stems/<name>.<extension>")
def get_stem(job_id: str, name: str, extension: str):
    job = _succeeded_job(job_id)
    output = _output(job)
    if name not in job.outputs or extension != output.extension:
        raise JobNotFound(f"job {job_id} has no stem {shown(name + '.' + extension)}; it has "
                          + ", ".join(f"{stem}.{output.extension}" for stem in job.outputs))
    stored = _services().storage.stem(job.id, name, extension, job.attempts)
    return send_stored_file(stored, mimetype=output.mime_type, download_name=f"{job.id}_{name}.{extension}")


def _succeeded_job(job_id: str) -> Job:
    job = _visible_job(job_id)
    if job.status is JobStatus.FAILED:
        error = job.error or {"code": "unknown", "message": "unknown error"}
        raise JobNotFinished(f"job {job_id} failed: {error['message']}", code="job_failed",
                             details={"status": job.status.value, "job_error": error})
    if job.status is JobStatus.CANCELLED:
        raise JobNotFinished(f"job {job_id} was cancelled; it has no stems", code="job_cancelled",
                             details={"status": job.status.value})
    if job.status is not JobStatus.SUCCEEDED:
        raise JobNotFinished(f"job {job_id} is {job.status.value} ({job.progress:.0%} done); "
                             "poll the job until its status is succeeded", code="job_not_finished",
                             details={"status": job.status.value, "progress": round(job.progress, 4)})
    return job
