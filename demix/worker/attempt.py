"""One attempt of a job, as every kind of worker run holds it: the worker's context, the
attempt's lease on its job, and recording an outcome through a Redis outage.

Both the unsplit run (`demix.worker.runner`) and the units of a split job (`demix.worker.split`)
build on this module; neither imports the other's internals.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
import typing as tp

import redis

from demix import redis_keys as keys
from demix.celery_app import celery_app
from demix.config import Settings
from demix.errors import IllegalTransition, JobNotFound, ModelUnavailable, StaleAttempt
from demix.jobs.records import Job, JobStore
from demix.storage.local import Storage

from demix.separation import ModelCache, ModelSpec, SeparationOptions

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.5
"""Least time between two progress writes (each also a cancel check) for one job."""

HEARTBEATS_PER_LEASE = 3
"""The heartbeat renews a lease this many times per lease period, so one or two missed
beats (a busy machine, a Redis hiccup) do not lose it."""

REDIS_RETRY_S = 1.0
"""Wait between two tries of a write while Redis is unreachable."""

FINAL_WRITE_PATIENCE_S = 600.0
"""How long a finished run keeps trying to record its outcome while Redis is down."""

REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


@dataclasses.dataclass
class WorkerContext:
    """What a worker process builds once and reuses for every job."""
    settings: Settings
    jobs: JobStore
    storage: Storage
    models: ModelCache
    celery: tp.Any = celery_app


def model_spec(settings: Settings, device: str, model: tp.Optional[str] = None) -> ModelSpec:
    """Model `model` (default: the settings' default model), on `device`."""
    return ModelSpec(model or settings.default_model, settings.model_repo, device,
                     cache=str(settings.models_dir))


def job_model_spec(job: Job, settings: Settings, device: str) -> ModelSpec:
    """The model of `job` (a record from before models were chosen per job: the default).

    Raises:
        ModelUnavailable: this worker does not serve the job's model (its queue belongs to
            another model: DEMIX_MODELS differs between the API and this worker).
    """
    name = job.model or settings.default_model
    if name not in settings.worker_served_models:
        raise ModelUnavailable(f"this job's model {name!r} is not served by the worker that took it from "
                               f"queue {job.queue!r} (it serves {', '.join(settings.worker_served_models)}); "
                               "DEMIX_MODELS must be the same for the API and every worker")
    return model_spec(settings, device, name)


def separation_options(settings: Settings, device: str) -> SeparationOptions:
    """How the settings ask jobs to run the model on `device`."""
    return SeparationOptions(shifts=settings.shifts, overlap=settings.overlap, device=device,
                             precision=settings.precision, batch_segments=settings.batch_segments)


@contextlib.contextmanager
def attempt_scratch(storage: Storage) -> tp.Iterator[None]:
    """This process's scratch folder, empty for the attempt (or unit) run in the block and
    emptied after it, however it ends: nothing an earlier attempt of this process left (or a
    dead process whose pid this one reuses) takes room, and nothing outlives the attempt.
    A worker process runs one attempt at a time (Celery's prefork pool), so its folder is
    the attempt's."""
    storage.clear_scratch()
    try:
        yield
    finally:
        storage.clear_scratch()


class JobInterrupted(Exception):
    """The running attempt must stop at once; `reason` is cancelled, deleted, superseded
    or stopping (its worker shuts down)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def lease_holder(worker: str) -> str:
    """How a lease names its holder: the worker and the process running the job."""
    return f"{worker or socket.gethostname()} process {os.getpid()}"


def record_outcome(job_id: str, attempt: int, context: WorkerContext, write: tp.Callable[[], Job]) -> bool:
    """Record a run's outcome; False when the job was cancelled, deleted or taken over
    meanwhile (the run's files are then removed: they are nobody's)."""
    try:
        retry_while_redis_is_down(write)
        return True
    except (IllegalTransition, JobNotFound) as exc:
        log.warning("job %s attempt %d: outcome discarded: %s", job_id, attempt, exc.message)
        gone = isinstance(exc, JobNotFound) or (not isinstance(exc, StaleAttempt)
                                                and exc.details.get("status") == "cancelled")
        if gone:
            context.storage.delete_job(job_id)
        else:
            context.storage.clear_stems(job_id, attempt)
        return False


T = tp.TypeVar("T")


def retry_while_redis_is_down(write: tp.Callable[[], T], patience: float = FINAL_WRITE_PATIENCE_S) -> T:
    """Run `write`, trying again every `REDIS_RETRY_S` while Redis is unreachable (for at
    most `patience` seconds, then its error is raised)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return write()
        except REDIS_DOWN as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("Redis unreachable (%s); retrying in %.0fs", exc, REDIS_RETRY_S)
            time.sleep(REDIS_RETRY_S)


class AttemptLease:
    """One attempt's hold on its job while it runs.

    A heartbeat thread renews the lease every `lease_s / HEARTBEATS_PER_LEASE`;
    `report_progress` (the engine's progress callback) writes progress at most every
    `PROGRESS_INTERVAL_S`, which renews the lease too. Either one learns when the attempt
    must stop (job cancelled, deleted or taken over; the worker shutting down), and
    `report_progress`/`check` then raise `JobInterrupted`. Redis being unreachable is not
    a reason to stop: the writes are skipped until it is back.
    """

    def __init__(self, context: WorkerContext, job_id: str, attempt: int, worker: str,
                 interval: float = PROGRESS_INTERVAL_S):
        self.jobs, self.job_id, self.attempt, self.worker = context.jobs, job_id, attempt, worker
        self.lease_s = context.settings.lease_s
        self.holder = lease_holder(worker)
        self.interval = interval
        self._last_write = -float("inf")
        self._interrupted: tp.Optional[JobInterrupted] = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id[:8]}", daemon=True)

    def __enter__(self) -> AttemptLease:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._thread.join()

    def check(self) -> None:
        """Raise `JobInterrupted` if the attempt must stop."""
        if self._interrupted is not None:
            raise self._interrupted

    def confirm(self) -> None:
        """Renew the lease now and raise `JobInterrupted` if the attempt must stop."""
        self._renew(None)
        self.check()

    def report_progress(self, progress: float) -> None:
        """Record progress (rate-limited) and stop the run if it must stop."""
        self.check()
        now = time.monotonic()
        if now - self._last_write >= self.interval:
            self._last_write = now
            self._renew(progress)
            self.check()

    def _beat(self) -> None:
        # Beats on after learning that the run must stop: until the run reaches its next
        # segment and hands the job back, the job is still its own.
        period = self.lease_s / HEARTBEATS_PER_LEASE
        while not self._done.wait(period):
            self._renew(None)

    def _renew(self, progress: tp.Optional[float]) -> None:
        try:
            self._write(progress)
            if self.worker and self.jobs.redis.exists(keys.worker_stopping_key(self.worker)):
                self._interrupt("stopping", f"worker {self.worker} is shutting down")
        except REDIS_DOWN as exc:
            log.warning("job %s: Redis unreachable, lease not renewed (%s)", self.job_id, exc)
        except JobNotFound:
            self._interrupt("deleted", "the job was deleted")
        except StaleAttempt as exc:
            self._interrupt("superseded", exc.message)
        except IllegalTransition as exc:
            status = exc.details.get("status")
            self._interrupt("cancelled" if status == "cancelled" else "superseded",
                            f"the job is {status}")

    def _write(self, progress: tp.Optional[float]) -> None:
        """Renew the lease and record `progress` (None: none), fenced by the attempt."""
        self.jobs.heartbeat(self.job_id, self.attempt, self.lease_s, self.holder, progress=progress)

    def _interrupt(self, reason: str, message: str) -> None:
        if self._interrupted is None:
            self._interrupted = JobInterrupted(reason, message)
