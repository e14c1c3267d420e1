"""Job records in Redis: the job state machine and the only code that writes it.

A job moves through these states; every move is one Lua script, so the check of the
current state and the write happen atomically (two processes racing for the same move:
exactly one wins, the other gets `IllegalTransition`)::

    queued --> running --> succeeded | failed | cancelled
    queued --> cancelled | failed
    running --> queued          (requeue: its worker's lease expired, or it gave the job back)

Each start of a job is an *attempt*: `Job.attempts` counts them and the number is the
fence of that run. A worker names its attempt in every write (progress, lease renewal,
the final outcome) and a write for any other attempt is refused with `StaleAttempt`, so
a presumed-dead worker that comes back late can never overwrite the current run.

While a job runs, its worker holds a *lease*: a key with a TTL that it renews. A job
still `running` with no lease has lost its worker; `requeue` puts it back in the queue.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import logging
import time
import typing as tp
import uuid
from datetime import datetime, timezone

import redis

from demix import redis_keys as keys
from demix.errors import DemixError, IllegalTransition, JobNotFound, StaleAttempt, shown
from demix.jobs.metrics import AUDIO_SECONDS_BUCKETS, JOB_DURATION_BUCKETS

log = logging.getLogger(__name__)


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


@dataclasses.dataclass
class Job:
    """One separation request and everything known about its progress."""

    id: str
    status: JobStatus
    stems: str
    model: str
    samplerate: int
    channels: int
    frames: int
    created_at: float
    progress: float = 0.0
    started_at: tp.Optional[float] = None
    finished_at: tp.Optional[float] = None
    outputs: tp.List[str] = dataclasses.field(default_factory=list)
    error: tp.Optional[dict] = None
    input_format: str = ""
    output: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=dict)  # resolved OutputOptions
    queue: str = ""
    """The Celery queue the job was sent to ("": a record from before queues were recorded)."""
    owner: str = ""
    """Id of the API key that submitted it (a digest, never the key); "" without API keys."""
    attempts: int = 0
    """Runs started so far; the current (or last) run's number, which fences its writes."""
    handed_back: int = 0
    """Runs that ended with the worker giving the job back (a graceful stop); they do not
    count towards `DEMIX_MAX_ATTEMPTS`."""
    callback_url: tp.Optional[str] = None  # webhook target, POSTed the job JSON when it finishes
    source_url: tp.Optional[str] = None
    """A `url` job's input address: a worker fetches it before separating."""
    request_fields: tp.Dict[str, str] = dataclasses.field(default_factory=dict)
    """A `url` job's form fields, parsed again (output defaults) once its input is known."""
    download: tp.Optional[dict] = None
    """A `url` job's fetch: `received_bytes` and `total_bytes` (None while unknown)."""
    workflow: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=dict)
    """A workflow job's checked workflow (`demix.workflows.spec.Workflow.to_dict`); its runs
    are child jobs."""
    workflow_unit: tp.Dict[str, tp.Any] = dataclasses.field(default_factory=dict)
    """A child job's place in its workflow job (`demix.workflows.runs`): `parent`, `unit`,
    `kind`, and what it reads."""
    cached: bool = False
    """Its stems were taken from the result cache instead of running the model."""
    use_cache: bool = True
    """The job may read and write the result cache (the request's `cache` field)."""

    @property
    def duration(self) -> float:
        """Input length in seconds (0 for a `url` job whose input is not fetched yet)."""
        return self.frames / self.samplerate if self.samplerate else 0.0

    @property
    def awaits_input(self) -> bool:
        """A `url` job whose input has not been fetched and accepted yet."""
        return bool(self.source_url) and not self.samplerate

    @property
    def stage(self) -> tp.Optional[str]:
        """What a running job does now: `downloading` its `url` input, or `separating`."""
        if self.status is not JobStatus.RUNNING:
            return None
        return "downloading" if self.awaits_input else "separating"

    @property
    def counted_attempts(self) -> int:
        """Runs that count towards `DEMIX_MAX_ATTEMPTS`: all but the handed-back ones."""
        return self.attempts - self.handed_back

    def to_public(self) -> dict:
        """The job as the API shows it (without URLs, which only the API can build)."""
        return {
            "id": self.id,
            "status": self.status.value,
            "progress": round(self.progress, 4),
            "attempts": self.attempts,
            "stems": self.stems,
            "model": self.model,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "samplerate": self.samplerate,
            "channels": self.channels,
            "frames": self.frames,
            "duration": round(self.duration, 6),
            "input_format": self.input_format,
            "output": self.output,
            "error": self.error,
            "callback_url": self.callback_url,
            "source_url": self.source_url,
            "stage": self.stage,
            "download": self.download,
            "cached": self.cached,
        }


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_valid_job_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def _iso(timestamp: tp.Optional[float]) -> tp.Optional[str]:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="milliseconds")


FinishedHook = tp.Callable[[Job], None]

# One script for every state change. Values in the hash are JSON, so statuses compare
# as '"queued"'. Returns {outcome, previous status, attempts, record...} where outcome is
# ok | missing | illegal | stale | leased.
#   KEYS: job hash, running-jobs set, lease, counters hash, duration histogram, audio histogram,
#         the job's queue's queued index ('' = a record without a queue)
#   ARGV: job id, target status, allowed previous statuses (space separated), the attempt
#         the caller runs ('' = any), '1' if the lease must be gone, lease TTL in ms, lease
#         holder, now, duration buckets (JSON), audio buckets (JSON), requeue reason, then
#         field/value pairs to write
_TRANSITION = """
local job, running, lease = KEYS[1], KEYS[2], KEYS[3]
local target, allowed, attempt = ARGV[2], ARGV[3], ARGV[4]
if redis.call('EXISTS', job) == 0 then return {'missing'} end
local status, attempts = unpack(redis.call('HMGET', job, 'status', 'attempts'))
attempts = tonumber(attempts) or 0
local previous = cjson.decode(status)
if not string.find(' ' .. allowed .. ' ', ' ' .. previous .. ' ', 1, true) then
  return {'illegal', previous, attempts}
end
if attempt ~= '' and tonumber(attempt) ~= attempts then return {'stale', previous, attempts} end
if ARGV[5] == '1' and redis.call('EXISTS', lease) == 1 then return {'leased', previous, attempts} end
local fields = {}
for i = 12, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', job, 'status', cjson.encode(target), unpack(fields))
if target == 'running' then
  attempts = redis.call('HINCRBY', job, 'attempts', 1)
  redis.call('SET', lease, attempts .. ' ' .. ARGV[7], 'PX', ARGV[6])
  redis.call('SADD', running, ARGV[1])
else
  redis.call('DEL', lease)
  redis.call('SREM', running, ARGV[1])
end
if KEYS[7] ~= '' then
  if target == 'queued' then redis.call('ZADD', KEYS[7], ARGV[8], ARGV[1])
  else redis.call('ZREM', KEYS[7], ARGV[1]) end
end
local counters = KEYS[4]
-- A workflow's run counts as a requeue (a lost worker) but not as a job of its own: the
-- outcome counters and histograms count the jobs clients submitted.
local unit = redis.call('HGET', job, 'workflow_unit')
local is_run = unit and unit ~= '{}'
if target == 'queued' then
  redis.call('HINCRBY', counters, 'requeued:' .. ARGV[11], 1)
  if ARGV[11] == 'handed_back' then redis.call('HINCRBY', job, 'handed_back', 1) end
elseif is_run then
elseif target == 'succeeded' or target == 'cancelled' then
  redis.call('HINCRBY', counters, target, 1)
elseif target == 'failed' then
  local error = cjson.decode(redis.call('HGET', job, 'error'))
  redis.call('HINCRBY', counters, 'failed:' .. ((type(error) == 'table' and error.code) or 'unknown'), 1)
end
if target == 'succeeded' and not is_run then
  local function observe(histogram, buckets, value)
    local field = '+Inf'
    for _, bound in ipairs(cjson.decode(buckets)) do
      if value <= bound then field = tostring(bound) break end
    end
    redis.call('HINCRBY', histogram, field, 1)
    redis.call('HINCRBY', histogram, 'count', 1)
    redis.call('HINCRBYFLOAT', histogram, 'sum', value)
  end
  local started, frames, rate = unpack(redis.call('HMGET', job, 'started_at', 'frames', 'samplerate'))
  started = tonumber(started)
  if started then observe(KEYS[5], ARGV[9], math.max(0, tonumber(ARGV[8]) - started)) end
  if tonumber(rate) and tonumber(rate) > 0 then
    observe(KEYS[6], ARGV[10], tonumber(frames) / tonumber(rate))
  end
end
local result = {'ok', previous, attempts}
for _, value in ipairs(redis.call('HGETALL', job)) do result[#result + 1] = value end
return result
"""

# The head of every script that writes for a running attempt: the fence. KEYS[1] job
# hash, ARGV[1] attempt. Returns early with {outcome, status, attempts} unless the job is
# running under that attempt; leaves `status` and `attempts` set for the rest.
RUNNING_ATTEMPT_FENCE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
local status, attempts = unpack(redis.call('HMGET', KEYS[1], 'status', 'attempts'))
status = cjson.decode(status)
attempts = tonumber(attempts) or 0
if status ~= 'running' then return {'illegal', status, attempts} end
if tonumber(ARGV[1]) ~= attempts then return {'stale', status, attempts} end
"""

# A running attempt's heartbeat: renews its lease and optionally writes its progress, if
# the job is still running under that attempt. Returns {outcome, status, attempts}.
#   KEYS: job hash, lease; ARGV: attempt, lease TTL in ms, lease holder, progress ('' = none)
# A running attempt's own fields (a `url` job's download, then its input's facts), if the
# job is still running under that attempt. Returns {outcome, status, attempts, record...}.
#   KEYS: job hash; ARGV: attempt, then field/value pairs
_UPDATE_RUNNING = RUNNING_ATTEMPT_FENCE + """
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
local result = {'ok', status, attempts}
for _, value in ipairs(redis.call('HGETALL', KEYS[1])) do result[#result + 1] = value end
return result
"""

_HEARTBEAT = RUNNING_ATTEMPT_FENCE + """
redis.call('SET', KEYS[2], attempts .. ' ' .. ARGV[3], 'PX', ARGV[2])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'progress', ARGV[4]) end
return {'ok', status, attempts}
"""

# Claims the re-sending of a queued job's lost message: moves the job to the back of its
# queue's queued index (where its new message goes), only if it is still there under the
# time the caller saw, and counts it. Returns 1 if claimed, else 0.
#   KEYS: the queue's queued index, counters hash; ARGV: job id, the score seen, now
_CLAIM_RESEND = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('HINCRBY', KEYS[2], 'requeued:lost_message', 1)
return 1
"""


# Creates a child job's record unless it exists or its parent is not running (a child made
# while its parent is cancelled or deleted would outlive it). Returns 1 if created, else 0.
#   KEYS: job hash, the parent's children set, the child's queue's queued index ('' = none),
#         the parent's hash
#   ARGV: job id, created at, then field/value pairs
_CREATE_CHILD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('HGET', KEYS[4], 'status') ~= '"running"' then return 0 end
local fields = {}
for i = 3, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('SADD', KEYS[2], ARGV[1])
if KEYS[3] ~= '' then redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1]) end
return 1
"""


class JobStore:
    """Reads and writes job records, one Redis hash per job (values JSON-encoded).

    `on_finished` hooks are called once per job with its final record, by the process
    whose move to `succeeded`, `failed` or `cancelled` won; a hook's exception is logged,
    never raised.
    """

    def __init__(self, client: redis.Redis, on_finished: tp.Iterable[FinishedHook] = ()):
        self.redis = client
        self.on_finished: list[FinishedHook] = list(on_finished)
        self._transition = client.register_script(_TRANSITION)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._update_running = client.register_script(_UPDATE_RUNNING)
        self._claim_resend = client.register_script(_CLAIM_RESEND)
        self._create_child = client.register_script(_CREATE_CHILD)

    # -- reading ---------------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """Raises:
            JobNotFound: no record has this id.
        """
        raw = self.redis.hgetall(keys.job_key(job_id)) if is_valid_job_id(job_id) else {}
        if not raw:
            raise JobNotFound(f"no job with id {shown(job_id)}")
        return _job_from_hash(raw)

    def running_job_ids(self) -> list[str]:
        """Ids of the jobs currently `running` (each should hold a lease)."""
        return sorted(member.decode() for member in self.redis.smembers(keys.running_jobs_key()))

    def queued_before(self, queue: str, before: float) -> dict[str, float]:
        """Jobs of Celery queue `queue` that have been `queued` since before `before`
        (epoch s): id -> when they entered the queue."""
        entries = self.redis.zrangebyscore(keys.queued_jobs_key(queue), "-inf", f"({before!r}",
                                           withscores=True)
        return {member.decode(): score for member, score in entries}

    def lease_holder(self, job_id: str) -> tp.Optional[str]:
        """`"<attempt> <holder>"` of the job's live lease, or None when it has none."""
        value = self.redis.get(keys.lease_key(job_id))
        return value.decode() if value is not None else None

    # -- writing ---------------------------------------------------------------------------

    def create(self, job: Job, upload_bytes: int = 0) -> None:
        """Write a new job's record (and count it as submitted, with its upload's size)."""
        fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(job)}
        pipe = self.redis.pipeline()
        pipe.hset(keys.job_key(job.id), mapping={k: json.dumps(_plain(v)) for k, v in fields.items()})
        pipe.zadd(keys.jobs_index_key(), {job.id: job.created_at})
        if job.status is JobStatus.QUEUED and job.queue:
            pipe.zadd(keys.queued_jobs_key(job.queue), {job.id: job.created_at})
        pipe.hincrby(keys.metrics_counters_key(), "submitted", 1)
        pipe.hincrby(keys.metrics_counters_key(), "upload_bytes", upload_bytes)
        pipe.execute()

    def create_child(self, job: Job, parent_id: str) -> bool:
        """Write the record of a child job of `parent_id` (a workflow's run) unless it exists
        or the parent is no longer running: True for exactly one of several callers creating
        the same child, which then sends its task. A child is not in the jobs index (it is
        listed, kept and deleted with its parent, `children`) nor counted as submitted."""
        fields = {f.name: json.dumps(_plain(getattr(job, f.name))) for f in dataclasses.fields(job)}
        queued_key = keys.queued_jobs_key(job.queue) if job.status is JobStatus.QUEUED and job.queue else ""
        return bool(self._create_child(
            keys=[keys.job_key(job.id), keys.job_children_key(parent_id), queued_key, keys.job_key(parent_id)],
            args=[job.id, repr(job.created_at), *(item for pair in fields.items() for item in pair)]))

    def children(self, job_id: str) -> list[str]:
        """Ids of the job's child jobs (a workflow's runs)."""
        return sorted(member.decode() for member in self.redis.smembers(keys.job_children_key(job_id)))

    def delete(self, job_id: str) -> None:
        """Remove the job's record, lease and index entries (not its files)."""
        queued_key = self._queued_key(job_id)
        pipe = self.redis.pipeline()
        pipe.delete(keys.job_key(job_id), keys.lease_key(job_id), keys.job_children_key(job_id))
        pipe.zrem(keys.jobs_index_key(), job_id)
        pipe.srem(keys.running_jobs_key(), job_id)
        if queued_key:
            pipe.zrem(queued_key, job_id)
        pipe.execute()

    def mark_running(self, job_id: str, lease_s: float, holder: str = "") -> Job:
        """Start a new attempt of a queued job and take its lease; returns the running job
        (its `attempts` is this attempt's number).

        Raises:
            JobNotFound: no such job.
            IllegalTransition: the job is not queued (already taken, finished or cancelled).
        """
        return self._move(job_id, JobStatus.RUNNING, (JobStatus.QUEUED,), lease_s=lease_s,
                          holder=holder, started_at=time.time(), progress=0.0, error=None,
                          finished_at=None, outputs=[], cached=False)

    def heartbeat(self, job_id: str, attempt: int, lease_s: float, holder: str = "",
                  progress: tp.Optional[float] = None) -> None:
        """Renew attempt `attempt`'s lease and, if given, record its progress (clamped to 0-1).

        Raises:
            JobNotFound: the job was deleted.
            IllegalTransition: the job is no longer running (cancelled, requeued, finished).
            StaleAttempt: another attempt owns the job now.
        """
        value = "" if progress is None else json.dumps(min(max(float(progress), 0.0), 1.0))
        outcome, *rest = self._heartbeat(keys=[keys.job_key(job_id), keys.lease_key(job_id)],
                                         args=[attempt, int(lease_s * 1000), holder, value])
        raise_unless_ok(job_id, outcome.decode(), rest, JobStatus.RUNNING, attempt)

    def update_running(self, job_id: str, attempt: int, **fields: tp.Any) -> Job:
        """Write fields of a running job for attempt `attempt` (a `url` job's download
        progress, then its input's facts once accepted); returns the updated job.

        Raises:
            JobNotFound, IllegalTransition, StaleAttempt: as for `heartbeat`.
        """
        pairs: list[str] = []
        for name, value in fields.items():
            pairs += [name, json.dumps(_plain(value))]
        outcome, *rest = self._update_running(keys=[keys.job_key(job_id)], args=[attempt, *pairs])
        raise_unless_ok(job_id, outcome.decode(), rest[:2], JobStatus.RUNNING, attempt)
        return _job_from_hash(dict(zip(rest[2::2], rest[3::2])))

    def mark_succeeded(self, job_id: str, outputs: tp.Sequence[str], attempt: int) -> Job:
        """Finish attempt `attempt` with its stems `outputs`.

        Raises:
            JobNotFound, IllegalTransition, StaleAttempt: as for `heartbeat`.
        """
        return self._move(job_id, JobStatus.SUCCEEDED, (JobStatus.RUNNING,), attempt=attempt,
                          progress=1.0, outputs=list(outputs), finished_at=time.time())

    def mark_failed(self, job_id: str, error: DemixError, attempt: tp.Optional[int] = None,
                    lease_must_be_gone: bool = False) -> Job:
        """Fail the job with `error`: attempt `attempt`'s run, or (None) a queued or running
        job whatever its attempt; `lease_must_be_gone` only if its lease expired.

        Raises:
            JobNotFound, IllegalTransition, StaleAttempt: as for `heartbeat`.
        """
        allowed = (JobStatus.RUNNING,) if attempt is not None or lease_must_be_gone \
            else (JobStatus.QUEUED, JobStatus.RUNNING)
        return self._move(job_id, JobStatus.FAILED, allowed, attempt=attempt,
                          lease_must_be_gone=lease_must_be_gone, error=error.to_dict(),
                          finished_at=time.time())

    def mark_cancelled(self, job_id: str) -> Job:
        """Cancel a queued or running job (a running attempt notices at its next heartbeat).

        Raises:
            JobNotFound: no such job.
            IllegalTransition: the job already finished.
        """
        return self._move(job_id, JobStatus.CANCELLED, (JobStatus.QUEUED, JobStatus.RUNNING),
                          finished_at=time.time())

    def requeue(self, job_id: str, attempt: int, *, handed_back: bool) -> Job:
        """Put a running job back in the queue; the caller then sends its task again.

        `handed_back`: its worker gives it back (a graceful stop; the attempt must be the
        current one and does not count towards the attempt limit). Otherwise its worker
        is lost: the lease must have expired and `attempt` must still be current, so of
        several sweepers noticing the same dead worker exactly one requeues the job.

        Raises:
            JobNotFound, IllegalTransition, StaleAttempt: as for `heartbeat`.
            IllegalTransition: (lost) the job's lease is alive after all.
        """
        return self._move(job_id, JobStatus.QUEUED, (JobStatus.RUNNING,), attempt=attempt,
                          lease_must_be_gone=not handed_back,
                          reason="handed_back" if handed_back else "lost", progress=0.0)

    def claim_resend(self, job_id: str, queue: str, queued_since: float) -> bool:
        """Claim the sending again of a queued job's lost message: True for exactly one of
        several callers that saw the job queued since `queued_since` (its place in the
        queued index, which moves to the back: now). False if the job left the queue (a
        worker took it, it was cancelled) or another caller claimed it first."""
        return bool(self._claim_resend(keys=[keys.queued_jobs_key(queue), keys.metrics_counters_key()],
                                       args=[job_id, repr(float(queued_since)), repr(time.time())]))

    def _move(self, job_id: str, target: JobStatus, allowed: tp.Sequence[JobStatus], *,
              attempt: tp.Optional[int] = None, lease_must_be_gone: bool = False,
              lease_s: float = 0.0, holder: str = "", reason: str = "",
              **fields: tp.Any) -> Job:
        pairs: list[str] = []
        for name, value in fields.items():
            pairs += [name, json.dumps(_plain(value))]
        reply = self._transition(
            keys=[keys.job_key(job_id), keys.running_jobs_key(), keys.lease_key(job_id),
                  keys.metrics_counters_key(), keys.metrics_histogram_key("job_duration_seconds"),
                  keys.metrics_histogram_key("job_audio_seconds"), self._queued_key(job_id)],
            args=[job_id, target.value, " ".join(s.value for s in allowed),
                  "" if attempt is None else attempt, "1" if lease_must_be_gone else "0",
                  int(lease_s * 1000), holder, time.time(), json.dumps(JOB_DURATION_BUCKETS),
                  json.dumps(AUDIO_SECONDS_BUCKETS), reason, *pairs])
        outcome, *rest = reply
        raise_unless_ok(job_id, outcome.decode(), rest[:2], target, attempt)
        raw = dict(zip(rest[2::2], rest[3::2]))
        job = _job_from_hash(raw)
        if target in FINISHED:
            self._call_finished_hooks(job)
        return job

    def _queued_key(self, job_id: str) -> str:
        """The queued index of the job's queue ('' for a record without one); a job's queue
        never changes, so reading it before the transition is safe."""
        queue = self.redis.hget(keys.job_key(job_id), "queue")
        return keys.queued_jobs_key(json.loads(queue)) if queue and json.loads(queue) else ""

    def _call_finished_hooks(self, job: Job) -> None:
        for hook in self.on_finished:
            try:
                hook(job)
            except Exception:
                log.exception("on_finished hook %r failed for job %s", hook, job.id)


def raise_unless_ok(job_id: str, outcome: str, rest: list, target: JobStatus,
                    attempt: tp.Optional[int]) -> None:
    """Turn a transition script's refusal (`outcome` and the `rest` of its reply) into the
    exception that says why; nothing for "ok". Shared with `demix.jobs.split_records`' scripts."""
    if outcome == "ok":
        return
    if outcome == "missing":
        raise JobNotFound(f"no job with id {job_id!r}")
    status = rest[0].decode() if rest and isinstance(rest[0], bytes) else str(rest[0])
    current = int(rest[1])
    if outcome == "stale":
        raise StaleAttempt(f"job {job_id} is at attempt {current}, not {attempt}; attempt {attempt} "
                           f"may no longer write it", details={"status": status, "attempts": current})
    if outcome == "leased":
        raise IllegalTransition(f"job {job_id} still has a live lease (attempt {current}); it is "
                                "not lost", details={"status": status, "attempts": current})
    raise IllegalTransition(f"job {job_id} is {status}; it cannot become {target.value}",
                            details={"status": status, "attempts": current})


def _job_from_hash(raw: tp.Mapping[bytes, bytes]) -> Job:
    values = {k.decode(): json.loads(v) for k, v in raw.items()}
    known = {f.name for f in dataclasses.fields(Job)}
    values = {k: v for k, v in values.items() if k in known}
    values["status"] = JobStatus(values["status"])
    return Job(**values)


def _plain(value: tp.Any) -> tp.Any:
    if isinstance(value, enum.Enum):
        return value.value
    return value
