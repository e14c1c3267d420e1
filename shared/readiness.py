"""Which worker processes are ready: model loaded and warmed, so a job starts at once.

Each worker process writes one entry when its warm-up ends and removes it when it exits;
`demix up` waits for an entry written after it started the worker, and the model
catalogue (`shared.catalogue`) counts them as the workers serving each model. An entry
is JSON: `ready_at` (Unix time), `model` (its first model), `device`, `precision`, and
`models`: per model its `architecture`, `sources`, `samplerate`, `load_s`, `warmup_s`,
or `error` when it could not be loaded (its jobs then fail with that message, as they
would without a warm-up). A process killed outright cannot remove its entry: every
worker's maintenance loop removes those of its own host's processes that are gone.
"""
from __future__ import annotations

import json
import os
import time
import typing as tp

import redis

from .host_processes import process_is_gone, this_host
from .keys import warm_workers_key


def process_id() -> str:
    """This process's name in the readiness hash: `<host>:<pid>`."""
    return f"{this_host()}:{os.getpid()}"


def mark_ready(client: redis.Redis, note: dict[str, tp.Any], worker: str = "") -> None:
    """Record this worker process (or `worker`) as ready, with `note`."""
    client.hset(warm_workers_key(), worker or process_id(), json.dumps({"ready_at": time.time(), **note}))


def clear_ready(client: redis.Redis, worker: str = "") -> None:
    """Remove this worker process's (or `worker`'s) entry."""
    client.hdel(warm_workers_key(), worker or process_id())


def ready_workers(client: redis.Redis, since: float = 0.0) -> dict[str, dict[str, tp.Any]]:
    """Entries written at or after Unix time `since`, by worker process id."""
    entries = {key.decode() if isinstance(key, bytes) else key: json.loads(value)
               for key, value in client.hgetall(warm_workers_key()).items()}
    return {worker: note for worker, note in entries.items() if note.get("ready_at", 0) >= since}


def forget_dead_processes(client: redis.Redis, host: str = "") -> list[str]:
    """Remove the entries of processes on `host` (default: this one) that no longer exist
    (killed outright, they could not remove their own); returns their names."""
    host = host or this_host()
    removed = []
    for key in client.hkeys(warm_workers_key()):
        name = key.decode() if isinstance(key, bytes) else key
        entry_host, _, pid = name.rpartition(":")
        if entry_host == host and pid.isdigit() and process_is_gone(int(pid)):
            client.hdel(warm_workers_key(), name)
            removed.append(name)
    return removed

