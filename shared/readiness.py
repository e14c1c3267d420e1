"""Which worker processes are ready: model loaded and warmed, so a job starts at once.

Each worker process writes one entry when its warm-up ends and removes it when it exits;
`demix up` waits for an entry written after it started the worker. An entry is JSON:
`ready_at` (Unix time), `model`, `device`, `precision`, `load_s`, `warmup_s`, and
`error` when the model could not be loaded (jobs then fail with that message, as they
would without a warm-up).
"""
from __future__ import annotations

import json
import os
import socket
import time
import typing as tp

import redis

from .keys import warm_workers_key


def process_id() -> str:
    """This process's name in the readiness hash: `<host>:<pid>`."""
    return f"{socket.gethostname()}:{os.getpid()}"


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
