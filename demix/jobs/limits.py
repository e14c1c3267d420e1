"""`DEMIX_MAX_ACTIVE_JOBS_PER_KEY`: how many jobs one API key may have queued or running.

Each owner has a set of job ids that may still be active. A job's id is added once its
record exists, atomically with the limit check (so two concurrent submits cannot both
take the last slot), and pruned when its record is finished or gone: the set needs no
help from the job state machine and cannot drift out of step with it.
"""
from __future__ import annotations

import json
import math
import time
import typing as tp

import redis

from demix import redis_keys as keys
from demix.errors import TooManyActiveJobs
from demix.jobs.estimates import remaining_seconds
from demix.jobs.records import JobStatus

DEFAULT_RETRY_AFTER_S = 30
"""`Retry-After` when none of the owner's jobs is far enough along to estimate its end."""

MAX_RETRY_AFTER_S = 3600

ACTIVE_STATUSES = frozenset({JobStatus.QUEUED.value, JobStatus.RUNNING.value})

# KEYS: the owner's active set; ARGV: job id, limit. 1 if added, 0 if at the limit.
_RESERVE = """
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""


class ActiveJobLimit:
    """The per-key limit on queued + running jobs (`limit` 0: unlimited)."""

    def __init__(self, client: redis.Redis, limit: int):
        self.redis, self.limit = client, limit
        self._reserve = client.register_script(_RESERVE)

    def check(self, owner: str) -> None:
        """Refuse early, before an upload is read, when the owner is already at the limit.

        Raises:
            TooManyActiveJobs: with a `Retry-After` header.
        """
        if self.limit > 0 and owner and len(self._prune(owner)) >= self.limit:
            raise self._refusal(owner)

    def reserve(self, owner: str, job_id: str) -> None:
        """Count `job_id` (whose record already exists) as one of the owner's active jobs,
        atomically with the check.

        Raises:
            TooManyActiveJobs: the owner is at the limit.
        """
        if self.limit <= 0:
            return
        self._prune(owner)
        if not self._reserve(keys=[keys.owner_active_jobs_key(owner)], args=[job_id, self.limit]):
            raise self._refusal(owner)

    def _prune(self, owner: str) -> list[tuple[str, tp.Any, tp.Any, tp.Any]]:
        """Drop the owner's finished or deleted jobs; returns the active ones as
        (id, status, progress, started_at)."""
        key = keys.owner_active_jobs_key(owner)
        ids = sorted(member.decode() for member in self.redis.smembers(key))
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(keys.job_key(job_id), "status", "progress", "started_at")
        active, gone = [], []
        for job_id, (status, progress, started_at) in zip(ids, pipe.execute()):
            status = json.loads(status) if status else None
            if status in ACTIVE_STATUSES:
                active.append((job_id, status, json.loads(progress or "0"), json.loads(started_at or "null")))
            else:
                gone.append(job_id)
        if gone:
            self.redis.srem(key, *gone)
        return active

    def _refusal(self, owner: str) -> TooManyActiveJobs:
        return TooManyActiveJobs(
            f"this API key already has {self.limit} jobs queued or running "
            f"(DEMIX_MAX_ACTIVE_JOBS_PER_KEY); wait for one to finish",
            details={"limit": self.limit},
            headers={"Retry-After": str(self._retry_after_s(owner))})

    def _retry_after_s(self, owner: str) -> int:
        """Seconds until the owner's first running job should end, by its progress so far."""
        now, estimates = time.time(), []
        for _job_id, status, progress, started_at in self._prune(owner):
            if status == JobStatus.RUNNING.value and started_at is not None:
                remaining = remaining_seconds(progress, now - started_at)
                if remaining is not None:
                    estimates.append(remaining)
        if not estimates:
            return DEFAULT_RETRY_AFTER_S
        return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(min(estimates)))))
