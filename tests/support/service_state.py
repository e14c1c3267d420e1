"""What a request leaves behind in the service: queued messages, job records, files."""
from __future__ import annotations

from pathlib import Path

from demix import redis_keys as keys
from tests.support.environment import UNCONSUMED_QUEUE


def queue_length(redis_client) -> int:
    """Messages waiting on the idle server's queue (no worker consumes it)."""
    return sum(redis_client.llen(key) for key in keys.queue_keys(UNCONSUMED_QUEUE))


def job_count(redis_client) -> int:
    """Jobs in the index of every job."""
    return redis_client.zcard(keys.jobs_index_key())


def files_under(directory: Path) -> set:
    return {p for p in directory.rglob("*") if p.is_file()} if directory.exists() else set()
