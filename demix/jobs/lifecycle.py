"""A job's life beyond single state moves: enqueueing, cancelling, deleting, and
recovering jobs whose worker was lost. Plain functions over the job store, the storage
and the Celery app, shared by the API, the workers' maintenance loop and the runner."""
from __future__ import annotations

import logging
import time
import typing as tp

from demix.celery_app import SEPARATE_TASK
from demix.errors import IllegalTransition, JobNotFound, WorkerLost
from demix.jobs.records import Job, JobStatus, JobStore
from demix.jobs.result_cache import release_job_entries
from demix.storage.local import Storage

log = logging.getLogger(__name__)


def enqueue_job(celery: tp.Any, job_id: str, queue: str) -> None:
    """Send the job's separation task; only the id travels, the audio stays in storage.

    Its outcome is in the job record, never a Celery result: without `ignore_result` the
    sender subscribes to the task's result (one subscription per job, kept for the
    process's life) and, with the result store unreachable, blocks ~20 s retrying it.
    """
    celery.send_task(SEPARATE_TASK, args=[job_id], task_id=job_id, queue=queue, ignore_result=True)


def cancel_job(jobs: JobStore, storage: Storage, job_id: str) -> Job:
    """Cancel a queued or running job and remove its files; returns the cancelled job.

    A queued job is then never started; a running one stops at its next segment (its
    worker notices at its next heartbeat and removes what it was writing).

    Raises:
        JobNotFound: no such job.
        IllegalTransition: the job already finished (details carry its status).
    """
    job = jobs.mark_cancelled(job_id)
    storage.delete_job(job_id)
    end_children(jobs, storage, job_id)
    log.info("cancelled job %s (was at attempt %d)", job_id, job.attempts)
    return job


def end_children(jobs: JobStore, storage: Storage, job_id: str, *, delete: bool = False) -> None:
    """Cancel the job's child jobs (a workflow's runs) that have not finished and remove
    their files; with `delete`, their records too (and their uses of the result cache). A
    running child stops at its next segment, as any cancelled job."""
    for child_id in jobs.children(job_id):
        try:
            jobs.mark_cancelled(child_id)
        except (IllegalTransition, JobNotFound):
            pass  # finished already (or deleted by another caller)
        if delete:
            jobs.delete(child_id)
            release_job_entries(jobs.redis, storage, child_id)
        storage.delete_job(child_id)


def delete_job(jobs: JobStore, storage: Storage, job_id: str) -> None:
    """Delete a job whatever its state: cancel it if it is not finished, then remove its
    record and every file, and release the result cache entries it stored or used (an entry
    no other job uses goes too). A worker still running it stops and cleans up after itself.

    Raises:
        JobNotFound: no such job.
    """
    try:
        jobs.mark_cancelled(job_id)
    except IllegalTransition:
        pass  # already finished: nothing runs any more
    end_children(jobs, storage, job_id, delete=True)
    jobs.delete(job_id)
    release_job_entries(jobs.redis, storage, job_id)
    storage.delete_job(job_id)
    log.info("deleted job %s", job_id)


def recover_lost_job(jobs: JobStore, celery: tp.Any, queue: str, job_id: str, attempt: int,
                     max_attempts: int) -> tp.Optional[JobStatus]:
    """A running job's lease expired under attempt `attempt`: its worker is gone. Requeue
    it (and send its task again), or fail it with `worker_lost` once `max_attempts` runs
    were lost. Of several processes noticing the same job, exactly one acts.

    Returns the job's new status, or None when another process acted first or the job's
    lease turned out to be alive.
    """
    try:
        job = jobs.get(job_id)
        if job.status is not JobStatus.RUNNING or job.attempts != attempt:
            return None
        if job.counted_attempts >= max_attempts:
            jobs.mark_failed(job_id, WorkerLost(
                f"the worker running this job was lost {job.counted_attempts} times (killed, out of "
                f"memory or disconnected for over its lease); giving up after DEMIX_MAX_ATTEMPTS="
                f"{max_attempts} attempts"), attempt=attempt, lease_must_be_gone=True)
            log.error("job %s failed: worker lost on all %d attempts", job_id, job.counted_attempts)
            return JobStatus.FAILED
        job = jobs.requeue(job_id, attempt, handed_back=False)
    except (JobNotFound, IllegalTransition):
        return None
    # The job's own queue: the sweeping worker may serve another queue on the same Redis.
    enqueue_job(celery, job_id, job.queue or queue)
    log.warning("job %s: the worker of attempt %d was lost; requeued", job_id, attempt)
    return JobStatus.QUEUED


def resend_lost_message(jobs: JobStore, celery: tp.Any, queue: str, job_id: str,
                        queued_since: float) -> bool:
    """Send again the task of a job queued in `queue` since `queued_since` whose message the
    broker no longer holds; of several processes doing so, exactly one sends. Returns
    whether this one did.

    Safe even if a message did exist after all (a worker was taking it): a job starts only
    by its one move from queued to running, so the second delivery finds it running or
    finished and is skipped (`demix.worker.runner`), never run twice.
    """
    if not jobs.claim_resend(job_id, queue, queued_since):
        return False
    enqueue_job(celery, job_id, queue)
    log.warning("job %s: queued since %.0fs with no message in the broker (lost); sent again",
                job_id, time.time() - queued_since)
    return True


def hand_back_job(jobs: JobStore, celery: tp.Any, queue: str, job_id: str, attempt: int) -> bool:
    """Give a running job back to the queue because its worker stops (the attempt does
    not count towards the attempt limit); returns False if it was no longer ours."""
    try:
        job = jobs.requeue(job_id, attempt, handed_back=True)
    except (JobNotFound, IllegalTransition):
        return False
    enqueue_job(celery, job_id, job.queue or queue)
    log.warning("job %s: attempt %d handed back to the queue (worker stopping)", job_id, attempt)
    return True


def hand_back_worker_jobs(jobs: JobStore, celery: tp.Any, queue: str, worker: str) -> list[str]:
    """Give back every job whose lease a process of the Celery worker `worker` holds (its
    runs were just cancelled by a cold shutdown); returns their ids."""
    handed = []
    for job_id in jobs.running_job_ids():
        holder = jobs.lease_holder(job_id)
        if holder is None:
            continue
        attempt, _, name = holder.partition(" ")
        if name.startswith(f"{worker} process ") and hand_back_job(jobs, celery, queue, job_id, int(attempt)):
            handed.append(job_id)
    return handed
