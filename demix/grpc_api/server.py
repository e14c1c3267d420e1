"""The original service's gRPC interface (`demixing.proto`), served over the job queue.

One call stores the upload, checks it with the same intake code as the HTTP API,
queues a job, waits for it and answers with every stem as base64 of a complete WAV
file in a JSON string — what clients of the original service expect. The job is an
ordinary job: `GET /v1/jobs/<id>` shows it too (its id is in the `demix-job-id`
initial metadata). The proto has no model field: a call gets the default model, or the
one its `demix-model` metadata entry names. Likewise a workflow job (a chain or ensemble of
models, `demix.workflows`) is asked for in metadata, `demix-workflow` (its JSON) or
`demix-preset` (a preset's name), and answered in the same `Answer`, one entry per output
the workflow names: old clients see the same proto and the same answers.
"""
from __future__ import annotations

import base64
import concurrent.futures
import json
import logging
import signal
import threading
import time
import typing as tp

import grpc
import redis

from demix.config import Settings
from demix.errors import BadRequest, DemixError, IllegalTransition, JobNotFound, ServiceUnavailable, shown
from demix.jobs.records import Job, JobStatus
from demix.jobs.lifecycle import cancel_job
from demix.services import Services, build_services
from demix.stems import ALL
from demix.intake.job_request import PRESET_FIELD, WORKFLOW_FIELD
from demix.intake.submission import submit_upload
from demix.intake.uploads import stage_upload_bytes
from demix.workflows.spec import MAX_WORKFLOW_CHARS

from demix.grpc_api.protos import demixing_pb2, demixing_pb2_grpc

log = logging.getLogger(__name__)

GRPC_THREADS = 16
"""Calls served at once; each waits for its job, so this bounds calls in flight, not CPU."""
POLL_INTERVAL_S = 0.2
"""How often a waiting call reads its job's record."""
MESSAGE_OVERHEAD_BYTES = 1024 * 1024
"""Slack over DEMIX_MAX_UPLOAD_MB for the rest of a Query message."""
MAX_ANSWER_BYTES = 2 ** 31 - 1
"""Protobuf cannot serialise a message of 2 GiB or more: the largest message either way."""
JOB_ID_METADATA = "demix-job-id"
MODEL_METADATA = "demix-model"
"""Call metadata naming the model to separate with (default: the service's default model)."""
WORKFLOW_METADATA = "demix-workflow"
"""Call metadata holding a workflow's JSON (`demix.workflows.spec`): run it instead of one model."""
PRESET_METADATA = "demix-preset"
"""Call metadata naming a preset workflow (`GET /v1/workflows`): run it instead of one model."""
ERROR_CODE_METADATA = "demix-error-code"
ERROR_FIELD_METADATA = "demix-error-field"
"""Trailing metadata naming the refused value, where the error says (HTTP's `field`): `sounds`,
`demix-model`, a path into the workflow such as `workflow.steps[1].input`."""
MAX_FIELD_CHARS = 200
"""Longest `demix-error-field` value: a path can hold the caller's own text (a stem name)."""
MAX_METADATA_BYTES = 4 * MAX_WORKFLOW_CHARS
"""Largest call metadata the server takes (gRPC's default: 8 KiB): room for the longest
workflow the service accepts, so a long one is refused by its checks, saying why, not by the
transport."""
MAX_DETAILS_CHARS = 2000
"""Longest status message a call ends with. It travels in the trailers, which a client refuses
over its metadata limit (8 KiB by default), turning any status into RESOURCE_EXHAUSTED."""

_STATUS_FOR_HTTP = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
"""The service's errors, by their HTTP status, as gRPC status codes (others: INTERNAL)."""


def grpc_status_for(error: DemixError) -> grpc.StatusCode:
    """The gRPC status code of one of the service's errors."""
    return _STATUS_FOR_HTTP.get(error.http_status, grpc.StatusCode.INTERNAL)


class JobAborted(DemixError):
    """The job was cancelled or deleted while the call waited for it."""
    code = "job_aborted"
    http_status = 409


class AnswerTooLarge(DemixError):
    """The stems are too large for one gRPC message."""
    code = "answer_too_large"
    http_status = 413


class DemixingServicer(demixing_pb2_grpc.demixingServicer):
    """`demixing.demixing(Query) -> Answer` over the service's job queue."""

    def __init__(self, services: Services):
        self.services = services

    def demixing(self, request: tp.Any, context: grpc.ServicerContext) -> tp.Any:
        try:
            return demixing_pb2.Answer(demixed_audio=self.separate(request.audio_file, request.sounds,
                                                                   context))
        except DemixError as exc:
            code = _job_failure_status(exc) or grpc_status_for(exc)
            field = exc.details.get("field")
            context.set_trailing_metadata(((ERROR_CODE_METADATA, exc.code),)
                                          + (((ERROR_FIELD_METADATA, field_metadata(field)),) if field else ()))
            context.abort(code, status_details(exc.message))
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.error("backend unavailable: %s", exc)
            context.set_trailing_metadata(((ERROR_CODE_METADATA, ServiceUnavailable.code),))
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          "the job store or queue (Redis) is unreachable; try again shortly")

    def separate(self, audio: bytes, sounds: str, context: grpc.ServicerContext) -> str:
        """Queue a job for `audio`, wait for it; returns the Answer's JSON string."""
        owner = self.caller(context)
        fields = job_fields(sounds, dict(context.invocation_metadata()))
        job = self.submit(audio, fields, owner=owner)
        context.send_initial_metadata(((JOB_ID_METADATA, job.id),))
        job = self.wait(job.id, context)
        if job is None:  # the client went away or its deadline passed: nothing to answer
            return ""
        return self.answer(job)

    def caller(self, context: grpc.ServicerContext) -> str:
        """The owner id of the call's API key (`authorization: Bearer <key>` metadata), as
        over HTTP; "" when the service has no keys.

        Raises:
            Unauthorized: keys are configured and the call has none, or an unknown one.
        """
        metadata = dict(context.invocation_metadata())
        return self.services.api_keys.authenticate(metadata.get("authorization", ""),
                                                   "the metadata 'authorization: Bearer <key>'")

    def submit(self, audio: bytes, fields: tp.Mapping[str, str], owner: str = "") -> Job:
        """Queue `audio` as `owner`'s job with the form `fields` of `job_fields`."""
        services = self.services
        services.limits.check(owner)
        path = stage_upload_bytes(services, audio, field="audio_file")
        try:
            job, _ = submit_upload(path, fields, services, owner=owner)
            return job
        except BadRequest as exc:
            if exc.code == "invalid_stems":  # said in the proto's own words
                raise BadRequest(exc.message.replace("stems value", "sounds value"), code=exc.code) from None
            raise
        finally:
            path.unlink(missing_ok=True)  # already moved into the job's folder when accepted

    def wait(self, job_id: str, context: grpc.ServicerContext) -> tp.Optional[Job]:
        """The finished job, or None (the job cancelled) once the call is no longer active:
        the client cancelled it or its deadline passed."""
        while context.is_active():
            try:
                job = self.services.jobs.get(job_id)
            except JobNotFound:
                raise JobAborted(f"job {job_id} was deleted before it finished") from None
            if job.status.is_finished:
                return job
            time.sleep(POLL_INTERVAL_S)
        # No one is left to answer: the job would only use a worker for nothing.
        try:
            cancel_job(self.services.jobs, self.services.storage, job_id)
            log.info("gRPC call for job %s ended (cancelled or past its deadline); job cancelled", job_id)
        except (IllegalTransition, JobNotFound):
            pass  # it finished (or was deleted) meanwhile
        return None

    def answer(self, job: Job) -> str:
        if job.status is JobStatus.FAILED:
            error = job.error or {"code": "separation_failed", "message": "unknown error"}
            raise DemixError(f"job {job.id} failed: {error['message']}", code=error["code"])
        if job.status is not JobStatus.SUCCEEDED:
            raise JobAborted(f"job {job.id} was {job.status.value} before it finished")
        storage = self.services.storage
        stems = {name: storage.stem(job.id, name, "wav", job.attempts) for name in job.outputs}
        encoded_bytes = sum(4 * -(-stored.size() // 3) + len(name) + 8 for name, stored in stems.items())
        if encoded_bytes > MAX_ANSWER_BYTES:
            raise AnswerTooLarge(
                f"the answer would be {encoded_bytes / 2**20:.0f} MiB, over the 2 GiB a gRPC "
                f"message can hold; fetch the stems over HTTP: GET /v1/jobs/{job.id}/stems.zip")
        answer = {}
        for name, stored in stems.items():
            with stored.open() as file:
                answer[name] = base64.b64encode(file.read()).decode("ascii")
        return json.dumps(answer)


def status_details(message: str) -> str:
    """`message` as a call's status details: cut to `MAX_DETAILS_CHARS`."""
    return message if len(message) <= MAX_DETAILS_CHARS else message[:MAX_DETAILS_CHARS - 1] + "…"


def field_metadata(field: str) -> str:
    """A refused value's path as a metadata value: printable ASCII (the rest escaped as in
    Python), cut to `MAX_FIELD_CHARS`. gRPC fails a call whose metadata holds anything else."""
    text = field if field.isascii() and field.isprintable() else ascii(field)[1:-1]
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS - 3] + "..."


def _job_failure_status(error: DemixError) -> tp.Optional[grpc.StatusCode]:
    return grpc.StatusCode.ABORTED if isinstance(error, JobAborted) else None


def parse_sounds(sounds: str) -> str:
    """The Query's `sounds` as a stems choice (empty: `all`); the job's model checks it."""
    return sounds.strip().lower() or ALL


def job_fields(sounds: str, metadata: tp.Mapping[str, str]) -> dict[str, str]:
    """The job's form fields (`demix.intake.job_request`) from a Query's `sounds` and the
    call's metadata: the model's stems, or the `demix-workflow` or `demix-preset` to run.

    The original interface answers with WAV files (in the input's own sample format).

    Raises:
        BadRequest: (`invalid_workflow`) a workflow or preset with a `sounds` other than
            `all` (a workflow names its own stems), a `demix-model`, or both; the `field`
            detail names the metadata entry or `sounds`.
    """
    fields = {"format": "wav"}
    model = metadata.get(MODEL_METADATA, "")
    workflow, preset = metadata.get(WORKFLOW_METADATA, ""), metadata.get(PRESET_METADATA, "")
    if not workflow.strip() and not preset.strip():
        return {**fields, "model": model, "stems": parse_sounds(sounds)}
    what = "a preset" if preset.strip() else "a workflow"
    if parse_sounds(sounds) != ALL:
        raise _conflict("sounds", f"{what}'s answer holds every stem it names; leave 'sounds' empty or "
                                  f"'all', not {shown(sounds)}")
    if model.strip():
        raise _conflict(MODEL_METADATA, f"{what} names its own models; leave out the {MODEL_METADATA} metadata")
    if workflow.strip() and preset.strip():
        raise _conflict(WORKFLOW_METADATA, f"send {WORKFLOW_METADATA} or {PRESET_METADATA}, not both")
    return {**fields, WORKFLOW_FIELD: workflow, PRESET_FIELD: preset}


def _conflict(field: str, message: str) -> BadRequest:
    return BadRequest(f"{field}: {message}", code="invalid_workflow", details={"field": field})


def _door_services(settings: Settings) -> Services:
    services = build_services(settings)
    services.api_keys  # read now: a bad DEMIX_API_KEYS stops the server at start, not its first call
    return services


def make_server(settings: Settings, services: tp.Optional[Services] = None,
                address: tp.Optional[str] = None) -> tuple[grpc.Server, int]:
    """A gRPC server for the `demixing` service, bound but not started; returns it and its port."""
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(GRPC_THREADS, thread_name_prefix="grpc"),
        options=[("grpc.max_receive_message_length",
                  min(settings.max_upload_bytes + MESSAGE_OVERHEAD_BYTES, MAX_ANSWER_BYTES)),
                 ("grpc.max_send_message_length", MAX_ANSWER_BYTES),
                 ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                 ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
                 # Without this, a second server on the same port would silently share it.
                 ("grpc.so_reuseport", 0)])
    demixing_pb2_grpc.add_demixingServicer_to_server(
        DemixingServicer(services or _door_services(settings)), server)
    address = address or f"{settings.host}:{settings.grpc_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises this when the port cannot be bound
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address} (DEMIX_HOST, DEMIX_GRPC_PORT): is the port in use?")
    return server, port


def serve(settings: Settings) -> int:
    """`demix grpc`: serve until SIGINT/SIGTERM, then let calls in flight finish (up to 10 s)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server, port = make_server(settings)
    except OSError as exc:
        log.error("%s", exc)
        return 1
    server.start()
    log.info("gRPC demixing service listening on %s:%d", settings.host, port)
    stopped = threading.Event()

    def request_stop(_signum: int, _frame: tp.Any) -> None:
        stopped.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    while not stopped.wait(1.0):
        pass
    server.stop(grace=10).wait()
    return 0
