"""Running one job: from its id to its stems in storage and its record updated.

Plain Python over the job store, the storage and a model cache, so tests drive it
without Celery; `demix.worker.tasks` is the thin Celery edge over `run_job`.

A run is one *attempt* of the job (`demix.jobs.records`): it holds the job's lease while it
runs (renewed by a heartbeat thread and by every progress write), writes its stems into
its own attempt folder, and stops at the next segment when the job is cancelled or
deleted, when another attempt replaced it, or when its worker shuts down (it then hands
the job back to the queue). Writes tolerate a Redis outage: heartbeats and progress
skip while Redis is unreachable, the final outcome is retried until it is recorded.
"""
from __future__ import annotations

import functools
import logging
import os
import time
import typing as tp
import warnings

import torch

from demix.audio.io import read_info
from demix.celery_app import celery_app
from demix.catalogue import DEMUCS
from demix.config import Settings, get_settings
from demix.errors import DemixError, IllegalTransition, JobNotFound, SeparationFailed
from demix.jobs.records import Job, JobStatus
from demix.jobs.lifecycle import hand_back_job, recover_lost_job
from demix.audio.output_formats import OutputOptions, default_output
from demix.readiness import mark_ready, process_id
from demix.services import build_services
from demix.storage.local import disk_full_error

from demix.separation import (JobStemSink, ModelCache, batch_segments, keep_freed_memory_for_reuse,
                              resolve_device, separate_file, stem_layout, warm_model)
from demix.worker.attempt import (AttemptLease, JobInterrupted, WorkerContext, attempt_scratch, job_model_spec,
                                  lease_holder, model_spec, record_outcome, retry_while_redis_is_down,
                                  separation_options)
from demix.worker.cached_runs import run_key, serve_from_cache, store_in_cache
from demix.worker.split import should_split, start_split
from demix.worker.workflow_units import is_workflow_unit, run_workflow_unit
from demix.intake.url_jobs import fetch_input

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def worker_context() -> WorkerContext:
    """This process's context, built on first use (after the fork, in a prefork pool)."""
    settings = get_settings()
    _configure_process(settings)
    services = build_services(settings, celery=celery_app)
    return WorkerContext(settings=settings, jobs=services.jobs, storage=services.storage, models=ModelCache())


def _configure_process(settings: Settings) -> None:
    """Torch's threads, and malloc keeping the memory forwards free for the next one."""
    import torch
    keep_freed_memory_for_reuse()
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // settings.worker_concurrency)
    torch.set_num_threads(threads)


def warm_up(context: WorkerContext) -> dict:
    """Load each model this worker serves (`DEMIX_WORKER_MODELS`) and run it once, as jobs
    will, then record this process as ready (`demix.readiness`); returns what was recorded.

    Called when a worker process starts, so that its first job pays neither the load nor
    the first forward's one-time costs. The entry says, per model, its architecture,
    sources and sample rate (the catalogue shows them) and the load and warm-up times. A
    model that cannot be loaded is recorded with its error (its jobs then fail saying how
    to provide weights) instead of stopping the worker.
    """
    settings = context.settings
    served = settings.worker_served_models
    note: dict = {"model": served[0], "precision": settings.precision, "models": {}}
    try:
        note["device"] = device = resolve_device(settings.device)
    except DemixError as exc:
        note["error"] = exc.message
        note["models"] = {name: {"error": exc.message} for name in served}
        log.warning("worker %s: no device: %s", process_id(), exc.message)
        mark_ready(context.jobs.redis, note)
        return note
    for name in served:
        note["models"][name] = warm_one(context, name, device)
    if all("error" in model_note for model_note in note["models"].values()):
        note["error"] = note["models"][served[0]]["error"]
    mark_ready(context.jobs.redis, note)
    return note


def warm_one(context: WorkerContext, name: str, device: str) -> dict:
    """Load and warm model `name`; what the readiness entry says of it."""
    settings = context.settings
    started = time.monotonic()
    try:
        model = context.models.get(model_spec(settings, device, name))
        note: dict = {"architecture": model_architecture(model), "sources": list(model.sources),
                      "samplerate": int(model.samplerate), "load_s": round(time.monotonic() - started, 3)}
        options = separation_options(settings, device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warm_model(model, device, options.precision, batch_segments(options.batch_segments, device))
        for warning in caught:  # e.g. bf16 on a CPU without bf16 kernels: said once, here
            log.warning("warm-up: %s", warning.message)
        note["warmup_s"] = round(time.monotonic() - started - note["load_s"], 3)
        log.info("worker %s: model %s warm on %s in %s (load %.1fs, first forward %.1fs)",
                 process_id(), name, device, settings.precision, note["load_s"], note["warmup_s"])
    except DemixError as exc:
        note = {"error": exc.message}
        log.warning("worker %s: model %s not loaded: %s", process_id(), name, exc.message)
    return note


def model_architecture(model: torch.nn.Module) -> str:
    """The catalogue's name of a loaded model's architecture."""
    from demix.separation import is_roformer

    return model.config.architecture if is_roformer(model) else DEMUCS


def run_job(job_id: str, context: WorkerContext, worker: str = "") -> None:
    """Run one attempt of job `job_id` and record the outcome in its job record.

    `worker` identifies the Celery worker running it (`demix.worker.tasks.worker_identity`; its
    shutdown hands the job back). A delivery of a job that is deleted, finished, or
    running under another attempt's live lease (a late or duplicate message) is skipped.
    Failures the user can act on are recorded as the job's error; anything unexpected is
    recorded too, then re-raised so Celery (and Flower) see it.
    """
    job = _claim(job_id, context, worker)
    if job is None:
        return
    # The lease is held until the outcome is recorded, which may wait out a Redis outage.
    with AttemptLease(context, job_id, job.attempts, worker) as lease, attempt_scratch(context.storage):
        _run_attempt(job, context, lease)


def _run_attempt(job: Job, context: WorkerContext, lease: AttemptLease) -> None:
    job_id, attempt = job.id, job.attempts
    started = time.monotonic()
    unexpected: tp.Optional[Exception] = None
    try:
        try:
            outputs = _separate(job, attempt, context, lease)
        except Exception:
            # A job cancelled or deleted mid-run loses its files under the run: that is
            # the reason to stop, not an error of the job.
            lease.confirm()
            raise
        if outputs is None:
            log.info("job %s attempt %d: split into parts, sent to the workers", job_id, attempt)
            return
    except JobInterrupted as stop:
        _abandon(job_id, attempt, stop, context)
        return
    except DemixError as exc:
        log.warning("job %s attempt %d failed: %s", job_id, attempt, exc.message)
        error: DemixError = exc
    except Exception as exc:
        if (disk_full := disk_full_error(exc)) is not None:  # an expected failure, not a bug
            log.error("job %s attempt %d failed: %s", job_id, attempt, disk_full.message)
            error = disk_full
        else:
            log.exception("job %s attempt %d failed unexpectedly", job_id, attempt)
            error, unexpected = SeparationFailed(f"separation failed: {type(exc).__name__}: {exc}"), exc
    else:
        if record_outcome(job_id, attempt, context,
                   lambda: context.jobs.mark_succeeded(job_id, outputs, attempt)):
            context.storage.clear_other_attempts(job_id, keep=attempt)
            log.info("job %s succeeded on attempt %d in %.1fs (%.1fs of audio)", job_id, attempt,
                     time.monotonic() - started, job.duration)
        return
    context.storage.clear_stems(job_id, attempt)
    recorded = record_outcome(job_id, attempt, context, lambda: context.jobs.mark_failed(job_id, error, attempt))
    if unexpected is not None and recorded:  # else it came from the job vanishing under it
        raise unexpected


def _claim(job_id: str, context: WorkerContext, worker: str) -> tp.Optional[Job]:
    """Start a new attempt of the job, or None when this delivery must be skipped."""
    jobs, settings = context.jobs, context.settings
    try:
        job = jobs.get(job_id)
    except JobNotFound:
        log.warning("job %s has no record (deleted?); skipping", job_id)
        return None
    if job.status.is_finished:
        log.info("job %s is already %s; skipping a late or duplicate delivery", job_id, job.status.value)
        return None
    if job.status is JobStatus.RUNNING:
        # A message redelivered after its worker died: recover the job now if that worker's
        # lease expired (else another worker runs it, and this message is a duplicate).
        holder = jobs.lease_holder(job_id)
        if holder is not None:
            log.info("job %s runs under a live lease (%s); skipping a duplicate delivery", job_id, holder)
            return None
        # Requeued (and sent again: that message starts the next attempt) or failed.
        recover_lost_job(jobs, context.celery, settings.queue, job_id, job.attempts, settings.max_attempts)
        return None
    try:
        return jobs.mark_running(job_id, settings.lease_s, holder=lease_holder(worker))
    except (IllegalTransition, JobNotFound) as exc:
        log.info("job %s: not starting it: %s", job_id, exc.message)
        return None


def _separate(job: Job, attempt: int, context: WorkerContext,
              lease: AttemptLease) -> tp.Optional[list[str]]:
    """Separate the job's stems into its attempt folder and return their names, or
    (a long job) prepare its parts, send them and return None."""
    settings, storage = context.settings, context.storage
    if is_workflow_unit(job):  # a workflow's step stems or outputs: no model runs
        return run_workflow_unit(job, attempt, context, lease)
    if job.awaits_input:
        job = fetch_input(job, context, lease)
    device = resolve_device(settings.device)
    spec = job_model_spec(job, settings, device)
    model = context.models.get(spec)
    lease.check()
    options = separation_options(settings, device)
    # A job deleted or cancelled meanwhile has no input any more: the caller confirms why.
    with storage.input_file(job.id) as input_path:
        # Records written before output options existed mean the input's own format.
        output = OutputOptions.from_dict(job.output) if job.output else default_output(read_info(input_path))
        layout = stem_layout(model, input_path, job.stems, output)
        key = run_key(job, context, model, spec, options, input_path, layout)
        if key is not None and (names := serve_from_cache(job, attempt, context, lease, key, input_path,
                                                          layout)) is not None:
            return names
        if should_split(job, settings, model, layout):
            start_split(job, attempt, context, lease, model, layout, input_path)
            return None
        names = separate_file(model, input_path, job.stems, sink=JobStemSink(storage, job.id, output, attempt),
                              options=options, progress=lease.report_progress, output=output)
        store_in_cache(job, attempt, context, key, model, names, layout)
        return names


def _abandon(job_id: str, attempt: int, stop: JobInterrupted, context: WorkerContext) -> None:
    """Stop a run that must not finish: remove what it wrote; hand the job back if its
    worker stops."""
    storage = context.storage
    if stop.reason in ("cancelled", "deleted"):
        storage.delete_job(job_id)  # the API removed the files; remove what was written since
    else:
        storage.clear_stems(job_id, attempt)
    if stop.reason == "stopping":
        retry_while_redis_is_down(lambda: hand_back_job(context.jobs, context.celery,
                                                         context.settings.queue, job_id, attempt))
    log.info("job %s attempt %d stopped: %s", job_id, attempt, stop)


