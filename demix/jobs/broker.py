"""What the broker holds for our jobs, read from Redis where Celery's Redis transport
(kombu) keeps it: which jobs have a separation message waiting in a queue, and which
have one delivered to a worker that has not acknowledged it yet.

kombu keeps a queue as Redis lists of JSON messages (`keys.queue_keys`); a worker takes a
message off the list and holds it in the `unacked` hash (with its delivery time in
`unacked_index`) until it acknowledges it, which, with late acks, is when the task ends.
"""
from __future__ import annotations

import base64
import json
import typing as tp

from demix import redis_keys as keys
from demix.celery_app import SEPARATE_TASK

SCAN_CHUNK = 500
"""Messages read per Redis call when walking a queue."""


def waiting_job_ids(client: tp.Any, queue: str) -> set[str]:
    """Ids of the jobs with a separation message waiting in Celery queue `queue`."""
    found: set[str] = set()
    for key in keys.queue_keys(queue):
        start = 0
        while True:
            chunk = client.lrange(key, start, start + SCAN_CHUNK - 1)
            found.update(job_id for job_id in map(separation_job_id, chunk) if job_id)
            if len(chunk) < SCAN_CHUNK:
                break
            start += SCAN_CHUNK
    return found


def delivered_job_ids(client: tp.Any, since: float) -> set[str]:
    """Ids of the jobs whose separation message a worker took at or after `since` (epoch s)
    and has not acknowledged."""
    tags = client.zrangebyscore(keys.broker_unacked_index_key(), since, "+inf")
    if not tags:
        return set()
    found = set()
    for entry in client.hmget(keys.broker_unacked_key(), tags):
        if entry is None:  # acknowledged meanwhile
            continue
        try:
            message = json.loads(entry)[0]
        except (ValueError, IndexError, TypeError):
            continue
        if (job_id := separation_job_id(message)) is not None:
            found.add(job_id)
    return found


def separation_job_id(message: tp.Union[bytes, str, dict]) -> tp.Optional[str]:
    """The job id a kombu message (raw JSON or decoded) asks to separate, or None when it
    is another task's message or cannot be read."""
    try:
        if not isinstance(message, dict):
            message = json.loads(message)
        if message.get("headers", {}).get("task") != SEPARATE_TASK:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]  # task protocol 2: [args, kwargs, embed]
        return str(args[0])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
