"""The Celery edge of the worker: a task that takes a job id and runs the job, and the
webhook sender every worker runs beside its jobs."""
from __future__ import annotations

import typing as tp

from celery import signals

from shared.celery_app import SEPARATE_TASK, celery_app

_webhook_sender: tp.Any = None


@celery_app.task(name=SEPARATE_TASK, ignore_result=True)
def separate(job_id: str) -> None:
    """Separate the job `job_id` (its input is already in storage)."""
    # Imported here, not at module level: the prefork parent imports this module, and
    # torch must first be initialised in the child that runs the jobs.
    from .runner import run_job, worker_context

    run_job(job_id, worker_context())


@signals.worker_ready.connect
def start_webhook_sender(**_: tp.Any) -> None:
    """Deliver webhooks from the worker's main process, in threads beside the jobs."""
    global _webhook_sender
    from shared.config import get_settings
    from shared.webhooks import start_sender

    if _webhook_sender is None:
        _webhook_sender = start_sender(get_settings())


@signals.worker_shutdown.connect
def stop_webhook_sender(**_: tp.Any) -> None:
    global _webhook_sender
    if _webhook_sender is not None:
        _webhook_sender.stop()
        _webhook_sender = None
