"""`/v1/jobs`: submit a WAV, poll the job, fetch its stems."""
from __future__ import annotations

import base64
import typing as tp

from flask import Blueprint, Response, current_app, request, send_file, stream_with_context, url_for

from shared.errors import BadRequest, JobNotFinished, JobNotFound
from shared.intake import inspect_upload
from shared.jobs import Job, JobStatus
from shared.stems import ALL, STEM_CHOICES, output_names

from .submission import submit_job
from .uploads import upload_path

bp = Blueprint("jobs", __name__, url_prefix="/v1/jobs")

BASE64_CHUNK_BYTES = 3 * 256 * 1024
"""Bytes of a stem encoded per piece of the /result stream (a multiple of 3, so pieces
concatenate into one valid base64 string)."""


def _services():
    return current_app.extensions["demix"]


def job_json(job: Job) -> dict:
    """The public view of a job, with absolute URLs for what it produced."""
    body = job.to_public()
    body["url"] = url_for("jobs.get_job", job_id=job.id, _external=True)
    if job.status is JobStatus.SUCCEEDED:
        body["outputs"] = {name: url_for("jobs.get_stem", job_id=job.id, name=name, _external=True)
                           for name in job.outputs}
        body["result_url"] = url_for("jobs.get_result", job_id=job.id, _external=True)
    else:
        body["outputs"] = None
    return body


@bp.post("")
def create_job():
    """Accept a WAV upload (`file`) and the `stems` choice; answer 202 with the queued job."""
    services = _services()
    upload = request.files.get("file")
    if upload is None:
        raise BadRequest("missing the multipart file field 'file' (the WAV to separate)",
                         code="missing_file")
    stems = request.form.get("stems", ALL).strip().lower() or ALL
    if stems not in STEM_CHOICES:
        raise BadRequest(f"unknown stems value {stems!r}; expected one of {', '.join(STEM_CHOICES)}",
                         code="invalid_stems")
    # A part over the upload limit was already refused while it streamed (`CappedUploadFile`).
    path = upload_path(upload)
    info = inspect_upload(path, services.settings)
    job = submit_job(path, info, stems, services)
    response = current_app.json.response(job_json(job))
    response.status_code = 202
    response.headers["Location"] = url_for("jobs.get_job", job_id=job.id)
    return response


@bp.get("/<job_id>")
def get_job(job_id: str):
    return job_json(_services().jobs.get(job_id))


@bp.get("/<job_id>/result")
def get_result(job_id: str):
    """All stems as one JSON object: stem name -> base64 of the complete WAV file.

    Streamed piece by piece, so a long track's stems never sit in memory whole.
    """
    services = _services()
    job = _succeeded_job(job_id)
    paths = [(name, services.storage.stem_path(job.id, name)) for name in job.outputs]
    return Response(stream_with_context(_result_json(paths)), mimetype="application/json")


def _result_json(paths: tp.Sequence[tuple[str, tp.Any]]) -> tp.Iterator[bytes]:
    yield b"{"
    for index, (name, path) in enumerate(paths):
        yield (", " if index else "").encode() + f'"{name}": "'.encode()
        with open(path, "rb") as file:
            while piece := file.read(BASE64_CHUNK_BYTES):
                yield base64.b64encode(piece)
        yield b'"'
    yield b"}"


@bp.get("/<job_id>/stems/<name>.wav")
def get_stem(job_id: str, name: str):
    job = _succeeded_job(job_id)
    if name not in job.outputs:
        raise JobNotFound(f"job {job_id} has no stem {name!r}; it has {', '.join(job.outputs)}")
    path = _services().storage.stem_path(job.id, name)
    return send_file(path, mimetype="audio/wav", as_attachment=True,
                     download_name=f"{job.id}_{name}.wav", conditional=True)


def _succeeded_job(job_id: str) -> Job:
    job = _services().jobs.get(job_id)
    if job.status is JobStatus.FAILED:
        error = job.error or {"code": "unknown", "message": "unknown error"}
        raise JobNotFinished(f"job {job_id} failed: {error['message']}", code="job_failed",
                             details={"status": job.status.value, "job_error": error})
    if job.status is not JobStatus.SUCCEEDED:
        raise JobNotFinished(f"job {job_id} is {job.status.value} ({job.progress:.0%} done); "
                             "poll the job until its status is succeeded", code="job_not_finished",
                             details={"status": job.status.value, "progress": round(job.progress, 4)})
    return job
