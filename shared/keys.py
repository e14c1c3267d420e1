"""Every Redis key name the service uses, in one place."""
from __future__ import annotations

PREFIX = "demix"


def job_key(job_id: str) -> str:
    """Hash holding one job's record."""
    return f"{PREFIX}:job:{job_id}"


def jobs_index_key() -> str:
    """Sorted set of job ids scored by creation time (newest last)."""
    return f"{PREFIX}:jobs"


def queue_keys(queue: str) -> list[str]:
    """The lists kombu's Redis transport keeps a Celery queue in, one per priority step.

    kombu stores priority 0 under the queue's own name and the other steps under
    `<queue>\\x06\\x16<priority>`; counting all of them gives the true backlog.
    """
    return [queue] + [f"{queue}\x06\x16{priority}" for priority in (3, 6, 9)]


def warm_workers_key() -> str:
    """Hash from worker process id (`<host>:<pid>`) to a JSON note written when that
    process has loaded and warmed its model (see `shared.readiness`)."""
    return f"{PREFIX}:workers:warm"
