"""Idempotency keys: a submit repeated with the same `Idempotency-Key` gets the first job.

Each key (per owner) maps to one job id in Redis. A submit first *claims* the key with
a pending marker (atomically: of concurrent submits with one key exactly one claims it),
creates its job, then *confirms* the key with the job's id. The others wait for the
confirmation and answer with that job. A key whose job no longer exists (deleted, or
expired by retention) is free again, as is one whose claimer died before confirming.
"""
from __future__ import annotations

import hashlib
import re
import time
import typing as tp

import redis

from demix import redis_keys as keys
from demix.errors import InvalidIdempotencyKey

HEADER = "Idempotency-Key"

MAX_KEY_LENGTH = 255
"""Longest accepted key, in characters (a UUID is 36)."""

KEY_PATTERN = re.compile(r"[\x21-\x7e]+")
"""Printable ASCII without spaces: UUIDs, ULIDs, hashes, `client-123:retry`."""

PENDING_GRACE_S = 30.0
"""A claim not confirmed within this long belongs to a submit that died: it is taken over."""

POLL_INTERVAL_S = 0.05
"""Pause between two looks at a key another submit is still confirming."""

ANONYMOUS_OWNER = "anonymous"
"""The owner of every key until requests carry API keys."""

_PENDING = "pending"

# Set the key to ARGV[1] unless it is set; returns the current value when it was.
_CLAIM = """
local current = redis.call('GET', KEYS[1])
if current then return current end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
return false
"""

# Compare-and-set: replace ARGV[1] by ARGV[2] (delete when ARGV[2] is empty); 1 if done.
_REPLACE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
elseif tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
end
return 1
"""


def parse_key(raw: tp.Optional[str]) -> tp.Optional[str]:
    """The `Idempotency-Key` header's value, or None when there is none.

    Raises:
        InvalidIdempotencyKey: empty, longer than `MAX_KEY_LENGTH`, or not printable ASCII.
    """
    if raw is None:
        return None
    if not raw:
        raise InvalidIdempotencyKey(f"the {HEADER} header is empty; send 1 to {MAX_KEY_LENGTH} "
                                    "printable ASCII characters (a UUID, for example)")
    if len(raw) > MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey(f"the {HEADER} header is {len(raw)} characters long; at most "
                                    f"{MAX_KEY_LENGTH} are accepted")
    if not KEY_PATTERN.fullmatch(raw):
        raise InvalidIdempotencyKey(f"the {HEADER} header may only hold printable ASCII characters "
                                    "without spaces (a UUID, for example)")
    return raw


class IdempotencyKeys:
    """The key -> job id map in Redis.

    `ttl_s` bounds how long a key is remembered (0: as long as its job exists).
    `job_exists(job_id)` tells whether a job's record is still there.
    """

    def __init__(self, client: redis.Redis, ttl_s: int, job_exists: tp.Callable[[str], bool]):
        self.redis = client
        self.ttl_ms = max(0, int(ttl_s * 1000))
        self.job_exists = job_exists
        self._claim = client.register_script(_CLAIM)
        self._replace = client.register_script(_REPLACE)

    def find(self, owner: str, key: str) -> tp.Optional[str]:
        """The id of the existing job created with `key`, if there is one (claims nothing)."""
        current = self.redis.get(self._redis_key(owner, key))
        if current is None:
            return None
        job_id, pending_since = _parse(current.decode())
        return job_id if pending_since is None and self.job_exists(job_id) else None

    def claim(self, owner: str, key: str, job_id: str) -> tp.Optional[str]:
        """Claim `key` for the new job `job_id`; returns None when claimed, else the id of
        the job the key already belongs to (waiting while that job is being created).

        A claim must be `confirm`ed once the job exists, or `release`d if it was not created.
        """
        redis_key = self._redis_key(owner, key)
        while True:
            claim = f"{_PENDING}:{job_id}:{time.time():.6f}"
            current = self._claim(keys=[redis_key], args=[claim, self.ttl_ms])
            if current is None:
                return None
            current = current.decode()
            holder, pending_since = _parse(current)
            if pending_since is None:
                if self.job_exists(holder):
                    return holder
            elif time.time() - pending_since < PENDING_GRACE_S:
                time.sleep(POLL_INTERVAL_S)  # another submit is creating the job right now
                continue
            # The holder's job is gone, or its submit died before confirming: take the key over.
            if self._replace(keys=[redis_key], args=[current, claim, self.ttl_ms]):
                return None

    def confirm(self, owner: str, key: str, job_id: str) -> None:
        """Point a claimed key at its now existing job."""
        redis_key = self._redis_key(owner, key)
        current = self.redis.get(redis_key)
        if current is not None and _parse(current.decode())[0] == job_id:
            self._replace(keys=[redis_key], args=[current, job_id, 0])

    def release(self, owner: str, key: str, job_id: str) -> None:
        """Free a key claimed for a job that was not created after all."""
        redis_key = self._redis_key(owner, key)
        current = self.redis.get(redis_key)
        if current is not None and _parse(current.decode())[0] == job_id:
            self._replace(keys=[redis_key], args=[current, "", 0])

    @staticmethod
    def _redis_key(owner: str, key: str) -> str:
        # Hashed: the key is client-chosen text, the Redis key name stays short and plain.
        return keys.idempotency_key(owner, hashlib.sha256(key.encode()).hexdigest())


def _parse(value: str) -> tuple[str, tp.Optional[float]]:
    """(job id, when the claim was made if it is still pending, else None)."""
    if value.startswith(_PENDING + ":"):
        _, job_id, since = value.split(":")
        return job_id, float(since)
    return value, None
