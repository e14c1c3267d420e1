"""Which worker processes are ready: model loaded and warmed, so a job starts at once.

Each worker process writes one entry when its warm-up ends and removes it when it exits;
`demix up` waits for an entry written after it started the worker, and the model
catalogue (`demix.catalogue`) counts them as the workers serving each model. An entry
is JSON: `ready_at` (Unix time), `model` (its first model), `device`, `precision`, and
`models`: per model its `architecture`, `sources`, `samplerate`, `load_s`, `warmup_s`,
or `error` when it could not be loaded (its jobs then fail with that message, as they
would without a warm-up). A process killed outright cannot remove its entry: every
worker's maintenance loop removes those of its own host's processes that are gone.

Beside these shared entries, each worker's main process keeps a status file of its own
pool on its machine's disk (`write_worker_status`), which probes read without Redis.
"""
from __future__ import annotations

import json
import os
import time
import typing as tp
from pathlib import Path

import redis

from demix.atomic_files import atomic_open
from demix.host_processes import process_is_gone, this_host
from demix.redis_keys import warm_workers_key


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



# -- a worker's own view of its pool, for probes on its machine ------------------------------

STATUS_STALE_S = 60.0
"""A worker status file older than this says its main process's event loop is stuck."""


def worker_status_path(data_dir: Path, pid: int) -> Path:
    """Where the worker whose main process is `pid` keeps its status (`write_worker_status`)."""
    return Path(data_dir) / "workers" / f"{this_host()}-{pid}.json"


def write_worker_status(data_dir: Path, status: dict[str, tp.Any]) -> None:
    """Publish this worker main process's status, written whole or not at all: `pool` (each
    pool process's pid and `warm` or `warming`), `warm_timeouts`, stamped with the time."""
    path = worker_status_path(data_dir, os.getpid())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w") as file:
        json.dump({**status, "pid": os.getpid(), "updated_at": time.time()}, file)


def worker_statuses(data_dir: Path) -> dict[int, dict[str, tp.Any]]:
    """The status of every worker main process of this machine that is still running, by pid
    (files of workers that are gone are removed)."""
    statuses = {}
    for path in sorted((Path(data_dir) / "workers").glob(f"{this_host()}-*.json")):
        pid = path.stem.rpartition("-")[2]
        if not pid.isdigit():
            continue
        if process_is_gone(int(pid)):
            path.unlink(missing_ok=True)
            continue
        try:
            statuses[int(pid)] = json.loads(path.read_text())
        except (OSError, ValueError):  # removed meanwhile
            continue
    return statuses


def probe_workers(data_dir: Path, check: str, now: tp.Optional[float] = None) -> tuple[bool, str]:
    """A Kubernetes-style probe of this machine's workers, from their status files.

    `live`: every running worker's main process updated its status within
    `STATUS_STALE_S` (its event loop turns; a pool process that hangs is the watchdog's
    to replace, not a reason to restart the whole worker). `ready`: live, and at least one
    pool process has warmed its models. Returns (passed, what to say).
    """
    now = time.time() if now is None else now
    statuses = worker_statuses(data_dir)
    if not statuses:
        return False, f"no running worker on {this_host()} has written its status yet"
    stale = {pid: now - status.get("updated_at", 0) for pid, status in statuses.items()
             if now - status.get("updated_at", 0) > STATUS_STALE_S}
    if stale:
        return False, "; ".join(f"worker {pid} has not updated its status for {age:.0f}s"
                                for pid, age in sorted(stale.items()))
    if check == "live":
        return True, f"{len(statuses)} worker(s) live"
    warm = sum(1 for status in statuses.values() for state in status.get("pool", {}).values()
               if state == "warm")
    if not warm:
        return False, "no pool process has warmed its models yet"
    return True, f"{warm} pool process(es) warm"
