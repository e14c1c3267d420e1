"""Running one job: from its id to its stems in storage and its record updated.

Plain Python over the job store, the storage and a model cache, so tests drive it
without Celery; `worker.tasks` is the thin Celery edge over `run_job`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time

import redis

from shared.audio import read_info
from shared.config import Settings, get_settings
from shared.errors import DemixError, IllegalTransition, JobNotFound, SeparationFailed
from shared.job_request import default_output
from shared.jobs import JobStatus, JobStore
from shared.output import OutputOptions
from shared.storage import JobStorage
from shared.webhooks import WebhookQueue

from .engine import SeparationOptions, separate_file
from .models import ModelCache, ModelSpec, resolve_device
from .stem_files import JobStemSink

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5
"""Least time between two progress writes to Redis for one job."""


@dataclasses.dataclass
class WorkerContext:
    """What a worker process builds once and reuses for every job."""
    settings: Settings
    jobs: JobStore
    storage: JobStorage
    models: ModelCache


@functools.lru_cache(maxsize=1)
def worker_context() -> WorkerContext:
    """This process's context, built on first use (after the fork, in a prefork pool)."""
    settings = get_settings()
    _configure_torch_threads(settings)
    client = redis.Redis.from_url(settings.effective_redis_url, socket_connect_timeout=5,
                                  socket_timeout=30, health_check_interval=30)
    # A finished job with a callback_url gets its webhook queued (sent by the worker's sender).
    jobs = JobStore(client, on_finished=[WebhookQueue(client, settings).on_job_finished])
    return WorkerContext(settings=settings, jobs=jobs,
                         storage=JobStorage(settings.data_dir), models=ModelCache())


def _configure_torch_threads(settings: Settings) -> None:
    import torch
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // settings.worker_concurrency)
    torch.set_num_threads(threads)


def run_job(job_id: str, context: WorkerContext) -> None:
    """Separate job `job_id` and record the outcome in its job record.

    A job whose record is gone (deleted) or already finished (a duplicate delivery) is
    skipped. Failures the user can act on are recorded as the job's error; anything
    unexpected is recorded too, then re-raised so Celery (and Flower) see it.
    """
    jobs, storage, settings = context.jobs, context.storage, context.settings
    try:
        job = jobs.get(job_id)
    except JobNotFound:
        log.warning("job %s has no record (deleted?); skipping", job_id)
        return
    if job.status.is_finished:
        log.info("job %s is already %s; skipping duplicate delivery", job_id, job.status.value)
        return
    if job.status is JobStatus.RUNNING:
        # A redelivered message of a run whose worker died: take over only if its lease
        # expired; a live lease means another worker is on it.
        try:
            jobs.requeue(job_id, job.attempts, handed_back=False)
        except IllegalTransition as exc:
            log.info("job %s: not taking it over: %s", job_id, exc.message)
            return
    try:
        job = jobs.mark_running(job_id, settings.lease_s)
    except IllegalTransition as exc:
        log.info("job %s: not starting it: %s", job_id, exc.message)
        return
    attempt = job.attempts
    storage.clear_stems(job_id)
    started = time.monotonic()
    try:
        device = resolve_device(settings.device)
        model = context.models.get(ModelSpec(settings.model, settings.model_repo, device,
                                                 cache=str(settings.models_dir)))
        options = SeparationOptions(shifts=settings.shifts, overlap=settings.overlap, device=device,
                                    precision=settings.precision,
                                    batch_segments=settings.batch_segments)
        input_path = storage.input_path(job_id)
        # Records written before output options existed mean the input's own format.
        output = (OutputOptions.from_dict(job.output) if job.output
                  else default_output(read_info(input_path)))
        outputs = separate_file(model, input_path, job.stems, sink=JobStemSink(storage, job_id, output),
                                options=options, progress=ProgressReporter(jobs, job_id, attempt, settings.lease_s),
                                output=output)
    except DemixError as exc:
        log.warning("job %s failed: %s", job_id, exc.message)
        jobs.mark_failed(job_id, exc, attempt)
        return
    except Exception as exc:
        log.exception("job %s failed unexpectedly", job_id)
        jobs.mark_failed(job_id, SeparationFailed(f"separation failed: {type(exc).__name__}: {exc}"),
                         attempt)
        raise
    jobs.mark_succeeded(job_id, outputs, attempt)
    log.info("job %s succeeded in %.1fs (%.1fs of audio)", job_id, time.monotonic() - started,
             job.duration)


class ProgressReporter:
    """Writes a job's progress to its record, at most every `PROGRESS_INTERVAL_S`."""

    def __init__(self, jobs: JobStore, job_id: str, attempt: int, lease_s: float,
                 interval: float = PROGRESS_INTERVAL_S):
        self.jobs, self.job_id, self.interval = jobs, job_id, interval
        self.attempt, self.lease_s = attempt, lease_s
        self._last_write = -float("inf")

    def __call__(self, progress: float) -> None:
        now = time.monotonic()
        if now - self._last_write >= self.interval:
            self._last_write = now
            self.jobs.heartbeat(self.job_id, self.attempt, self.lease_s, progress=progress)
