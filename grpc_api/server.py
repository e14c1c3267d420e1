"""The original service's gRPC interface (`demixing.proto`), served over the job queue.

One call stores the upload, checks it with the same intake code as the HTTP API,
queues a job, waits for it and answers with every stem as base64 of a complete WAV
file in a JSON string — what clients of the original service expect. The job is an
ordinary job: `GET /v1/jobs/<id>` shows it too (its id is in the `demix-job-id`
initial metadata).
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
from pathlib import Path

import grpc
import redis

from api import Services
from api.auth import load_api_keys
from api.limits import ActiveJobLimit
from api.submission import submit_job
from api.uploads import ensure_room_for_upload
from shared.celery_app import make_celery
from shared.config import Settings
from shared.errors import (BadRequest, DemixError, IllegalTransition, JobNotFound, ServiceUnavailable,
                           Unauthorized, UploadTooLarge)
from shared.intake import inspect_upload
from shared.job_request import parse_job_request
from shared.jobs import Job, JobStatus, JobStore
from shared.lifecycle import cancel_job
from shared.stems import ALL, STEM_CHOICES, check_stems
from shared.storage import JobStorage
from shared.webhooks import WebhookQueue

from .protos import demixing_pb2, demixing_pb2_grpc

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
ERROR_CODE_METADATA = "demix-error-code"

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
            context.set_trailing_metadata(((ERROR_CODE_METADATA, exc.code),))
            context.abort(code, exc.message)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            log.error("backend unavailable: %s", exc)
            context.set_trailing_metadata(((ERROR_CODE_METADATA, ServiceUnavailable.code),))
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          "the job store or queue (Redis) is unreachable; try again shortly")

    def separate(self, audio: bytes, sounds: str, context: grpc.ServicerContext) -> str:
        """Queue a job for `audio`, wait for it; returns the Answer's JSON string."""
        stems = parse_sounds(sounds)
        job = self.submit(audio, stems, owner=self.caller(context))
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
        api_keys = self.services.api_keys
        if not api_keys:
            return ""
        metadata = dict(context.invocation_metadata())
        scheme, _, token = metadata.get("authorization", "").strip().partition(" ")
        owner = api_keys.owner_of(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if owner is None:
            raise Unauthorized("this service needs an API key: send the metadata "
                               "'authorization: Bearer <key>'")
        return owner

    def submit(self, audio: bytes, stems: str, owner: str = "") -> Job:
        services = self.services
        if len(audio) > services.settings.max_upload_bytes:
            raise _too_large(services.settings)
        services.limits.check(owner)
        ensure_room_for_upload(services, len(audio))
        with services.storage.open_upload() as upload:
            upload.write(audio)
        path = Path(upload.name)
        try:
            info = inspect_upload(path, services.settings)
            # The original interface answers with WAV files (in the input's own sample format).
            job_request = parse_job_request({"stems": stems, "format": "wav"}, info)
            return submit_job(path, info, job_request, services, owner=owner)
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
        paths = {name: storage.stem_path(job.id, name, "wav", job.attempts) for name in job.outputs}
        encoded_bytes = sum(4 * -(-p.stat().st_size // 3) + len(name) + 8 for name, p in paths.items())
        if encoded_bytes > MAX_ANSWER_BYTES:
            raise AnswerTooLarge(
                f"the answer would be {encoded_bytes / 2**20:.0f} MiB, over the 2 GiB a gRPC "
                f"message can hold; fetch the stems over HTTP: GET /v1/jobs/{job.id}/stems.zip")
        return json.dumps({name: base64.b64encode(p.read_bytes()).decode("ascii")
                           for name, p in paths.items()})


def _job_failure_status(error: DemixError) -> tp.Optional[grpc.StatusCode]:
    return grpc.StatusCode.ABORTED if isinstance(error, JobAborted) else None


def _too_large(settings: Settings) -> DemixError:
    return UploadTooLarge(f"audio_file is larger than the {settings.max_upload_mb} MiB limit "
                          "(DEMIX_MAX_UPLOAD_MB)")


def parse_sounds(sounds: str) -> str:
    """The Query's `sounds` as a stems choice (empty: `all`).

    Raises:
        BadRequest: (`invalid_stems`) not one of all, drums, bass, vocals, other.
    """
    try:
        return check_stems(sounds.strip().lower() or ALL)
    except BadRequest as exc:  # said in the proto's own words
        raise BadRequest(f"unknown sounds value {sounds!r}; expected one of {', '.join(STEM_CHOICES)}",
                         code=exc.code) from None


def make_services(settings: Settings) -> Services:
    client = redis.Redis.from_url(settings.effective_redis_url, socket_connect_timeout=5, socket_timeout=30)
    jobs = JobStore(client, on_finished=[WebhookQueue(client, settings).on_job_finished])
    return Services(jobs=jobs, storage=JobStorage(settings.data_dir), celery=make_celery(settings),
                    settings=settings, api_keys=load_api_keys(settings.api_keys),
                    limits=ActiveJobLimit(client, settings.max_active_jobs_per_key))


def make_server(settings: Settings, services: tp.Optional[Services] = None,
                address: tp.Optional[str] = None) -> tuple[grpc.Server, int]:
    """A gRPC server for the `demixing` service, bound but not started; returns it and its port."""
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(GRPC_THREADS, thread_name_prefix="grpc"),
        options=[("grpc.max_receive_message_length",
                  min(settings.max_upload_bytes + MESSAGE_OVERHEAD_BYTES, MAX_ANSWER_BYTES)),
                 ("grpc.max_send_message_length", MAX_ANSWER_BYTES),
                 # Without this, a second server on the same port would silently share it.
                 ("grpc.so_reuseport", 0)])
    demixing_pb2_grpc.add_demixingServicer_to_server(
        DemixingServicer(services or make_services(settings)), server)
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
