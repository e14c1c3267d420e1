"""The Celery edge of the worker: a task that takes a job id and runs the job."""
from __future__ import annotations

from shared.celery_app import SEPARATE_TASK, celery_app


@celery_app.task(name=SEPARATE_TASK, ignore_result=True)
def separate(job_id: str) -> None:
    """Separate the job `job_id` (its input is already in storage)."""
    # Imported here, not at module level: the prefork parent imports this module, and
    # torch must first be initialised in the child that runs the jobs.
    from .runner import run_job, worker_context

    run_job(job_id, worker_context())
