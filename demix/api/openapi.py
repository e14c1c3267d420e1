"""The OpenAPI 3.1 description of the API, built from the definitions the views use.

The form fields come from the job-request parser (`demix.intake.job_request.FORM_FIELDS`),
the error statuses from the error classes, the job's fields from `JOB_FIELDS` (which a
test holds equal to what `job_json` returns), and the API-key parts from the app's own
settings. `OPERATIONS` lists every route of the app; a test fails when a route has no
entry here or an entry has no route, so **a new endpoint is one more `Operation` below**,
for example::

    Operation("jobs.pause_job", "post", "Pause a running job",
              parameters=(_JOB_ID,),
              responses={"200": _json(_JOB_REF, "The paused job."),
                         "404": _error_codes(404), "409": _error_codes(409)}),

(a new error code also goes into `ERRORS_BY_STATUS`, a new job field into `JOB_FIELDS`;
the tests say so when one is missing).
"""
from __future__ import annotations

import dataclasses
import re
import typing as tp

from demix import errors
from demix.catalogue import describe_model
from demix.config import Settings
from demix.jobs.idempotency import HEADER as IDEMPOTENCY_HEADER, KEY_PATTERN, MAX_KEY_LENGTH
from demix.intake.job_request import FILE_FIELD, FORM_FIELDS, PRESET_FIELD, URL_FIELD, WORKFLOW_FIELD
from demix.outbound import MAX_URL_LENGTH
from demix.workflows.presets import all_presets
from demix.workflows.spec import ENSEMBLE_ALGORITHMS
from demix.jobs.records import JobStatus
from demix.audio.output_formats import CHANNEL_MODES, CLIP_MODES, FORMATS, MIME_TYPES, MP3_SAMPLERATES, SAMPLE_FORMATS

from demix.api.auth import PROTECTED_PREFIX
from demix.api.upload_requests import MAX_FORM_FIELD_BYTES, MAX_FORM_PARTS

OPENAPI_VERSION = "3.1.0"
API_VERSION = "1.0.0"


def _error_codes(status: int) -> dict:
    return {"$ref": f"#/components/responses/Error{status}"}


@dataclasses.dataclass(frozen=True)
class Operation:
    """One endpoint: its Flask endpoint name (which gives the path) and what it answers."""
    endpoint: str
    method: str
    summary: str
    responses: tp.Mapping[str, dict]
    description: str = ""
    parameters: tp.Sequence[dict] = ()
    request_body: tp.Optional[dict] = None
    tags: tp.Sequence[str] = ("jobs",)


# -- schemas ---------------------------------------------------------------------------------

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {"error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {
            "code": {"type": "string", "description": "Stable name of the problem, for programs."},
            "message": {"type": "string", "description": "What went wrong and what would work, for people."},
        },
        "additionalProperties": True,
        "description": "Some errors add details: `status` and `progress` (409), `job_error` "
                       "(409 job_failed), `limit` (429).",
    }},
}

ERRORS_BY_STATUS: dict[int, tuple[str, tp.Sequence[str]]] = {
    400: ("The request is malformed: no `file` part nor `url`, both, an unknown `stems` value, an "
          "output option that cannot be written, a `url` or `callback_url` that is not an http(s) URL "
          "or is on a private range (`DEMIX_ALLOW_PRIVATE_URLS`), an invalid "
          "`Idempotency-Key` header, a refused `workflow` (its `field` names the bad value's path), "
          "an unknown or disabled `preset`, a `cache` neither true nor false.",
          ("missing_file", "file_and_url", "unknown_model", "invalid_stems", "invalid_output",
           "invalid_callback_url", "invalid_url", errors.AddressNotAllowed.code,
           errors.InvalidIdempotencyKey.code, "invalid_workflow", "unknown_preset", "preset_disabled", "invalid_cache",
           "bad_request")),
    401: ("API keys are configured and the request has no valid `Authorization: Bearer <key>`.",
          (errors.Unauthorized.code,)),
    404: ("No such job (or it belongs to another API key), no such stem, or no such path.",
          (errors.JobNotFound.code,)),
    405: ("The path exists but not with this method.", ("method_not_allowed",)),
    409: ("The result was asked for before the job succeeded, or a job that already finished was "
          "to be cancelled.", ("job_not_finished", "job_failed", "job_cancelled", errors.JobFinished.code)),
    413: ("The upload is over `DEMIX_MAX_UPLOAD_MB`, the form has more parts than the API reads "
          f"({MAX_FORM_PARTS}), or a text field is over the {MAX_FORM_FIELD_BYTES} bytes the API holds "
          "in memory (so is an urlencoded body).",
          (errors.UploadTooLarge.code, errors.TooManyFormParts.code, errors.FormFieldTooLarge.code)),
    415: ("The upload is no audio format the service reads (the message says what it looks like: "
          "a playlist, an image, MIDI, ...), or a known container holding a codec it does not take.",
          (errors.UnsupportedMediaType.code, errors.UnsupportedCodec.code)),
    422: ("Audio that cannot be separated: undecodable, damaged, silent of frames, too long (as "
          "decoded, not as its header claims), too many channels, a rate outside 8–192 kHz, or a "
          "container with no audio stream.",
          ("undecodable_wav", errors.CorruptAudio.code, errors.NoAudioStream.code, "empty_audio",
           "non_finite_samples", "too_long", "too_many_channels", "unsupported_samplerate")),
    429: ("The API key already has `DEMIX_MAX_ACTIVE_JOBS_PER_KEY` jobs queued or running.",
          (errors.TooManyActiveJobs.code,)),
    503: ("Redis (the job store and queue), or the object store (`DEMIX_STORAGE=s3://...`), is "
          "unreachable; nothing was kept.", (errors.ServiceUnavailable.code, errors.StorageUnavailable.code)),
    507: ("Less than `DEMIX_MIN_FREE_MB` is free under `DEMIX_DATA_DIR`, or the disk filled up while "
          "the upload streamed in; nothing was kept.", (errors.InsufficientStorage.code,)),
}
"""Every error status the API answers, what it means and its `error.code` values."""

JOB_ERROR_CODES = (errors.ModelUnavailable.code, errors.SeparationFailed.code, "unknown_source",
                   "invalid_stems", "undecodable_wav", errors.WorkerLost.code, errors.DiskFull.code,
                   errors.FetchFailed.code, errors.AddressNotAllowed.code, errors.UploadTooLarge.code,
                   "too_long", errors.UnsupportedMediaType.code, errors.InvalidAudio.code,
                   errors.StorageUnavailable.code)
"""`error.code` values of a failed job (the worker's errors)."""

_TIMESTAMP = {"type": ["string", "null"], "format": "date-time"}

OUTPUT_SCHEMA = {
    "type": "object",
    "description": "The resolved output options (no \"same as input\" left in them).",
    "properties": {
        "format": {"type": "string", "enum": list(FORMATS)},
        "sample_format": {"type": "string", "enum": list(SAMPLE_FORMATS),
                          "description": "For mp3: what the encoder is fed."},
        "samplerate": {"type": "integer"},
        "channels": {"type": "integer"},
        "channel_mode": {"type": "string", "enum": list(CHANNEL_MODES)},
        "bitrate": {"type": "integer", "description": "kbit/s, mp3 only."},
        "clip": {"type": "string", "enum": list(CLIP_MODES)},
    },
}

_URL = {"type": "string", "format": "uri"}

JOB_FIELDS: dict[str, dict] = {
    "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
    "status": {"type": "string", "enum": [status.value for status in JobStatus]},
    "progress": {"type": "number", "minimum": 0, "maximum": 1},
    "attempts": {"type": "integer", "minimum": 0,
                 "description": "Runs started so far (a run whose worker was lost is redone, up to "
                                "`DEMIX_MAX_ATTEMPTS`)."},
    "stems": {"type": "string", "description": "`all` or one of the model's sources (see `GET /v1/models`)."},
    "model": {"type": "string", "description": "The model that separates it (one of `GET /v1/models`)."},
    "created_at": {"type": "string", "format": "date-time"},
    "started_at": _TIMESTAMP,
    "finished_at": _TIMESTAMP,
    "samplerate": {"type": "integer", "description": "The input's sample rate, Hz."},
    "channels": {"type": "integer", "description": "The input's channel count."},
    "frames": {"type": "integer", "description": "The input's length in frames."},
    "duration": {"type": "number", "description": "The input's length in seconds."},
    "input_format": {"type": "string", "description": "`<container>/<codec>`: a WAV's libsndfile subtype (`WAV/PCM_16`), "
                     "else e.g. `MP3/MPEG_LAYER_III`, `MP4/AAC_LC`, `MP4/ALAC_24`, `OGG/OPUS`, `WEBM/VORBIS`, "
                     "`FLAC/PCM_24`, `AIFF/PCM_16`."},
    "output": OUTPUT_SCHEMA,
    "error": {"oneOf": [{"type": "null"}, {
        "type": "object", "required": ["code", "message"],
        "properties": {"code": {"type": "string", "description": "One of: " + ", ".join(JOB_ERROR_CODES)},
                       "message": {"type": "string"}}}],
        "description": "Why the job failed (null unless `status` is `failed`)."},
    "callback_url": {"type": ["string", "null"], "format": "uri",
                     "description": "Where the job's JSON is POSTed when it finishes (webhook); null: nowhere."},
    "source_url": {"type": ["string", "null"], "format": "uri",
                   "description": "A `url` job's input address (fetched by a worker); null for uploads."},
    "stage": {"type": ["string", "null"], "enum": ["downloading", "separating", None],
              "description": "While running: `downloading` a `url` job's input, or `separating`. "
                             "Null otherwise."},
    "download": {"oneOf": [{"type": "null"}, {
        "type": "object", "required": ["received_bytes", "total_bytes"],
        "properties": {"received_bytes": {"type": "integer", "minimum": 0},
                       "total_bytes": {"type": ["integer", "null"], "minimum": 0}}}],
        "description": "A `url` job's fetch: bytes received so far and the total (null while the "
                       "server has not said). Null for uploads."},
    "cached": {"type": "boolean", "description": "Its stems were taken from the result cache (an earlier "
               "run of the same model on the same audio) instead of running the model."},
    "expires_at": {**_TIMESTAMP, "description": "When the finished job and its files are deleted "
                   "(`DEMIX_RETENTION_S` after it finished). Null while it is not finished, or when "
                   "jobs are kept forever."},
    "url": _URL,
    "queue_position": {"type": ["integer", "null"], "minimum": 1,
                       "description": "While queued: the job's place in the queue, 1 = the next to start. "
                                      "Null otherwise."},
    "waiting_for": {"type": ["string", "null"],
                    "description": "While queued and no warm worker serves the job's model: says so (the "
                                   "job waits in its model's queue until one does). Null otherwise."},
    "eta_s": {"type": ["number", "null"], "minimum": 0,
              "description": "While running: estimated seconds left, from its progress and the time "
                             "since `started_at`. Null otherwise, and while too little is done to tell."},
    "outputs": {"type": ["object", "null"], "additionalProperties": _URL,
                "description": "When succeeded: stem name → download URL. Null otherwise."},
    "workflow": {
        "type": "object", "required": ["steps", "outputs"],
        "properties": {
            "steps": {"type": "array", "items": {
                "type": "object", "required": ["name", "input", "models", "status", "progress", "runs"],
                "properties": {
                    "name": {"type": "string"}, "input": {"type": "string"},
                    "models": {"type": "array", "items": {"type": "string"}},
                    "sources": {"type": "array", "items": {"type": "string"}},
                    "ensemble": {"type": ["string", "null"]},
                    "weights": {"type": ["array", "null"], "items": {"type": "number"}},
                    "status": {"type": "string", "enum": ["waiting", "queued", "running", "succeeded",
                                                          "failed", "cancelled"]},
                    "progress": {"type": "number", "minimum": 0, "maximum": 1},
                    "runs": {"type": "array", "items": {
                        "type": "object", "required": ["model", "status", "progress", "cached", "attempts"],
                        "properties": {"model": {"type": "string"}, "status": {"type": "string"},
                                       "progress": {"type": "number"}, "cached": {"type": "boolean"},
                                       "attempts": {"type": "integer", "minimum": 0}}}}}}},
            "outputs": {"type": "object", "additionalProperties": {"type": "string"}}},
        "description": "A workflow job only: each step (in the order they run) with its state, its "
                       "progress and each model run's (`cached`: taken from the result cache), and "
                       "which step's stem each output is."},
    "result_url": {**_URL, "description": "When succeeded: `GET /v1/jobs/{id}/result`."},
    "zip_url": {**_URL, "description": "When succeeded: `GET /v1/jobs/{id}/stems.zip`."},
}
"""Every field of the job JSON (`demix.api.job_views.job_json`); the last two only once it succeeded."""

MODEL_FIELDS: dict[str, dict] = {
    "name": {"type": "string"},
    "default": {"type": "boolean", "description": "Whether jobs without `model` get this one."},
    "architecture": {"type": "string", "enum": ["demucs", "bs_roformer", "mel_band_roformer", "unknown"]},
    "stems": {"type": "array", "items": {"type": "string"},
              "description": "The `stems` values a job for this model may ask for."},
    "sources": {"type": "array", "items": {"type": "string"},
                "description": "The model's outputs, in order; empty until known (a Demucs model of "
                               "your own: until a worker has loaded it)."},
    "samplerate": {"type": ["integer", "null"], "description": "The rate the model runs at, Hz."},
    "origin": {"type": "string", "description": "Where its weights came from."},
    "licence": {"type": "string", "description": "What is known of the weights' licence."},
    "sha256": {"type": ["string", "null"], "description": "The checkpoint's sha256, when it was "
               "added or pulled with `demix models`."},
    "queue": {"type": "string", "description": "The Celery queue of its jobs."},
    "workers": {"type": "integer", "minimum": 0,
                "description": "Warm worker processes serving it now."},
    "available": {"type": "boolean", "description": "Whether a warm worker serves it now; if not, "
                  "its jobs wait in its queue."},
}
"""Every field of a model in `GET /v1/models` (`demix.catalogue.catalogue`)."""

_STEM_REF = {"type": "string", "pattern": "^[a-z][a-z0-9_-]*/[a-z0-9_]+$"}

WORKFLOW_SCHEMA = {
    "type": "object", "required": ["steps"], "additionalProperties": False,
    "properties": {
        "steps": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "models"], "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": "^[a-z][a-z0-9_-]{0,31}$", "not": {"const": "mix"}},
                "input": {"anyOf": [{"const": "mix"}, _STEM_REF], "default": "mix",
                          "description": "`mix` (the job's input) or `step/stem`: a stem another step makes."},
                "models": {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"type": "string"}},
                "ensemble": {"type": "string", "enum": list(ENSEMBLE_ALGORITHMS), "default": "avg_wave",
                             "description": "How several models' stems are combined (MSST's algorithms)."},
                "weights": {"type": "array", "items": {"type": "number", "minimum": 0},
                            "description": "One per model; only the avg_* algorithms weigh (as MSST)."}}}},
        "outputs": {"type": "object", "minProperties": 1, "additionalProperties": _STEM_REF,
                    "description": "Stem name → `step/stem`. Default: the last step's stems."}},
}
"""The `workflow` field's JSON (`demix.workflows.spec`, which also checks what a schema cannot:
served models, steps that exist, no cycle, `DEMIX_WORKFLOW_MAX_RUNS`)."""

JOB_SCHEMA = {
    "type": "object",
    "required": [name for name in JOB_FIELDS if name not in ("result_url", "zip_url", "workflow")],
    "properties": JOB_FIELDS,
    "additionalProperties": False,
}


def _form_schema(settings: Settings) -> dict:
    properties: dict[str, dict] = {FILE_FIELD: {
        "type": "string", "format": "binary", "contentMediaType": "audio/*",
        "description": "The audio to separate: any WAV flavour (PCM, float, μ-law/A-law, ADPCM, "
                       "WAVE_FORMAT_EXTENSIBLE, RF64/BW64), FLAC, MP3, Ogg Vorbis/Opus, AIFF/AIFF-C, "
                       "MP4/M4A (AAC, ALAC), Matroska/WebM (Opus, Vorbis), or the first audio stream "
                       "of an MP4/MKV/WebM video. The container is told by its first bytes, not the "
                       "file name."},
        URL_FIELD: {"type": "string", "format": "uri", "maxLength": MAX_URL_LENGTH,
                    "pattern": r"^[hH][tT][tT][pP][sS]?://",
                    "description": "Instead of `file`: an http or https address a worker fetches the "
                                   "input from (the job shows `stage: downloading`). Hosts that are or "
                                   "resolve to non-public addresses (private, loopback, link-local, "
                                   "multicast, reserved or another special-purpose range) are "
                                   "refused unless `DEMIX_ALLOW_PRIVATE_URLS=1`."}}
    for field in FORM_FIELDS:
        schema: dict[str, tp.Any] = dict(field.schema or {"type": "string", "enum": list(field.choices)})
        schema["description"] = field.description
        if field.default is not None:
            schema["default"] = int(field.default) if schema.get("type") == "integer" else field.default
        properties[field.name] = schema
    properties[WORKFLOW_FIELD]["contentSchema"] = WORKFLOW_SCHEMA
    properties[PRESET_FIELD]["enum"] = [preset.name for preset in all_presets(settings) if not preset.disabled]
    offered = _stems_by_model(settings)
    properties["model"]["enum"] = list(offered)
    properties["stems"]["enum"] = list(dict.fromkeys(stem for stems in offered.values() for stem in stems))
    return {"type": "object", "properties": properties,
            "oneOf": [{"required": [FILE_FIELD]}, {"required": [URL_FIELD]}],
            "allOf": _FORM_RULES + _model_stems_rules(settings, offered)}


def _stems_by_model(settings: Settings) -> dict[str, tuple[str, ...]]:
    """Each served model's stems, as far as the model folders and the built-in list tell
    (a Demucs model of one's own: the four sources until a worker has loaded it)."""
    return {name: describe_model(settings, name).stem_choices for name in settings.served_models}


def _model_stems_rules(settings: Settings, offered: tp.Mapping[str, tp.Sequence[str]]) -> list[dict]:
    """`stems` must be one the chosen model (no `model`: the default one) offers."""
    rules = [{"if": {"required": ["model"], "properties": {"model": {"const": name}}},
              "then": {"properties": {"stems": {"enum": list(stems)}}}} for name, stems in offered.items()]
    rules.append({"if": {"not": {"required": ["model"]}},
                  "then": {"properties": {"stems": {"enum": list(offered[settings.default_model])}}}})
    return rules


def _when_format(fmt: str, then: dict) -> dict:
    return {"if": {"required": ["format"], "properties": {"format": {"const": fmt}}}, "then": then}


_FORM_RULES = [
    # What `resolve_output` refuses across fields (besides MP3's limit of two channels,
    # which depends on the upload: send channels=stereo for a multichannel input).
    _when_format("mp3", {"not": {"required": ["sample_format"]}, "properties": {
        "samplerate": {"anyOf": [{"const": "input"}, {"enum": list(MP3_SAMPLERATES)}]}}}),
    _when_format("flac", {"properties": {"sample_format": {"enum": ["pcm16", "pcm24"]}}}),
    # A workflow or preset names its models and stems itself, and keeps the input's rate and
    # channels (so an MP3 output needs an input at an MP3 rate: that depends on the upload).
    *({"if": {"required": [field]}, "then": {
        "not": {"anyOf": [{"required": [other]} for other in ("model", "stems", WORKFLOW_FIELD, PRESET_FIELD)
                          if other != field]},
        "properties": {"samplerate": {"const": "input"}, "channels": {"const": "input"}}}}
      for field in (WORKFLOW_FIELD, PRESET_FIELD)),
]
"""Combinations of form fields that cannot be written, as JSON Schema."""


# -- operations ------------------------------------------------------------------------------

def _json(schema: dict, description: str, headers: tp.Optional[dict] = None) -> dict:
    response: dict[str, tp.Any] = {"description": description,
                                   "content": {"application/json": {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


_JOB_REF = {"$ref": "#/components/schemas/Job"}
_LOCATION = {"Location": {"description": "Path of the job (`GET /v1/jobs/{id}`).", "schema": {"type": "string"}}}
_JOB_ID = {"name": "job_id", "in": "path", "required": True,
           "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
           "description": "The job's id (32 hex digits); any other value is a 404."}
_STEM_FILE = {"description": "The stem file.",
              "content": {mime: {"schema": {"type": "string", "format": "binary"}}
                          for mime in dict.fromkeys(MIME_TYPES.values())},
              "headers": {"Content-Disposition": {"schema": {"type": "string"}},
                          "Accept-Ranges": {"schema": {"type": "string"}}}}

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "jobs.create_job", "post", "Submit audio to separate",
        description="The upload is checked (format, length, samples) before anything is queued. "
                    "Form fields are matched case-insensitively; a blank field means its default.",
        request_body={"required": True, "content": {"multipart/form-data": {
            "schema": {"$ref": "#/components/schemas/JobRequest"},
            "encoding": {FILE_FIELD: {"contentType": "audio/*, video/mp4, video/webm, video/x-matroska, application/octet-stream"}}}}},
        parameters=({"name": IDEMPOTENCY_HEADER, "in": "header", "required": False,
                     "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH,
                                "pattern": f"^{KEY_PATTERN.pattern}$"},
                     "description": "A key for this submit (a UUID, say). A submit repeated with a key "
                                    "already used for a job that still exists gets that job (200) and "
                                    "stores nothing; keys are per API key."},),
        responses={"202": _json(_JOB_REF, "Queued.", _LOCATION),
                   "200": _json(_JOB_REF, "The job an earlier submit with the same `Idempotency-Key` "
                                "created; nothing new was stored or queued.", _LOCATION),
                   **{str(status): _error_codes(status) for status in (400, 413, 415, 422, 429, 503, 507)}}),
    Operation(
        "jobs.get_job", "get", "Poll a job",
        parameters=(_JOB_ID,),
        responses={"200": _json(_JOB_REF, "The job."), "404": _error_codes(404), "503": _error_codes(503)}),
    Operation(
        "jobs.cancel", "post", "Cancel a queued or running job",
        description="A queued job is never started; a running one stops at its next model segment "
                    "and its files are removed.",
        parameters=(_JOB_ID,),
        responses={"200": _json(_JOB_REF, "The cancelled job."),
                   "404": _error_codes(404), "409": _error_codes(409), "503": _error_codes(503)}),
    Operation(
        "jobs.delete", "delete", "Delete a job: its record and every file",
        description="Cancels the job first if it is queued or running; afterwards it answers 404.",
        parameters=(_JOB_ID,),
        responses={"204": {"description": "Deleted."}, "404": _error_codes(404), "503": _error_codes(503)}),
    Operation(
        "jobs.get_result", "get", "All stems as JSON: stem name → base64 of a complete file",
        description="Streamed. Every source of the job's model for `all` (`drums`, `bass`, `other`, "
                    "`vocals` for htdemucs); `X` and `no_X` for one stem.",
        parameters=(_JOB_ID,),
        responses={"200": _json({"type": "object", "additionalProperties": {
                       "type": "string", "contentEncoding": "base64"}}, "Every stem, base64-encoded."),
                   "404": _error_codes(404), "409": _error_codes(409), "503": _error_codes(503)}),
    Operation(
        "jobs.get_stems_zip", "get", "All stems in one zip, streamed",
        parameters=(_JOB_ID,),
        responses={"200": {"description": "A zip of the stem files.",
                           "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
                           "headers": {"Content-Disposition": {"schema": {"type": "string"}}}},
                   "404": _error_codes(404), "409": _error_codes(409), "503": _error_codes(503)}),
    Operation(
        "jobs.get_stem", "get", "One stem as a file (HTTP range requests supported)",
        parameters=(_JOB_ID,
                    {"name": "name", "in": "path", "required": True,
                     "schema": {"type": "string", "pattern": "^[a-z_]+$"},
                     "description": "A stem name from the job's `outputs`, e.g. `vocals` or `no_vocals`."},
                    {"name": "extension", "in": "path", "required": True,
                     "schema": {"type": "string", "enum": list(FORMATS)},
                     "description": "The job's output `format`."}),
        responses={"200": _STEM_FILE, "206": {**_STEM_FILE, "description": "The requested byte range."},
                   "302": {"description": "With `DEMIX_S3_PRESIGN=1` (stems in a bucket): a redirect to a "
                                          "presigned URL of the stem, valid for an hour.",
                           "headers": {"Location": {"schema": {"type": "string"}}}},
                   "304": {"description": "Not modified (conditional request)."},
                   "404": _error_codes(404), "409": _error_codes(409),
                   "416": {"description": "The requested range is not satisfiable."},
                   "503": _error_codes(503)}),
    Operation(
        "models.list_models", "get", "The models this service serves",
        description="Each served model (the default first, the one `POST /v1/jobs` uses without "
                    "`model`): its architecture, the `stems` values it offers, its sample rate, where "
                    "its weights came from, their licence note, its queue, and how many warm worker "
                    "processes serve it now.",
        tags=("models",),
        responses={"200": _json({"type": "object", "required": ["models"], "properties": {
            "models": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}}}}, "The catalogue."),
            "503": _error_codes(503)}),
    Operation(
        "workflows.list_workflows", "get", "The named workflows (presets) a job can choose",
        description="Each preset a job can name in `preset`: the ones the service ships (built from the "
                    "served models) and the operator's (`DEMIX_WORKFLOWS`), its workflow, the models it "
                    "needs and how many warm workers serve each, whether this deployment can run it "
                    "(`enabled`, else `disabled_reason`) and whether it would start now (`available`).",
        tags=("models",),
        responses={"200": _json({"type": "object", "required": ["workflows"], "properties": {
            "workflows": {"type": "array", "items": {
                "type": "object",
                "required": ["name", "description", "origin", "workflow", "models", "enabled",
                             "disabled_reason", "available"],
                "properties": {
                    "name": {"type": "string"}, "description": {"type": "string"},
                    "origin": {"type": "string", "description": "`shipped`, or the presets file it is from."},
                    "workflow": {"type": ["object", "null"], "description": "The workflow JSON (null: a "
                                 "shipped preset the served models cannot make)."},
                    "models": {"type": "array", "items": {
                        "type": "object", "required": ["name", "served", "workers"],
                        "properties": {"name": {"type": "string"}, "served": {"type": "boolean"},
                                       "workers": {"type": "integer", "minimum": 0}}}},
                    "enabled": {"type": "boolean"}, "disabled_reason": {"type": ["string", "null"]},
                    "available": {"type": "boolean"}}}}}}, "The presets."),
            "503": _error_codes(503)}),
    Operation(
        "health.healthz", "get", "Is the API up, can it reach Redis, how long is the queue",
        tags=("service",),
        responses={
            "200": _json({"type": "object", "required": ["status", "redis"], "properties": {
                "status": {"const": "ok"}, "redis": {"const": "ok"},
                "queue_length": {"type": "integer", "description": "Jobs waiting, in every model's queue."},
                "model": {"type": "string", "description": "The default model."},
                "models": {"type": "array", "items": {"type": "string"}, "description": "The served models."}}},
                "Healthy."),
            "503": _json({"type": "object", "required": ["status", "redis"], "properties": {
                "status": {"const": "degraded"}, "redis": {"type": "string"}}}, "Redis is unreachable.")}),
    Operation(
        "web.index", "get", "The web page: upload, follow the job, play and download its stems",
        tags=("service",),
        responses={"200": {"description": "An HTML page.", "content": {"text/html": {"schema": {"type": "string"}}}}}),
    Operation(
        "metrics.metrics", "get", "The service's metrics (Prometheus text format)", tags=("service",),
        responses={"200": {"description": "Jobs by outcome, queue length, running jobs, job duration "
                                          "and audio seconds, upload bytes, disk free.",
                           "content": {"text/plain": {"schema": {"type": "string"}}}}}),
    Operation(
        "docs.openapi_json", "get", "This description (OpenAPI 3.1)", tags=("service",),
        responses={"200": _json({"type": "object"}, "The OpenAPI document.")}),
    Operation(
        "docs.docs_page", "get", "This description, rendered (Swagger UI, served locally)", tags=("service",),
        responses={"200": {"description": "An HTML page.", "content": {"text/html": {"schema": {"type": "string"}}}}}),
    Operation(
        "docs.docs_asset", "get", "The Swagger UI files `/docs` loads", tags=("service",),
        parameters=({"name": "filename", "in": "path", "required": True,
                     "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$"}},),
        responses={"200": {"description": "A static file.", "content": {"*/*": {"schema": {}}}},
                   "404": _error_codes(404)}),
)
"""Every route of the app. A new endpoint: add its `Operation` here (the suite fails until then)."""

UNDESCRIBED_ENDPOINTS = {"static": "Flask's static files (the web page's scripts and styles), not part of the API."}
"""Routes deliberately left out of the description, each with the reason."""


# -- the document ----------------------------------------------------------------------------

_CONVERTER = re.compile(r"<(?:[a-z_]+(?:\([^)]*\))?:)?([a-z_]+)>")


def openapi_path(rule: str) -> str:
    """A Flask rule as an OpenAPI path: `/v1/jobs/<job_id>` -> `/v1/jobs/{job_id}`."""
    return _CONVERTER.sub(r"{\1}", rule)


def build_spec(url_map: tp.Any, settings: Settings, keys_required: bool) -> dict:
    """The OpenAPI document for this app: its routes (`url_map`), and the API-key parts
    (401, 429, the bearer scheme) only when keys are configured."""
    rules = {rule.endpoint: rule.rule for rule in url_map.iter_rules()}
    paths: dict[str, dict] = {}
    for operation in OPERATIONS:
        path = openapi_path(rules[operation.endpoint])
        responses = dict(operation.responses)
        protected = (path + "/").startswith(PROTECTED_PREFIX)
        if not keys_required or settings.max_active_jobs_per_key <= 0:
            responses.pop("429", None)
        if protected and keys_required:
            responses["401"] = _error_codes(401)
        entry: dict[str, tp.Any] = {
            "operationId": operation.endpoint.split(".")[-1],
            "summary": operation.summary,
            "tags": list(operation.tags),
            "responses": dict(sorted(responses.items())),
        }
        if operation.description:
            entry["description"] = operation.description
        if operation.parameters:
            entry["parameters"] = list(operation.parameters)
        if operation.request_body:
            entry["requestBody"] = operation.request_body
        entry["security"] = [{"bearerAuth": []}] if protected and keys_required else []
        paths.setdefault(path, {})[operation.method] = entry

    spec: dict[str, tp.Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "demix",
            "version": API_VERSION,
            "summary": "Music demixing: upload a WAV, get drums, bass, other and vocals stems back.",
            "description": _AUTH_TEXT if keys_required else _OPEN_TEXT,
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "tags": [{"name": "jobs", "description": "Submit, poll, fetch stems."},
                 {"name": "models", "description": "The models a job may choose."},
                 {"name": "service", "description": "The web page, health, metrics and this description "
                                                   "(never need a key)."}],
        "paths": paths,
        "components": {
            "schemas": {"Job": JOB_SCHEMA, "JobRequest": _form_schema(settings), "Error": ERROR_SCHEMA,
                        "Model": {"type": "object", "required": list(MODEL_FIELDS), "properties": MODEL_FIELDS,
                                  "additionalProperties": False}},
            "responses": {
                f"Error{status}": _json(
                    {"allOf": [{"$ref": "#/components/schemas/Error"},
                               {"properties": {"error": {"properties": {"code": {"enum": list(codes)}}}}}]},
                    description, _ERROR_HEADERS.get(status))
                for status, (description, codes) in ERRORS_BY_STATUS.items()},
        },
    }
    if keys_required:
        spec["components"]["securitySchemes"] = {"bearerAuth": {
            "type": "http", "scheme": "bearer", "description": "One of the keys in `DEMIX_API_KEYS`."}}
    return spec


_ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True,
                               "description": '`Bearer realm="demix"` (with `error="invalid_token"` for a wrong key).'}},
    405: {"Allow": {"schema": {"type": "string"}, "description": "The methods the path has."}},
    429: {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}, "required": True,
                          "description": "Seconds until the key's first running job should end."}},
}

_OPEN_TEXT = ("This instance needs no API key (`DEMIX_API_KEYS` is empty): anyone who reaches it "
              "can submit and read every job, as suits a private machine.")
_AUTH_TEXT = ("Every `/v1` request needs `Authorization: Bearer <key>` with one of the keys of "
              "`DEMIX_API_KEYS`; a key sees only its own jobs (another key's job is a 404).")
