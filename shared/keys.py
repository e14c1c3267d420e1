"""Every Redis key name the service uses, in one place."""
from __future__ import annotations

PREFIX = "demix"


def job_key(job_id: str) -> str:
    """Hash holding one job's record."""
    return f"{PREFIX}:job:{job_id}"


def jobs_index_key() -> str:
    """Sorted set of job ids scored by creation time (newest last)."""
    return f"{PREFIX}:jobs"


def webhooks_due_key() -> str:
    """Sorted set of pending webhook delivery ids scored by when each is next due (epoch s)."""
    return f"{PREFIX}:webhooks:due"


def webhook_key(delivery_id: str) -> str:
    """Hash holding one pending webhook delivery: its URL, body and attempts so far."""
    return f"{PREFIX}:webhook:{delivery_id}"


def queue_keys(queue: str) -> list[str]:
    """The lists kombu's Redis transport keeps a Celery queue in, one per priority step.

    kombu stores priority 0 under the queue's own name and the other steps under
    `<queue>\\x06\\x16<priority>`; counting all of them gives the true backlog.
    """
    return [queue] + [f"{queue}\x06\x16{priority}" for priority in (3, 6, 9)]
