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
import warnings

import redis

from shared.audio import read_info
from shared.config import Settings, get_settings
from shared.errors import DemixError, JobNotFound, SeparationFailed
from shared.jobs import JobStore
from shared.output import OutputOptions, resolve_output
from shared.readiness import mark_ready, process_id
from shared.storage import JobStorage

from .engine import SeparationOptions, separate_file
from .forward import batch_segments, warm_model
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
    return WorkerContext(settings=settings, jobs=JobStore(client),
                         storage=JobStorage(settings.data_dir), models=ModelCache())


def _configure_torch_threads(settings: Settings) -> None:
    import torch
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // settings.worker_concurrency)
    torch.set_num_threads(threads)


def model_spec(settings: Settings, device: str) -> ModelSpec:
    """The model the settings ask for, on `device`."""
    return ModelSpec(settings.model, settings.model_repo, device, cache=str(settings.models_dir))


def separation_options(settings: Settings, device: str) -> SeparationOptions:
    """How the settings ask jobs to run the model on `device`."""
    return SeparationOptions(shifts=settings.shifts, overlap=settings.overlap, device=device,
                             precision=settings.precision, batch_segments=settings.batch_segments)


def warm_up(context: WorkerContext) -> dict:
    """Load the model and run it once, as jobs will, then record this process as ready
    (`shared.readiness`); returns what was recorded.

    Called when a worker process starts, so that its first job pays neither the load nor
    the first forward's one-time costs. A model that cannot be loaded is recorded with its
    error (jobs then fail saying how to provide weights) instead of stopping the worker.
    """
    settings = context.settings
    note: dict = {"model": settings.model, "precision": settings.precision}
    started = time.monotonic()
    try:
        device = resolve_device(settings.device)
        note["device"] = device
        model = context.models.get(model_spec(settings, device))
        note["load_s"] = round(time.monotonic() - started, 3)
        options = separation_options(settings, device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warm_model(model, device, options.precision, batch_segments(options.batch_segments, device))
        for warning in caught:  # e.g. bf16 on a CPU without bf16 kernels: said once, here
            log.warning("warm-up: %s", warning.message)
        note["warmup_s"] = round(time.monotonic() - started - note["load_s"], 3)
        log.info("worker %s: model %s warm on %s in %s (load %.1fs, first forward %.1fs)",
                 process_id(), settings.model, device, settings.precision, note["load_s"],
                 note["warmup_s"])
    except DemixError as exc:
        note["error"] = exc.message
        log.warning("worker %s: model %s not loaded: %s", process_id(), settings.model, exc.message)
    mark_ready(context.jobs.redis, note)
    return note


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
    jobs.mark_running(job_id)
    storage.clear_stems(job_id)
    started = time.monotonic()
    try:
        device = resolve_device(settings.device)
        model = context.models.get(model_spec(settings, device))
        options = separation_options(settings, device)
        input_path = storage.input_path(job_id)
        # Records written before output options existed mean the input's own format.
        output = (OutputOptions.from_dict(job.output) if job.output
                  else resolve_output({}, read_info(input_path)))
        outputs = separate_file(model, input_path, job.stems, sink=JobStemSink(storage, job_id, output),
                                options=options, progress=ProgressReporter(jobs, job_id),
                                output=output)
    except DemixError as exc:
        log.warning("job %s failed: %s", job_id, exc.message)
        jobs.mark_failed(job_id, exc)
        return
    except Exception as exc:
        log.exception("job %s failed unexpectedly", job_id)
        jobs.mark_failed(job_id, SeparationFailed(f"separation failed: {type(exc).__name__}: {exc}"))
        raise
    jobs.mark_succeeded(job_id, outputs)
    log.info("job %s succeeded in %.1fs (%.1fs of audio)", job_id, time.monotonic() - started,
             job.duration)


class ProgressReporter:
    """Writes a job's progress to its record, at most every `PROGRESS_INTERVAL_S`."""

    def __init__(self, jobs: JobStore, job_id: str, interval: float = PROGRESS_INTERVAL_S):
        self.jobs, self.job_id, self.interval = jobs, job_id, interval
        self._last_write = -float("inf")

    def __call__(self, progress: float) -> None:
        now = time.monotonic()
        if now - self._last_write >= self.interval:
            self._last_write = now
            self.jobs.set_progress(self.job_id, progress)
