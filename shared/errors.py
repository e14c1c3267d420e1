"""The service's errors. Each carries a stable `code`, an HTTP status and a message a
user can act on; the API turns them into `{"error": {"code", "message"}}` and a failed
job stores the same pair."""
from __future__ import annotations


class DemixError(Exception):
    """Base class: `code` names the problem for programs, the message explains it to people."""

    code = "error"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


class BadRequest(DemixError):
    """The request itself is malformed: a missing field, an unknown option value."""
    code = "bad_request"
    http_status = 400


class InvalidAudio(DemixError):
    """The upload is not audio we can separate: an undecodable or empty WAV, one too long
    or with unusable samples (`code` says which). Not a WAV at all: `UnsupportedMediaType`."""
    code = "invalid_audio"
    http_status = 422


class UnsupportedMediaType(InvalidAudio):
    """The upload is not a WAV at all; the message says what it looks like instead."""
    code = "not_wav"
    http_status = 415


class UploadTooLarge(DemixError):
    """The upload exceeds `DEMIX_MAX_UPLOAD_MB`."""
    code = "upload_too_large"
    http_status = 413


class JobNotFound(DemixError):
    """No job (or no such stem of a job) has this id."""
    code = "not_found"
    http_status = 404


class JobNotFinished(DemixError):
    """The job's result was asked for before it succeeded."""
    code = "job_not_finished"
    http_status = 409


class JobFinished(DemixError):
    """A change asked of a job that already finished (cancelling a succeeded job)."""
    code = "job_finished"
    http_status = 409


class IllegalTransition(DemixError):
    """A job state change that its current state does not allow (cancelling a finished
    job, starting one that is not queued); `details` carry the job's `status`."""
    code = "illegal_transition"
    http_status = 409


class StaleAttempt(IllegalTransition):
    """A write by a run (attempt) of a job that is no longer the job's current one."""
    code = "stale_attempt"


class WorkerLost(DemixError):
    """Every attempt's worker disappeared mid-job (`DEMIX_MAX_ATTEMPTS` of them)."""
    code = "worker_lost"
    http_status = 500


class ServiceUnavailable(DemixError):
    """A backend the request needs (Redis, the broker) cannot be reached."""
    code = "service_unavailable"
    http_status = 503


class ModelUnavailable(DemixError):
    """The worker could not obtain the model's weights."""
    code = "model_unavailable"
    http_status = 503


class SeparationFailed(DemixError):
    """The separation itself failed for a reason that is not the input's fault."""
    code = "separation_failed"
    http_status = 500
