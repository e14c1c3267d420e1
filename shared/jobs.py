"""Job records in Redis: the job state machine and the only code that writes it.

A job moves `queued -> running -> succeeded | failed`. A worker that dies mid-job
leaves it `running`; the broker redelivers the task and the next worker starts it
again from the stored input.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import time
import typing as tp
import uuid
from datetime import datetime, timezone

import redis

from . import keys
from .errors import DemixError, JobNotFound


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


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
    callback_url: tp.Optional[str] = None  # webhook target, POSTed the job JSON when it finishes

    @property
    def duration(self) -> float:
        """Input length in seconds."""
        return self.frames / self.samplerate

    def to_public(self) -> dict:
        """The job as the API shows it (without URLs, which only the API can build)."""
        return {
            "id": self.id,
            "status": self.status.value,
            "progress": round(self.progress, 4),
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
        }


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_valid_job_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def _iso(timestamp: tp.Optional[float]) -> tp.Optional[str]:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="milliseconds")


class JobStore:
    """Reads and writes job records, one Redis hash per job (values JSON-encoded)."""

    def __init__(self, client: redis.Redis):
        self.redis = client

    def create(self, job: Job) -> None:
        fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(job)}
        pipe = self.redis.pipeline()
        pipe.hset(keys.job_key(job.id), mapping={k: json.dumps(_plain(v)) for k, v in fields.items()})
        pipe.zadd(keys.jobs_index_key(), {job.id: job.created_at})
        pipe.execute()

    def get(self, job_id: str) -> Job:
        """Raises:
            JobNotFound: no record has this id.
        """
        raw = self.redis.hgetall(keys.job_key(job_id)) if is_valid_job_id(job_id) else {}
        if not raw:
            raise JobNotFound(f"no job with id {job_id!r}")
        values = {k.decode(): json.loads(v) for k, v in raw.items()}
        known = {f.name for f in dataclasses.fields(Job)}
        values = {k: v for k, v in values.items() if k in known}
        values["status"] = JobStatus(values["status"])
        return Job(**values)

    def delete(self, job_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(keys.job_key(job_id))
        pipe.zrem(keys.jobs_index_key(), job_id)
        pipe.execute()

    def mark_running(self, job_id: str) -> None:
        self._update(job_id, status=JobStatus.RUNNING, started_at=time.time(), progress=0.0,
                     error=None, finished_at=None)

    def set_progress(self, job_id: str, progress: float) -> None:
        self._update(job_id, progress=min(max(progress, 0.0), 1.0))

    def mark_succeeded(self, job_id: str, outputs: tp.Sequence[str]) -> None:
        self._update(job_id, status=JobStatus.SUCCEEDED, progress=1.0, outputs=list(outputs),
                     finished_at=time.time())

    def mark_failed(self, job_id: str, error: DemixError) -> None:
        self._update(job_id, status=JobStatus.FAILED, error=error.to_dict(), finished_at=time.time())

    def _update(self, job_id: str, **fields: tp.Any) -> None:
        key = keys.job_key(job_id)
        # Only update jobs that exist: a late progress report must not resurrect a deleted job.
        if not self.redis.exists(key):
            raise JobNotFound(f"no job with id {job_id!r}")
        self.redis.hset(key, mapping={k: json.dumps(_plain(v)) for k, v in fields.items()})


def _plain(value: tp.Any) -> tp.Any:
    if isinstance(value, enum.Enum):
        return value.value
    return value
