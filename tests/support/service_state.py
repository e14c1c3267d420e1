"""What a request leaves behind in the service: queued messages, job records, files."""
from __future__ import annotations

import contextlib
import typing as tp
from pathlib import Path

import redis

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


def database_url(redis_server, db: int) -> str:
    """The URL of database `db` of the tests' Redis: a test whose process runs a webhook sender
    or sweeps of its own takes one apart from the session worker's (database 0)."""
    return redis_server.url.rsplit("/", 1)[0] + f"/{db}"


@contextlib.contextmanager
def empty_database(redis_server, db: int) -> tp.Iterator[redis.Redis]:
    """A client of database `db` of the tests' Redis, flushed before and after."""
    client = redis.Redis.from_url(database_url(redis_server, db))
    client.flushdb()
    try:
        yield client
    finally:
        client.flushdb()
        client.close()
