"""Turning a staged upload into a queued job, for every door (HTTP, gRPC) alike: the
intake checks, the job request, the per-key limit, the idempotency key, the record and
the message, all or nothing."""
from __future__ import annotations

import logging
import time
import typing as tp
from pathlib import Path

from .audio import AudioInfo
from .catalogue import warm_model_notes
from .errors import JobNotFound, ServiceUnavailable, TooManyActiveJobs
from .idempotency import IdempotencyKeys
from .intake import inspect_upload
from .jobs import Job, JobStatus, new_job_id
from .job_request import JobRequest, parse_job_request
from .lifecycle import enqueue_job
from .readiness import ready_workers
from .services import Services

log = logging.getLogger(__name__)


class IdempotentSubmit(tp.NamedTuple):
    """A submit's `Idempotency-Key` and whose key it is."""
    owner: str
    key: str


def idempotency_keys(services) -> IdempotencyKeys:
    """The key -> job map, in the job store's Redis, keys kept as long as finished jobs are."""
    def job_exists(job_id: str) -> bool:
        try:
            services.jobs.get(job_id)
        except JobNotFound:
            return False
        return True

    settings = services.settings
    ttl_s = settings.retention_s + settings.job_timeout_s if settings.retention_s else 0
    return IdempotencyKeys(services.jobs.redis, ttl_s, job_exists)


def find_existing_job(idempotent: IdempotentSubmit, services: Services) -> tp.Optional[Job]:
    """The job an earlier submit with the same key created, if it still exists."""
    job_id = idempotency_keys(services).find(idempotent.owner, idempotent.key)
    if job_id is None:
        return None
    try:
        return services.jobs.get(job_id)
    except JobNotFound:  # deleted just now
        return None


def submit_upload(upload: Path, fields: tp.Mapping[str, str], services: Services, owner: str = "",
                  idempotent: tp.Optional[IdempotentSubmit] = None) -> tuple[Job, bool]:
    """Check a staged upload (`shared.intake`) and the job's fields (`shared.job_request`),
    then queue it as `owner`'s job; returns the job and whether it was created now (False:
    an earlier submit with the same `idempotent` key created it).

    The upload is moved into the job when accepted; otherwise it is left for the caller to
    delete.

    Raises:
        InvalidAudio, UnsupportedMediaType, BadRequest: the upload or a field is refused.
        TooManyActiveJobs: `owner` already has `DEMIX_MAX_ACTIVE_JOBS_PER_KEY` active jobs.
        ServiceUnavailable: Redis or the broker is unreachable.
    """
    info = inspect_upload(upload, services.settings)
    job_request = parse_job_request(fields, info, services.settings, reported_models(services))
    if idempotent is None:
        return submit_job(upload, info, job_request, services, owner=owner), True
    return submit_job_once(upload, info, job_request, services, idempotent, owner=owner)


def reported_models(services: Services) -> dict[str, dict]:
    """Per model, what one warm worker process said of it when it loaded it (its sources)."""
    try:
        notes = warm_model_notes(ready_workers(services.jobs.redis))
    except Exception as exc:  # Redis down: the submit fails at the record with the right error
        log.warning("could not read the warm workers: %s", exc)
        return {}
    return {name: entries[0] for name, entries in notes.items()}


def submit_job_once(upload: Path, info: AudioInfo, job_request: JobRequest, services: Services,
                    idempotent: IdempotentSubmit, owner: str = "") -> tuple[Job, bool]:
    """`submit_job` unless a submit with the same key already created a job: returns the
    job and whether it was created now. Of concurrent submits with one key, exactly one
    creates the job; the others get it (and their upload is left for the caller to discard).

    Raises:
        TooManyActiveJobs: `owner` already has `DEMIX_MAX_ACTIVE_JOBS_PER_KEY` active jobs.
        ServiceUnavailable: Redis or the broker is unreachable.
    """
    keys, job_id = idempotency_keys(services), new_job_id()
    existing = keys.claim(idempotent.owner, idempotent.key, job_id)
    if existing is not None:
        return services.jobs.get(existing), False
    try:
        job = submit_job(upload, info, job_request, services, owner=owner, job_id=job_id)
    except BaseException:
        try:
            keys.release(idempotent.owner, idempotent.key, job_id)
        except Exception:  # Redis is what failed; the stale claim expires on its own
            log.warning("could not release idempotency key of job %s", job_id)
        raise
    keys.confirm(idempotent.owner, idempotent.key, job_id)
    return job, True


def submit_job(upload: Path, info: AudioInfo, job_request: JobRequest, services: Services, owner: str = "",
               job_id: tp.Optional[str] = None) -> Job:
    """Store the upload as a new job's input, record the job (as `owner`'s) and enqueue it.

    Either all three happen or none: if the record or the message cannot be written, or
    the owner is at its active-job limit, the job's files and record are removed again.

    Raises:
        TooManyActiveJobs: `owner` already has `DEMIX_MAX_ACTIVE_JOBS_PER_KEY` active jobs.
        ServiceUnavailable: Redis or the broker is unreachable.
    """
    settings = services.settings
    model = job_request.model or settings.default_model
    job = Job(id=job_id or new_job_id(), status=JobStatus.QUEUED, stems=job_request.stems,
              model=model, samplerate=info.samplerate, channels=info.channels,
              frames=info.frames, created_at=time.time(), input_format=f"{info.container}/{info.subtype}",
              output=job_request.output.to_dict(), queue=settings.queue_for(model), owner=owner,
              callback_url=job_request.callback_url)
    upload_bytes = upload.stat().st_size
    services.storage.accept_upload(upload, job.id)
    try:
        services.jobs.create(job, upload_bytes=upload_bytes)
        if owner:
            # After the record exists, so pruning finished jobs can never drop this one.
            services.limits.reserve(owner, job.id)
        enqueue_job(services.celery, job.id, job.queue)
    except TooManyActiveJobs:
        _roll_back(job.id, services)
        raise
    except Exception as exc:
        log.error("could not enqueue job %s: %s", job.id, exc)
        _roll_back(job.id, services)
        raise ServiceUnavailable("the job queue (Redis) is unreachable; the upload was not kept, "
                                 "try again shortly") from exc
    log.info("queued job %s (%s %s, %.1fs, %d Hz, %d ch) on %s", job.id, job.model, job.stems, job.duration,
             job.samplerate, job.channels, job.queue)
    return job


def _roll_back(job_id: str, services: Services) -> None:
    services.storage.delete_job(job_id)
    try:
        services.jobs.delete(job_id)
    except Exception:  # the store is what failed; nothing more to undo there
        pass
