"""The Celery edge of the worker: a task that takes a job id and runs the job, the tasks
of a split job's parts and merge, the warm-up each pool process does before it takes
its first job, and giving running jobs back on shutdown. The worker's bootsteps start
its background process (maintenance sweeps, webhooks: `demix.worker.background`) and guard
its pool (`demix.worker.pool_guard`).
"""
from __future__ import annotations

import logging
import os
import typing as tp

import redis
from celery import signals
from celery.exceptions import Ignore

from demix import redis_keys as keys
from demix.celery_app import MERGE_PARTS_TASK, SEPARATE_PART_TASK, SEPARATE_TASK, celery_app
from demix.config import get_settings
from demix.jobs.records import JobStore
from demix.services import redis_client
from demix.jobs.lifecycle import hand_back_worker_jobs

from demix.worker.pool_guard import BackgroundStep, PoolGuard

log = logging.getLogger(__name__)

STOPPING_FLAG_TTL_S = 3600
"""How long a stopping worker's flag lives if the worker dies before clearing it."""

MAIN_PID = os.getpid()
"""The worker's main process (imported there before the pool forks its children)."""


def worker_identity(node: str) -> str:
    """Names one running Celery worker: its node name (which `demix worker`s on one host
    share) and its main process."""
    return f"{node} worker {MAIN_PID}"


celery_app.steps["worker"].update({BackgroundStep, PoolGuard})


@celery_app.task(name=SEPARATE_TASK, ignore_result=True, bind=True)
def separate(self, job_id: str) -> None:
    """Separate the job `job_id` (its input is already in storage)."""
    # Imported here, not at module level: the prefork parent imports this module, and
    # torch must first be initialised in the child that runs the jobs.
    from demix.worker.runner import run_job, worker_context

    run_job(job_id, worker_context(), worker=worker_identity(self.request.hostname or ""))


@celery_app.task(name=SEPARATE_PART_TASK, ignore_result=False, bind=True)
def separate_part(self, job_id: str, attempt: int, index: int) -> None:
    """Run part `index` of attempt `attempt` of a split job (a member of its chord)."""
    from demix.worker.split import chord_message, run_part_unit
    from demix.worker.runner import worker_context

    if not run_part_unit(job_id, attempt, index, worker_context(),
                         worker_identity(self.request.hostname or ""), chord_message(self.request)):
        # Stopped or skipped: the chord must not count this delivery as the part done.
        raise Ignore()


@celery_app.task(name=MERGE_PARTS_TASK, ignore_result=True, bind=True)
def merge_parts(self, job_id: str, attempt: int) -> None:
    """Merge the parts of attempt `attempt` of a split job into its stems (the chord's body)."""
    from demix.worker.split import chord_message, run_merge_unit
    from demix.worker.runner import worker_context

    run_merge_unit(job_id, attempt, worker_context(), worker_identity(self.request.hostname or ""),
                   chord_message(self.request))


@signals.worker_shutting_down.connect
def hand_back_running_jobs(sender: str, how: str = "", **_kwargs) -> None:
    """When a worker begins to shut down, give its running jobs back to the queue.

    Warm shutdown (Ctrl-C, SIGTERM, `docker compose stop`): flag the worker as stopping;
    each job it runs sees the flag at its next segment and hands itself back, so the
    shutdown ends at once instead of waiting for whole jobs. Cold shutdown (SIGQUIT, a
    second Ctrl-C): Celery's soft shutdown has already let runs finish or hand back for
    `worker_soft_shutdown_timeout`, then cancelled the rest; give those back here.
    """
    settings = get_settings()
    client = redis_client(settings, connect_timeout_s=2, socket_timeout_s=5)
    try:
        worker = worker_identity(sender)
        client.set(keys.worker_stopping_key(worker), how or "stopping", ex=STOPPING_FLAG_TTL_S)
        if how == "Cold":
            hand_back_worker_jobs(JobStore(client), celery_app, settings.queue, worker)
    except redis.exceptions.RedisError as exc:  # the jobs' leases will expire instead
        log.warning("could not give back the jobs of worker %s: %s", worker_identity(sender), exc)
    finally:
        client.close()


@signals.worker_process_init.connect
def warm_pool_process(**_kwargs: tp.Any) -> None:
    """In each new pool process, before it reports itself up: load and warm the model."""
    from demix.worker.runner import warm_up, worker_context

    warm_up(worker_context())


@signals.worker_process_shutdown.connect
def forget_pool_process(**_kwargs: tp.Any) -> None:
    """A pool process that exits is no longer ready."""
    from demix.readiness import clear_ready

    from demix.worker.runner import worker_context

    try:
        clear_ready(worker_context().jobs.redis)
    except Exception:  # Redis gone at shutdown: the entry is only a note, it may stay
        pass
