"""Split jobs in Redis: the parts of one attempt of a job run on many workers.

A job split into parts (`demix.separation.split`) stays `running` under one attempt while its
parts run; this record says where each *unit* (`part:<n>`, then `merge`) stands::

    queued --> running --> done
                 |
                 +--> queued  (its worker's lease expired, or its worker stopped: sent again)

Every write is one Lua script fenced like the job's own writes: it is refused unless the
job is still `running` at the writer's attempt (so a cancelled, deleted or superseded
job stops all its parts at their next heartbeat). Each running unit holds its own lease;
a unit whose lease expired is sent again alone. While the split is in flight its
heartbeats, and every worker's maintenance sweep, keep the job's lease alive (holder
`split`), so the lost-job sweep leaves the job to the part sweep. Part heartbeats also
raise the job's `progress` to the share of all parts' windows done, never lowering it.
"""
from __future__ import annotations

import json
import typing as tp

import redis

from demix import redis_keys as keys
from demix.celery_app import MERGE_PARTS_TASK, SEPARATE_PART_TASK
from demix.jobs.records import RUNNING_ATTEMPT_FENCE, JobStatus, raise_unless_ok

MERGE = "merge"
"""The unit that merges the parts once all are done."""

SPLIT_HOLDER = "split"
"""The job lease's holder while its parts are in flight."""


def part_unit(index: int) -> str:
    return f"part:{index}"


# Common head of every script: the fence. KEYS[1] job hash, KEYS[2] split hash;
# ARGV[1] attempt. Returns early with {outcome, status, attempts} unless the job runs at
# that attempt and the split belongs to it (the split is not checked on create).
_FENCE = RUNNING_ATTEMPT_FENCE

_SPLIT_FENCE = _FENCE + """
if redis.call('HGET', KEYS[2], 'attempt') ~= ARGV[1] then return {'stale', status, attempts} end
"""

# KEYS: job, split, splits set; ARGV: attempt, parts, windows, job id
_CREATE = _FENCE + """
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'attempt', ARGV[1], 'parts', ARGV[2], 'windows', ARGV[3], 'merge', 'waiting')
for index = 0, tonumber(ARGV[2]) - 1 do
  redis.call('HSET', KEYS[2], 'part:' .. index, 'queued', 'windows:' .. index, 0, 'tries:part:' .. index, 0)
end
redis.call('SADD', KEYS[3], ARGV[4])
return {'ok', status, attempts}
"""

# KEYS: job, split, unit lease; ARGV: attempt, unit, lease ms, holder, message (JSON)
_START = _SPLIT_FENCE + """
local state = redis.call('HGET', KEYS[2], ARGV[2])
if state == 'done' then return {'done', status, attempts} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {'leased', status, attempts} end
redis.call('HSET', KEYS[2], ARGV[2], 'running', 'message:' .. ARGV[2], ARGV[5])
local tries = redis.call('HINCRBY', KEYS[2], 'tries:' .. ARGV[2], 1)
redis.call('SET', KEYS[3], ARGV[1] .. ' ' .. ARGV[4], 'PX', ARGV[3])
return {'ok', status, attempts, tries}
"""

# KEYS: job, split, unit lease ('' for none), job lease; ARGV: attempt, unit, lease ms,
# holder, windows done by the unit ('' = none), progress before the parts, share of the parts
_HEARTBEAT = _SPLIT_FENCE + """
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[3], ARGV[1] .. ' ' .. ARGV[4], 'PX', ARGV[3])
end
redis.call('SET', KEYS[4], ARGV[1] .. ' split', 'PX', ARGV[3])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[2], 'windows:' .. string.sub(ARGV[2], 6), ARGV[5])
  local done = 0
  for index = 0, tonumber(redis.call('HGET', KEYS[2], 'parts')) - 1 do
    done = done + tonumber(redis.call('HGET', KEYS[2], 'windows:' .. index))
  end
  local total = math.max(1, tonumber(redis.call('HGET', KEYS[2], 'windows')))
  local progress = tonumber(ARGV[6]) + tonumber(ARGV[7]) * math.min(1, done / total)
  local current = tonumber(redis.call('HGET', KEYS[1], 'progress')) or 0
  if progress > current then redis.call('HSET', KEYS[1], 'progress', tostring(progress)) end
end
return {'ok', status, attempts}
"""

# KEYS: job, split, unit lease; ARGV: attempt, unit, new state (done | queued),
# '1' if the unit's lease must be gone (a lost unit), max tries ('' = no limit)
_END = _SPLIT_FENCE + """
if redis.call('HGET', KEYS[2], ARGV[2]) ~= 'running' then return {'illegal', status, attempts} end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return {'leased', status, attempts} end
if ARGV[5] ~= '' and tonumber(redis.call('HGET', KEYS[2], 'tries:' .. ARGV[2])) >= tonumber(ARGV[5]) then
  return {'exhausted', status, attempts}
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('DEL', KEYS[3])
return {'ok', status, attempts, redis.call('HGET', KEYS[2], 'message:' .. ARGV[2]) or ''}
"""


class PartsExhausted(Exception):
    """A unit was lost on every try it was allowed."""


class SplitStore:
    """Reads and writes split records (one hash per job) and their unit leases."""

    def __init__(self, client: redis.Redis):
        self.redis = client
        self._create = client.register_script(_CREATE)
        self._start = client.register_script(_START)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._end = client.register_script(_END)

    def create(self, job_id: str, attempt: int, parts: int, windows: int) -> None:
        """Record a split of attempt `attempt` into `parts` parts of `windows` windows in all.

        Raises:
            JobNotFound, IllegalTransition, StaleAttempt: the job is not running at `attempt`.
        """
        reply = self._create(keys=[keys.job_key(job_id), keys.split_key(job_id), keys.split_jobs_key()],
                             args=[attempt, parts, windows, job_id])
        self._check(job_id, reply, attempt)

    def start(self, job_id: str, attempt: int, unit: str, lease_s: float, holder: str,
              message: dict) -> tp.Optional[int]:
        """Take unit `unit` and its lease; returns its try number, or None when it is
        done already or runs under another live lease (a duplicate delivery).
        `message` is what its Celery message carried, to send it again if it is lost.

        Raises:
            JobNotFound, IllegalTransition, StaleAttempt: as for `create`.
        """
        reply = self._start(keys=[keys.job_key(job_id), keys.split_key(job_id), keys.unit_lease_key(job_id, unit)],
                            args=[attempt, unit, int(lease_s * 1000), holder, json.dumps(message)])
        if reply[0].decode() in ("done", "leased"):
            return None
        self._check(job_id, reply, attempt)
        return int(reply[3])

    def heartbeat(self, job_id: str, attempt: int, unit: str, lease_s: float, holder: str = "",
                  windows: tp.Optional[int] = None, base: float = 0.0, share: float = 1.0) -> None:
        """Renew the unit's lease (none for `unit=""`) and the job's; with `windows`,
        record the windows the part has run and raise the job's progress to
        `base + share * (all parts' windows done) / (all windows)`.

        Raises:
            JobNotFound, IllegalTransition, StaleAttempt: as for `create`.
        """
        reply = self._heartbeat(
            keys=[keys.job_key(job_id), keys.split_key(job_id),
                  keys.unit_lease_key(job_id, unit or "none"), keys.lease_key(job_id)],
            args=[attempt, unit, int(lease_s * 1000), holder, "" if windows is None else windows, base, share])
        self._check(job_id, reply, attempt)

    def finish(self, job_id: str, attempt: int, unit: str) -> None:
        """Unit `unit` is done; its lease is dropped.

        Raises:
            JobNotFound, IllegalTransition, StaleAttempt: as for `create` (or the unit
                was not running).
        """
        self._end_unit(job_id, attempt, unit, "done", lease_must_be_gone=False)

    def requeue(self, job_id: str, attempt: int, unit: str, *, lost: bool,
                max_tries: tp.Optional[int] = None) -> dict:
        """Put a running unit back to `queued` and return its message, to be sent again:
        its worker stops (`lost=False`), or its lease expired (`lost=True`: of several
        sweepers exactly one succeeds).

        Raises:
            PartsExhausted: (lost) the unit already ran `max_tries` times.
            JobNotFound, IllegalTransition, StaleAttempt: as for `finish`; also when
                (lost) its lease is alive after all.
        """
        return json.loads(self._end_unit(job_id, attempt, unit, "queued", lease_must_be_gone=lost,
                                         max_tries=max_tries) or "{}")

    def _end_unit(self, job_id: str, attempt: int, unit: str, state: str, *, lease_must_be_gone: bool,
                  max_tries: tp.Optional[int] = None) -> str:
        reply = self._end(keys=[keys.job_key(job_id), keys.split_key(job_id), keys.unit_lease_key(job_id, unit)],
                          args=[attempt, unit, state, "1" if lease_must_be_gone else "0",
                                "" if max_tries is None else max_tries])
        if reply[0].decode() == "exhausted":
            raise PartsExhausted(f"{unit} of job {job_id} was lost on all {max_tries} tries")
        self._check(job_id, reply, attempt)
        return reply[3].decode()

    def get(self, job_id: str) -> dict[str, str]:
        """The split record as strings (empty when there is none)."""
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(keys.split_key(job_id)).items()}

    def unit_lease_holder(self, job_id: str, unit: str) -> tp.Optional[str]:
        value = self.redis.get(keys.unit_lease_key(job_id, unit))
        return value.decode() if value is not None else None

    def in_flight(self) -> list[str]:
        """Ids of jobs with a split record."""
        return sorted(member.decode() for member in self.redis.smembers(keys.split_jobs_key()))

    def drop(self, job_id: str) -> None:
        """Remove the job's split record and unit leases."""
        record = self.get(job_id)
        units = [part_unit(index) for index in range(int(record.get("parts", 0)))] + [MERGE]
        pipe = self.redis.pipeline()
        pipe.delete(keys.split_key(job_id), *(keys.unit_lease_key(job_id, unit) for unit in units))
        pipe.srem(keys.split_jobs_key(), job_id)
        pipe.execute()

    @staticmethod
    def _check(job_id: str, reply: list, attempt: int) -> None:
        outcome = reply[0].decode()
        raise_unless_ok(job_id, outcome, reply[1:3], JobStatus.RUNNING, attempt)


def send_unit(celery: tp.Any, queue: str, job_id: str, attempt: int, unit: str, message: dict) -> None:
    """Send a unit's task (again), as the chord first sent it: a part with its chord, so
    its completion still counts towards the merge."""
    if unit == MERGE:
        celery.send_task(MERGE_PARTS_TASK, args=[job_id, attempt], task_id=message.get("id"), queue=queue)
    else:
        celery.send_task(SEPARATE_PART_TASK, args=[job_id, attempt, int(unit.split(":")[1])],
                         task_id=message.get("id"), group_id=message.get("group"),
                         group_index=message.get("group_index"), chord=message.get("chord"), queue=queue)
