"""What a client waiting on a job wants to know: its place in the queue and the time left.

Both are computed when the job is read, never stored: the queue position from the
queue's index of queued jobs (`keys.queued_jobs_key`, kept in step with each job's
status by `JobStore`), the time left from the job's progress and when it started.
"""
from __future__ import annotations

import typing as tp

import redis

from demix import redis_keys as keys
from demix.jobs.records import Job, JobStatus

MIN_PROGRESS_FOR_ETA = 0.02
"""Progress below which the time left is not estimated yet (model loading and the first
pass dominate the first moments, so an early rate says little)."""


def eta_seconds(job: Job, now: float) -> tp.Optional[float]:
    """Seconds a running job still needs (see `remaining_seconds`); None unless it is running."""
    if job.status is not JobStatus.RUNNING or job.started_at is None:
        return None
    return remaining_seconds(job.progress, now - job.started_at)


def remaining_seconds(progress: float, elapsed: float) -> tp.Optional[float]:
    """Time left at the average rate so far, `elapsed * (1 - progress) / progress`, in
    seconds (one decimal); None below `MIN_PROGRESS_FOR_ETA`."""
    if progress < MIN_PROGRESS_FOR_ETA:
        return None
    return round(max(0.0, elapsed) * (1.0 - min(progress, 1.0)) / progress, 1)


def queue_position(client: redis.Redis, job: Job) -> tp.Optional[int]:
    """The job's place in its queue (1: the next to start), or None when it is not queued.

    The rank in a sorted set: one O(log n) Redis call, whatever the queue's length. The
    order is the time each job entered the queue, the order in which its task was sent to
    the (FIFO) Celery queue.
    """
    if job.status is not JobStatus.QUEUED or not job.queue:
        return None
    rank = client.zrank(keys.queued_jobs_key(job.queue), job.id)
    return None if rank is None else rank + 1
