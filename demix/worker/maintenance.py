"""The maintenance loop every worker runs beside its jobs: periodic sweeps that keep the
service healthy without anyone watching (requeueing jobs whose worker died, sending again
the tasks of queued jobs whose broker message was lost; more sweeps are added to `SWEEPS`).

The loop runs in each Celery worker's background process (`demix.worker.background`, never in
the main process, which forks the pool), once at start and then each sweep at its own
interval. It never imports torch. Sweeps must be safe to run in many workers at once: every state
change they make goes through the job store's atomic moves.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import typing as tp

import redis

from demix.jobs.broker import delivered_job_ids, waiting_job_ids
from demix.config import Settings, get_settings
from demix.errors import DemixError, JobNotFound, WorkerLost
from demix.jobs.records import JobStatus, JobStore
from demix.jobs.lifecycle import recover_lost_job, resend_lost_message
from demix.readiness import forget_dead_processes
from demix.jobs.result_cache import sweep_orphaned_entries
from demix.jobs.retention import (sweep_abandoned_uploads, sweep_dead_scratch, sweep_expired_jobs,
                                  sweep_orphaned_job_folders)
from demix.jobs.split_records import MERGE, PartsExhausted, SplitStore, part_unit, send_unit
from demix.services import build_services
from demix.workflows.runs import advance_all
from demix.storage.local import Storage, sweep_orphaned_uploads

log = logging.getLogger(__name__)


@dataclasses.dataclass
class MaintenanceContext:
    """What sweeps work with."""
    settings: Settings
    jobs: JobStore
    storage: Storage
    celery: tp.Any


@dataclasses.dataclass
class Sweep:
    """One periodic task of the maintenance loop."""
    name: str
    run: tp.Callable[[MaintenanceContext], tp.Any]
    interval_s: tp.Callable[[Settings], float]
    """Seconds between two runs, from the settings."""


class LostJobSweep:
    """Requeues running jobs whose lease expired (their worker died or lost Redis for a
    whole lease), or fails them with `worker_lost` after `DEMIX_MAX_ATTEMPTS` lost runs.

    A job must be seen without a lease on two sweeps in a row (one heartbeat period
    apart) before it is recovered, so a worker whose lease lapsed during a short Redis
    outage gets one heartbeat to renew it.
    """

    def __init__(self) -> None:
        self._suspects: set[tuple[str, int]] = set()

    def __call__(self, context: MaintenanceContext) -> list[str]:
        """Returns the ids of the jobs it recovered (requeued or failed)."""
        jobs, settings = context.jobs, context.settings
        suspects, recovered = set(), []
        for job_id in jobs.running_job_ids():
            if jobs.lease_holder(job_id) is not None:
                continue
            try:
                attempt = jobs.get(job_id).attempts
            except Exception:  # deleted meanwhile
                continue
            if (job_id, attempt) not in self._suspects:
                suspects.add((job_id, attempt))
                continue
            if recover_lost_job(jobs, context.celery, settings.queue, job_id, attempt,
                                settings.max_attempts) is not None:
                recovered.append(job_id)
        self._suspects = suspects
        return recovered


def retention_sweep_interval(settings: Settings) -> float:
    """The retention sweeps run every `DEMIX_SWEEP_INTERVAL_S`."""
    return settings.sweep_interval_s


def lease_sweep_interval(settings: Settings) -> float:
    """The lost-job sweep runs once per heartbeat period (a third of a lease)."""
    return settings.lease_s / 3


class LostMessageSweep:
    """Sends again the task of a job waiting in the queue with no message for it in the
    broker: lost with the last second of Redis' writes in a machine crash (its append-only
    file is synced once a second), in a flushed or replaced Redis, a failover, by an API
    process killed between writing the job and sending its task, or taken by a worker killed
    before it started the job (kombu would hand it out again only after
    `DEMIX_JOB_TIMEOUT_S`, its visibility timeout).

    A job queued for over half of `DEMIX_LOST_MESSAGE_S` is suspect when no message for
    it waits in its queue and none was taken by a worker within the bound without being
    acknowledged yet (a worker takes a message a moment before it starts the job, or its
    model's warm-up before; a message held longer by a job still queued has lost its
    worker). Seen so on two sweeps in a row, a quarter of the bound apart, it is sent
    again, at the back of the queue. Sending a message that did exist after all costs
    nothing: the job starts once, by its one move from queued to running, and the other
    delivery is skipped.
    """

    def __init__(self) -> None:
        self._suspects: set[tuple[str, float]] = set()

    def __call__(self, context: MaintenanceContext) -> list[str]:
        """Returns the ids of the jobs whose task it sent again."""
        jobs, settings = context.jobs, context.settings
        if settings.lost_message_s <= 0:
            return []
        # Read the queued jobs before the messages: a job taken by a worker in between is
        # running by the next sweep, so it never stays suspect.
        now = time.time()
        suspects: set[tuple[str, float]] = set()
        resent = []
        # Every served model's queue: a job waits in its own model's.
        for queue in dict.fromkeys(settings.queue_for(model) for model in settings.served_models):
            candidates = jobs.queued_before(queue, now - settings.lost_message_s / 2)
            if not candidates:
                continue
            with_message = waiting_job_ids(jobs.redis, queue) | \
                delivered_job_ids(jobs.redis, now - settings.lost_message_s)
            for job_id, queued_since in candidates.items():
                if job_id in with_message:
                    continue
                if (job_id, queued_since) not in self._suspects:
                    suspects.add((job_id, queued_since))
                elif resend_lost_message(jobs, context.celery, queue, job_id, queued_since):
                    resent.append(job_id)
        self._suspects = suspects
        return resent


def lost_message_sweep_interval(settings: Settings) -> float:
    """The lost-message sweep runs four times per `DEMIX_LOST_MESSAGE_S`."""
    return settings.lost_message_s / 4 if settings.lost_message_s > 0 else 3600.0


class LostPartSweep:
    """Keeps split jobs alive while their parts are in flight, and sends a part (or the
    merge) whose lease expired again, alone, to any worker; after `DEMIX_MAX_ATTEMPTS`
    lost tries of one unit the job fails with `worker_lost`.

    While parts wait in the queue nobody holds a unit lease, so this sweep renews the
    job's lease (fenced by its attempt): the lost-job sweep must not restart the whole
    job. Like it, a unit must be seen without a lease on two sweeps in a row.
    """

    def __init__(self) -> None:
        self._suspects: set[tuple[str, int, str]] = set()

    def __call__(self, context: MaintenanceContext) -> list[str]:
        """Returns the units it sent again, as `<job id> <unit>`."""
        jobs, settings = context.jobs, context.settings
        splits = SplitStore(jobs.redis)
        suspects, resent = set(), []
        for job_id in splits.in_flight():
            record = splits.get(job_id)
            attempt = int(record.get("attempt", 0))
            try:
                job = jobs.get(job_id)
                if job.status is not JobStatus.RUNNING or job.attempts != attempt:
                    raise JobNotFound("not running this split")
                splits.heartbeat(job_id, attempt, "", settings.lease_s)
            except DemixError:  # finished, cancelled, deleted or superseded: nothing runs it
                splits.drop(job_id)
                continue
            units = [part_unit(index) for index in range(int(record.get("parts", 0)))] + [MERGE]
            for unit in units:
                if record.get(unit) != "running" or splits.unit_lease_holder(job_id, unit) is not None:
                    continue
                if (job_id, attempt, unit) not in self._suspects:
                    suspects.add((job_id, attempt, unit))
                    continue
                try:
                    message = splits.requeue(job_id, attempt, unit, lost=True, max_tries=settings.max_attempts)
                except PartsExhausted as exc:
                    try:
                        jobs.mark_failed(job_id, WorkerLost(
                            f"the worker running {unit} of this job was lost {settings.max_attempts} times; "
                            f"giving up after DEMIX_MAX_ATTEMPTS={settings.max_attempts} tries"), attempt=attempt)
                        context.storage.clear_split(job_id, attempt)
                        splits.drop(job_id)
                    except DemixError:
                        pass
                    log.error("job %s failed: %s", job_id, exc)
                    break
                except DemixError:  # another sweeper was first, or the lease is alive
                    continue
                send_unit(context.celery, job.queue or settings.queue, job_id, attempt, unit, message)
                log.warning("job %s: the worker of %s (attempt %d) was lost; sent again", job_id, unit, attempt)
                resent.append(f"{job_id} {unit}")
        self._suspects = suspects
        return resent


SWEEPS: list[Sweep] = [Sweep("lost jobs", LostJobSweep(), lease_sweep_interval),
                       Sweep("lost parts", LostPartSweep(), lease_sweep_interval),
                       Sweep("lost messages", LostMessageSweep(), lost_message_sweep_interval),
    # A pool process killed outright leaves its readiness entry: without this sweep the model
    # catalogue would count it as serving its models, and jobs would not say they wait.
    Sweep("dead workers' readiness", lambda context: forget_dead_processes(context.jobs.redis),
          lease_sweep_interval),
    # A workflow moves on when a run finishes; this catches a move lost with its process.
    Sweep("workflows", advance_all, lease_sweep_interval)]
"""The sweeps every worker runs; other modules append theirs."""

SWEEPS += [
    # Retention (`demix.jobs.retention`): expired jobs, then what crashes left behind.
    Sweep("expired jobs", lambda context: sweep_expired_jobs(context.jobs, context.storage,
                                                             context.settings.retention_s),
          retention_sweep_interval),
    Sweep("orphaned uploads", lambda context: sweep_orphaned_uploads(context.storage),
          retention_sweep_interval),
    Sweep("orphaned job folders", lambda context: sweep_orphaned_job_folders(context.jobs, context.storage),
          retention_sweep_interval),
    Sweep("orphaned cache entries", lambda context: sweep_orphaned_entries(context.jobs.redis, context.storage),
          retention_sweep_interval),
    Sweep("abandoned object uploads", lambda context: sweep_abandoned_uploads(context.storage),
          retention_sweep_interval),
    # Run at the worker's start too: a worker killed outright is often restarted on its folder.
    Sweep("dead processes' scratch", lambda context: sweep_dead_scratch(context.storage),
          retention_sweep_interval),
]


class MaintenanceLoop:
    """Runs `sweeps` in a background thread: all of them at start, then each every
    `interval_s`. A failing sweep (Redis down, a bug) is logged and tried again later."""

    def __init__(self, context: MaintenanceContext, sweeps: tp.Sequence[Sweep]):
        self.context, self.sweeps = context, list(sweeps)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="demix-maintenance", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        self.context.jobs.redis.close()

    terminate = stop

    def _loop(self) -> None:
        due = {sweep.name: 0.0 for sweep in self.sweeps}
        while not self._stop.is_set():
            now = time.monotonic()
            for sweep in self.sweeps:
                if now >= due[sweep.name]:
                    self.run_once(sweep)
                    due[sweep.name] = time.monotonic() + max(0.1, sweep.interval_s(self.context.settings))
            self._stop.wait(max(0.05, min(due.values()) - time.monotonic()))

    def run_once(self, sweep: Sweep) -> None:
        try:
            sweep.run(self.context)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.warning("maintenance: %s sweep skipped, Redis unreachable (%s)", sweep.name, exc)
        except Exception:
            log.exception("maintenance: %s sweep failed", sweep.name)


def maintenance_context(celery: tp.Any, settings: tp.Optional[Settings] = None) -> MaintenanceContext:
    settings = settings or get_settings()
    # The same job store as everywhere: a job the sweeps fail (`worker_lost`) sends its webhook.
    services = build_services(settings, celery=celery)
    return MaintenanceContext(settings=settings, jobs=services.jobs, storage=services.storage, celery=celery)
