"""The service's errors. Each carries a stable `code`, an HTTP status and a message a
user can act on; the API turns them into `{"error": {"code", "message"}}` and a failed
job stores the same pair."""
from __future__ import annotations


SHOWN_VALUE_CHARS = 64
"""Most characters of a caller's value an error message repeats. A message never grows with
the input: it travels in a header (a gRPC status, bounded by the peer) and in logs."""


def shown(value: str, limit: int = SHOWN_VALUE_CHARS) -> str:
    """`value` quoted for an error message, cut to `limit` characters (then saying how long it was)."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit] + '…'!r} ({len(value)} characters)"


class DemixError(Exception):
    """Base class: `code` names the problem for programs, the message explains it to people."""

    code = "error"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None, details: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}  # HTTP headers the API adds to the error response
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
    """The upload is no audio format the service reads (a PNG, a MIDI file, a playlist, ...);
    the message says what it looks like instead."""
    code = "unsupported_format"
    http_status = 415


class UnsupportedCodec(UnsupportedMediaType):
    """A container the service reads holding a codec it does not take (Ogg FLAC, AC-3 in MP4,
    raw ADTS AAC, MP2); the message names the codec and what is supported."""
    code = "unsupported_codec"


class NoAudioStream(InvalidAudio):
    """The upload is a container with no audio stream in it (a video-only MP4)."""
    code = "no_audio_stream"


class CorruptAudio(InvalidAudio):
    """The decoder failed on the upload's stream (cut off, damaged); the message gives the
    decoder's own reason."""
    code = "corrupt_audio"


class UploadTooLarge(DemixError):
    """The upload exceeds `DEMIX_MAX_UPLOAD_MB`."""
    code = "upload_too_large"
    http_status = 413


class TooManyFormParts(DemixError):
    """A multipart form with more parts than the API reads (`demix.api.upload_requests.MAX_FORM_PARTS`)."""
    code = "too_many_form_parts"
    http_status = 413


class FormFieldTooLarge(DemixError):
    """A text field of the form (or a part's headers, or a body of text fields alone) over
    the limit on what the API holds in memory (`demix.api.upload_requests.MAX_FORM_FIELD_BYTES`)."""
    code = "form_field_too_large"
    http_status = 413


class Unauthorized(DemixError):
    """API keys are configured and the request has no valid `Authorization: Bearer <key>`."""
    code = "unauthorized"
    http_status = 401


class TooManyActiveJobs(DemixError):
    """The API key already has `DEMIX_MAX_ACTIVE_JOBS_PER_KEY` jobs queued or running."""
    code = "too_many_active_jobs"
    http_status = 429


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


class StorageUnavailable(ServiceUnavailable):
    """The object store (`DEMIX_STORAGE=s3://...`) could not be reached or refused a request
    after its retries; nothing half-written was published."""
    code = "storage_unavailable"


class InsufficientStorage(DemixError):
    """Too little free space under `DEMIX_DATA_DIR` to accept an upload (`DEMIX_MIN_FREE_MB`)."""
    code = "insufficient_storage"
    http_status = 507


class DiskFull(DemixError):
    """A job's stems could not be written: the disk filled up mid-write."""
    code = "disk_full"
    http_status = 507


class InvalidIdempotencyKey(BadRequest):
    """An `Idempotency-Key` header that is empty, too long or has characters outside the allowed set."""
    code = "invalid_idempotency_key"


class ModelUnavailable(DemixError):
    """The worker could not obtain the model's weights."""
    code = "model_unavailable"
    http_status = 503


class SeparationFailed(DemixError):
    """The separation itself failed for a reason that is not the input's fault."""
    code = "separation_failed"
    http_status = 500


class AddressNotAllowed(BadRequest):
    """A user-given URL (`url`, `callback_url`) names, resolves to, or redirects to a
    non-public address (private, loopback, link-local, multicast, reserved or another
    special-purpose range: `demix.outbound.is_public_address`); the message names the host,
    never the address."""
    code = "url_not_allowed"
    http_status = 400


class FetchFailed(DemixError):
    """A `url` job's input could not be fetched: the server refused, answered an error,
    stalled past `DEMIX_URL_TIMEOUT_S` or redirected too often (the message says which)."""
    code = "fetch_failed"
    http_status = 502
