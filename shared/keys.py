"""Every Redis key name the service uses, in one place."""
from __future__ import annotations

PREFIX = "demix"


def job_key(job_id: str) -> str:
    """Hash holding one job's record."""
    return f"{PREFIX}:job:{job_id}"


def jobs_index_key() -> str:
    """Sorted set of job ids scored by creation time (newest last)."""
    return f"{PREFIX}:jobs"


def queued_jobs_key(queue: str) -> str:
    """Sorted set of the ids of jobs in state `queued` for Celery queue `queue`, scored by
    the time each entered the queue: a job's rank is its place in the queue."""
    return f"{PREFIX}:queued:{queue}"


def owner_active_jobs_key(owner: str) -> str:
    """Set of the ids of an API key owner's jobs that may still be queued or running
    (finished ones are pruned when the owner submits)."""
    return f"{PREFIX}:owner:{owner}:active"


def queue_keys(queue: str) -> list[str]:
    """The lists kombu's Redis transport keeps a Celery queue in, one per priority step.

    kombu stores priority 0 under the queue's own name and the other steps under
    `<queue>\\x06\\x16<priority>`; counting all of them gives the true backlog.
    """
    return [queue] + [f"{queue}\x06\x16{priority}" for priority in (3, 6, 9)]
