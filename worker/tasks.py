"""The Celery edge of the worker: a task that takes a job id and runs the job, and the
warm-up each pool process does before it takes its first job."""
from __future__ import annotations

import typing as tp

from celery.signals import worker_process_init, worker_process_shutdown

from shared.celery_app import SEPARATE_TASK, celery_app


@celery_app.task(name=SEPARATE_TASK, ignore_result=True)
def separate(job_id: str) -> None:
    """Separate the job `job_id` (its input is already in storage)."""
    # Imported here, not at module level: the prefork parent imports this module, and
    # torch must first be initialised in the child that runs the jobs.
    from .runner import run_job, worker_context

    run_job(job_id, worker_context())


@worker_process_init.connect
def warm_pool_process(**_kwargs: tp.Any) -> None:
    """In each new pool process, before it reports itself up: load and warm the model."""
    from .runner import warm_up, worker_context

    warm_up(worker_context())


@worker_process_shutdown.connect
def forget_pool_process(**_kwargs: tp.Any) -> None:
    """A pool process that exits is no longer ready."""
    from shared.readiness import clear_ready

    from .runner import worker_context

    try:
        clear_ready(worker_context().jobs.redis)
    except Exception:  # Redis gone at shutdown: the entry is only a note, it may stay
        pass
