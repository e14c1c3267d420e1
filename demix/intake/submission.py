"""Turning a staged upload, or a URL to fetch, into a queued job, for every door (HTTP,
gRPC) alike: the intake checks, the job request, the private-address rule, the per-key
limit, the idempotency key, the record and the message, all or nothing."""
from __future__ import annotations

import logging
import time
import typing as tp
from pathlib import Path

from demix.audio.io import AudioInfo
from demix.catalogue import warm_model_notes
from demix.errors import JobNotFound, ServiceUnavailable, TooManyActiveJobs
from demix.jobs.idempotency import IdempotencyKeys
from demix.intake.inspection import inspect_upload
from demix.jobs.records import Job, JobStatus, new_job_id
from demix.intake.job_request import URL_FIELD, JobRequest, parse_job_request
from demix.jobs.lifecycle import end_children, enqueue_job
from demix.outbound import check_public_url, check_url_syntax
from demix.readiness import ready_workers
from demix.services import Services
from demix.workflows.runs import new_workflow_job, start_workflow
from demix.workflows.spec import Workflow

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


URL_INPUT_PLACEHOLDER = AudioInfo(samplerate=44100, channels=2, frames=0, subtype="PCM_16", container="WAV")
"""What a `url` job's fields are checked against at submission, before its input is known
(its output defaults are resolved again from the real input once it is fetched)."""


def submit_upload(upload: Path, fields: tp.Mapping[str, str], services: Services, owner: str = "",
                  idempotent: tp.Optional[IdempotentSubmit] = None) -> tuple[Job, bool]:
    """Check a staged upload (`demix.intake.inspection`) and the job's fields (`demix.intake.job_request`),
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
    job_request = _checked_request(fields, info, services)

    def queue(job_id: str) -> Job:
        return submit_job(upload, info, job_request, services, owner=owner, job_id=job_id)

    return _queue_once(queue, services, idempotent)


def reported_models(services: Services) -> dict[str, dict]:
    """Per model, what one warm worker process said of it when it loaded it (its sources)."""
    try:
        notes = warm_model_notes(ready_workers(services.jobs.redis))
    except Exception as exc:  # Redis down: the submit fails at the record with the right error
        log.warning("could not read the warm workers: %s", exc)
        return {}
    return {name: entries[0] for name, entries in notes.items()}


def submit_url(url: str, fields: tp.Mapping[str, str], services: Services, owner: str = "",
               idempotent: tp.Optional[IdempotentSubmit] = None) -> tuple[Job, bool]:
    """Queue a job whose input a worker fetches from `url` (http or https) before it
    separates it, with the same intake checks as an upload; returns the job and whether
    it was created now.

    Raises:
        BadRequest: (`invalid_url`) the URL is malformed; a field is refused.
        AddressNotAllowed: (`url_not_allowed`) its host is on a private range.
        TooManyActiveJobs, ServiceUnavailable: as for `submit_upload`.
    """
    url = check_url_syntax(url, "url")
    check_public_url(url, "url", services.settings.allow_private_urls)
    job_request = _checked_request(fields, URL_INPUT_PLACEHOLDER, services)
    request_fields = {name: str(value) for name, value in fields.items() if name != URL_FIELD}

    def queue(job_id: str) -> Job:
        if job_request.workflow is not None:  # its first unit fetches the input
            return queue_new_job(new_workflow_job(job_request.workflow, None, None, owner=owner,
                                                  callback_url=job_request.callback_url, job_id=job_id,
                                                  source_url=url, request_fields=request_fields,
                                                  cache=job_request.cache), services)
        model = job_request.model or services.settings.default_model
        job = Job(id=job_id, status=JobStatus.QUEUED, stems=job_request.stems, model=model,
                  samplerate=0, channels=0, frames=0, created_at=time.time(), queue=services.settings.queue_for(model),
                  owner=owner, callback_url=job_request.callback_url, source_url=url, use_cache=job_request.cache,
                  request_fields=request_fields)
        return queue_new_job(job, services)

    return _queue_once(queue, services, idempotent)


def _checked_request(fields: tp.Mapping[str, str], info: AudioInfo, services: Services) -> JobRequest:
    job_request = parse_job_request(fields, info, services.settings, reported_models(services))
    if job_request.callback_url:
        check_public_url(job_request.callback_url, "callback_url", services.settings.allow_private_urls)
    return job_request


def _queue_once(queue: tp.Callable[[str], Job], services: Services,
                idempotent: tp.Optional[IdempotentSubmit]) -> tuple[Job, bool]:
    """`queue(new_job_id)` unless a submit with the same key already created a job: returns
    the job and whether it was created now. Of concurrent submits with one key, exactly one
    creates the job; the others get it (and their upload is left for the caller to discard)."""
    job_id = new_job_id()
    if idempotent is None:
        return queue(job_id), True
    keys = idempotency_keys(services)
    existing = keys.claim(idempotent.owner, idempotent.key, job_id)
    if existing is not None:
        return services.jobs.get(existing), False
    try:
        job = queue(job_id)
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
    """Store the upload as a new job's input, record the job (as `owner`'s) and enqueue it
    on its model's queue (all or nothing, as `queue_new_job`)."""
    if job_request.workflow is not None:
        return queue_new_job(new_workflow_job(job_request.workflow, info, job_request.output, owner=owner,
                                              callback_url=job_request.callback_url, job_id=job_id,
                                              cache=job_request.cache),
                             services, upload)
    model = job_request.model or services.settings.default_model
    job = Job(id=job_id or new_job_id(), status=JobStatus.QUEUED, stems=job_request.stems,
              model=model, samplerate=info.samplerate, channels=info.channels,
              frames=info.frames, created_at=time.time(), input_format=info.input_format,
              output=job_request.output.to_dict(), queue=services.settings.queue_for(model), owner=owner,
              callback_url=job_request.callback_url, use_cache=job_request.cache)
    return queue_new_job(job, services, upload)


def queue_new_job(job: Job, services: Services, upload: tp.Optional[Path] = None) -> Job:
    """Store `upload` (if any) as the new job's input, record the job and enqueue it.

    Either all happen or none: if the record or the message cannot be written, or the
    owner is at its active-job limit, the job's files and record are removed again.

    Raises:
        TooManyActiveJobs: the job's owner already has `DEMIX_MAX_ACTIVE_JOBS_PER_KEY` active jobs.
        ServiceUnavailable: Redis or the broker is unreachable.
    """
    upload_bytes = upload.stat().st_size if upload is not None else 0
    if upload is not None:
        services.storage.accept_upload(upload, job.id)
    try:
        services.jobs.create(job, upload_bytes=upload_bytes)
        if job.owner:
            # After the record exists, so pruning finished jobs can never drop this one.
            services.limits.reserve(job.owner, job.id)
        if job.workflow:
            start_workflow(job, services)  # its first runs
        else:
            enqueue_job(services.celery, job.id, job.queue)
    except TooManyActiveJobs:
        _roll_back(job.id, services)
        raise
    except Exception as exc:
        log.error("could not enqueue job %s: %s", job.id, exc)
        _roll_back(job.id, services)
        raise ServiceUnavailable("the job queue (Redis) is unreachable; nothing was kept, "
                                 "try again shortly") from exc
    if job.workflow:
        log.info("started workflow job %s (%s, %.1fs)", job.id, ", ".join(Workflow.from_dict(job.workflow).models),
                 job.duration)
    elif job.source_url:
        log.info("queued job %s (%s %s, from a URL) on %s", job.id, job.model, job.stems, job.queue)
    else:
        log.info("queued job %s (%s %s, %.1fs, %d Hz, %d ch) on %s", job.id, job.model, job.stems,
                 job.duration, job.samplerate, job.channels, job.queue)
    return job


def _roll_back(job_id: str, services: Services) -> None:
    try:
        end_children(services.jobs, services.storage, job_id, delete=True)  # a workflow's first runs
    except Exception:  # the store is what failed; the runs' records, if any, die with the job's
        pass
    services.storage.delete_job(job_id)
    try:
        services.jobs.delete(job_id)
    except Exception:  # the store is what failed; nothing more to undo there
        pass
