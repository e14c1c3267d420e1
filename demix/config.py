"""Service settings, read once from `DEMIX_*` environment variables.

Every setting has a default and a one-line doc; `demix config` prints them all.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import typing as tp
from pathlib import Path

import platformdirs

ENV_PREFIX = "DEMIX_"


def _setting(default: tp.Any, doc: str, choices: tp.Sequence[str] = (), secret: bool = False) -> tp.Any:
    # A secret setting is left out of the settings' repr and masked by `shown_value`.
    return dataclasses.field(default=default, repr=not secret,
                             metadata={"doc": doc, "choices": tuple(choices), "secret": secret})


@dataclasses.dataclass(frozen=True)
class Settings:
    """All knobs of the service. Field `foo_bar` is read from `DEMIX_FOO_BAR`."""

    host: str = _setting("127.0.0.1", "Address the HTTP API binds to.")
    port: int = _setting(8000, "Port the HTTP API listens on.")
    redis_url: str = _setting(
        "", "Redis URL for the broker and job records; empty: `demix up` starts a private "
            "redis-server, `demix api`/`demix worker` use redis://127.0.0.1:6379/0.")
    data_dir: Path = _setting(
        Path(platformdirs.user_data_dir("demix")),
        "Folder holding uploads and stems (one sub-folder per job) and the private Redis data.")
    storage: str = _setting(
        "", "Where job inputs, split files and stems live: empty for DEMIX_DATA_DIR, or "
            "s3://BUCKET/PREFIX for an S3-compatible bucket (then each machine keeps only a local "
            "scratch folder under DEMIX_DATA_DIR; credentials from the standard AWS variables).")
    s3_endpoint_url: str = _setting(
        "", "Endpoint of the S3-compatible server (e.g. http://minio:9000); empty: AWS S3.")
    s3_presign: int = _setting(
        0, "1: stem links redirect to presigned bucket URLs (valid for an hour) instead of "
           "streaming through the API.")
    max_upload_mb: int = _setting(500, "Largest accepted upload, in MiB; larger ones get 413.")
    max_duration_s: int = _setting(
        3 * 3600, "Longest accepted input, in seconds; longer uploads get 422.")
    model: str = _setting("htdemucs", "Demucs model (or bag of models) name; the one model served when "
                                      "DEMIX_MODELS is empty.")
    models: str = _setting(
        "", "Models this deployment serves, comma-separated (`GET /v1/models`); the first is the "
            "default of `POST /v1/jobs`. Empty: DEMIX_MODEL alone.")
    worker_models: str = _setting(
        "", "Models a worker serves (`demix worker --models`), comma-separated: it loads and warms "
            "each and consumes only their queues. Empty: all of DEMIX_MODELS.")
    model_repo: str = _setting(
        "", "Local folder in demucs' repo format (`<sig>-<sha8>.th`, `<name>.yaml`); empty: "
            "fetch the model the way demucs does.")
    device: str = _setting("auto", "Torch device for separation: auto (cuda if present), cpu, cuda, cuda:N.")
    shifts: int = _setting(0, "Random-shift passes averaged per job (0: one deterministic pass).")
    overlap: float = _setting(0.25, "Overlap between model segments, as a fraction of a segment.")
    precision: str = _setting(
        "fp32", "Model arithmetic: fp32 (exact); bf16, the fast mode (a CPU with AVX-512 BF16 or AMX, "
                "else it warns and runs fp32; CUDA autocast); fp16 (CUDA autocast only).",
        choices=("fp32", "bf16", "fp16"))
    batch_segments: int = _setting(
        0, "Model segments per forward pass (0: chosen per device, 1 on CPU, more on CUDA).")
    torch_threads: int = _setting(0, "Torch intra-op threads per worker process (0: all cores / concurrency).")
    worker_concurrency: int = _setting(1, "Jobs one worker runs at once (each process loads the model once).")
    api_threads: int = _setting(
        16, "Threads running API requests (`demix api`); each gets a request only once it has been "
            "received whole, so slow clients hold none.")
    api_max_connections: int = _setting(
        1000, "Open connections the API keeps at most; a new one over it is answered 503 with "
              "Retry-After and closed.")
    api_header_timeout_s: float = _setting(
        20.0, "Longest a client may take to send a request's headers, in seconds (then 408 and close).")
    api_idle_timeout_s: float = _setting(
        60.0, "Longest a connection may go without a byte either way, in seconds: an idle keep-alive "
              "connection, a stalled upload (408) or a response the client stops reading is closed.")
    api_min_upload_kbps: float = _setting(
        16.0, "Slowest average upload rate, in KiB/s, once the body has had DEMIX_API_IDLE_TIMEOUT_S: "
              "each KiB received extends its deadline by 1/this seconds (slower uploads get 408).")
    flower_port: int = _setting(
        5555, "Port `demix up` serves Flower (Celery monitoring) on, at DEMIX_HOST; 0: no Flower.")
    flower_auth: str = _setting(
        "", "Flower's login, `user:password` (several comma-separated): Flower asks for it (HTTP basic "
            "auth) on every page and API call. Empty: no login; then, when DEMIX_API_KEYS is set, Flower "
            "listens on 127.0.0.1 only, whatever DEMIX_HOST says.", secret=True)
    queue: str = _setting(
        "demix", "Celery queue of the default model's jobs; each other model M of DEMIX_MODELS has "
                 "the queue `<DEMIX_QUEUE>.M`.")
    job_timeout_s: int = _setting(
        6 * 3600, "Longest a job may run before the broker hands it to another worker, in seconds.")
    retention_s: int = _setting(
        24 * 3600, "Seconds a finished job (record and files) is kept after it finished; 0: forever.")
    cache_mb: int = _setting(
        2048, "Size of the result cache, in MiB: the stems a model computed for an input, reused by later "
              "jobs with the same audio, model and engine options (least recently used entries go first); "
              "0: no cache.")
    sweep_interval_s: int = _setting(
        60, "Seconds between two maintenance sweeps (expired jobs, orphaned files) in each worker.")
    min_free_mb: int = _setting(
        1024, "Free space (MiB) the data dir must keep; uploads get 507 below it, and with s3 storage "
              "a worker fetches a job's input into its scratch folder only when it fits above it, else "
              "the job fails with disk_full (0: no check).")
    lease_s: int = _setting(
        30, "A running job's lease, in seconds: renewed every third of it while the job runs; "
            "a job whose lease expires (its worker died) is requeued.")
    soft_shutdown_s: float = _setting(
        10.0, "A cold-shutting-down worker (SIGQUIT, a second Ctrl-C) waits this many seconds for its "
              "runs to hand their jobs back themselves, then cancels the rest and gives their jobs back "
              "(keep it below a container's stop grace period).")
    warm_timeout_s: float = _setting(
        900.0, "Longest a new worker pool process may take to load and warm its models, in seconds "
               "(a download of missing weights included); one still not warm then is killed, with its "
               "Python stack in the log, and replaced.")
    warm_shutdown_s: float = _setting(
        60.0, "Longest a worker's warm shutdown (SIGTERM, Ctrl-C) may take, in seconds: its runs hand "
              "their jobs back at their next segment; pool processes still there after this are "
              "stopped as in a cold shutdown, then killed.")
    split_s: int = _setting(
        600, "Jobs longer than this many seconds are split into parts of about this length, "
             "run by any workers and merged (0: never split; jobs with shifts always run whole).")
    lost_message_s: int = _setting(
        120, "A job queued this many seconds whose broker message is gone (a Redis crash lost it, "
             "a flushed or replaced Redis) is sent again within this time; 0: never look.")
    workflows: str = _setting(
        "", "YAML file of named workflows (presets) that jobs choose with `preset=NAME` (`demix workflows "
            "add NAME FILE` writes it); empty: workflows.yaml in DEMIX_DATA_DIR.")
    workflow_max_runs: int = _setting(
        8, "Most model runs (the models of all its steps) one workflow job may ask for; more get 400.")
    max_attempts: int = _setting(
        3, "Runs of a job whose worker was lost before it fails with worker_lost (a worker "
           "stopped gracefully gives the job back without using up an attempt).")
    api_keys: str = _setting(
        "", "API keys, comma-separated, or the path (starting with /, ./, ../ or ~) of a file with one "
            "key per line; when set, every /v1 request needs `Authorization: Bearer <key>` and a key "
            "sees only its own jobs. Empty: the API is open (for a private machine).", secret=True)
    max_active_jobs_per_key: int = _setting(
        0, "Queued plus running jobs one API key may have at once; more get 429 (0: unlimited).")
    # Webhooks (`callback_url`) and the gRPC interface.
    public_url: str = _setting(
        "", "Base URL clients reach the API at, for the links in webhook bodies; empty: "
            "http://DEMIX_HOST:DEMIX_PORT.")
    webhook_secret: str = _setting(
        "", "Key signing webhook bodies (HMAC-SHA256 in X-Demix-Signature); empty: unsigned.")
    webhook_attempts: int = _setting(5, "Most attempts to deliver one webhook before giving up.")
    webhook_backoff_s: float = _setting(
        5.0, "Wait before a webhook's first retry, in seconds; doubled for each later one (at most 1 h).")
    webhook_timeout_s: float = _setting(
        10.0, "Longest a webhook receiver may take to answer, in seconds, before the attempt fails.")
    allow_private_urls: bool = _setting(
        False, "1: `url` inputs and webhook `callback_url`s may reach non-public addresses (loopback, "
               "private, link-local, reserved and other special-purpose ranges: a private deployment); "
               "0: they are refused.")
    url_timeout_s: float = _setting(
        30.0, "Longest a `url` input's server may take to accept the connection or send more data, "
              "in seconds, before the fetch fails.")
    url_deadline_s: float = _setting(
        3600.0, "Longest a whole `url` input fetch may take, in seconds, however steadily its server "
                "sends; a fetch still running then fails.")
    url_max_redirects: int = _setting(5, "Most redirects a `url` input's fetch follows (each checked again).")
    grpc_port: int = _setting(
        50051, "Port the gRPC interface (`demix grpc`) listens on, on DEMIX_HOST; 0: `demix up` runs without it.")
    api_key: str = _setting(
        "", "For `demix separate`: the API key it sends as `Authorization: Bearer` (--api-key).",
        secret=True)

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def min_free_bytes(self) -> int:
        return self.min_free_mb * 1024 * 1024

    @property
    def served_models(self) -> tuple[str, ...]:
        """The models this deployment serves, the default first (`DEMIX_MODELS`, else `DEMIX_MODEL`)."""
        return _names(self.models) or (self.model,)

    @property
    def default_model(self) -> str:
        """The model a job gets when it names none."""
        return self.served_models[0]

    @property
    def worker_served_models(self) -> tuple[str, ...]:
        """The models a worker with these settings serves (`DEMIX_WORKER_MODELS`, else all)."""
        return _names(self.worker_models) or self.served_models

    def queue_for(self, model: str) -> str:
        """The Celery queue of `model`'s jobs: `DEMIX_QUEUE` for the default model (so a
        deployment of one model keeps its one queue), `<DEMIX_QUEUE>.<model>` for the others."""
        return self.queue if model == self.default_model else f"{self.queue}.{model}"

    @property
    def workflows_file(self) -> Path:
        """The presets file (`DEMIX_WORKFLOWS`, else workflows.yaml in the data folder)."""
        return Path(self.workflows).expanduser() if self.workflows else self.data_dir / "workflows.yaml"

    @property
    def models_dir(self) -> Path:
        """The local model cache (demucs repository format) that `demix models pull` fills."""
        return self.data_dir / "models"

    @property
    def effective_public_url(self) -> str:
        """The API's base URL as clients see it, without a trailing slash."""
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL

    @classmethod
    def from_env(cls, environ: tp.Mapping[str, str] = os.environ, **overrides: tp.Any) -> "Settings":
        """Build settings from `DEMIX_*` variables in `environ`; `overrides` win over both.

        Raises:
            ValueError: a variable does not parse as its setting's type.
        """
        values: dict[str, tp.Any] = {}
        for field in dataclasses.fields(cls):
            name = ENV_PREFIX + field.name.upper()
            if field.name in overrides:
                values[field.name] = _coerce(field, overrides[field.name], name)
            elif environ.get(name, "") != "":
                values[field.name] = _coerce(field, environ[name], name)
        return cls(**values)

    def shown_value(self, name: str) -> tp.Any:
        """The value of setting `name` as it may be printed: a secret one only as a file path
        or as how many values it holds."""
        field = next(f for f in dataclasses.fields(self) if f.name == name)
        value = getattr(self, name)
        if not field.metadata["secret"] or not value or str(value).startswith(SECRET_FILE_PREFIXES):
            return value
        return f"<{len([part for part in str(value).split(',') if part.strip()])} hidden>"

    @classmethod
    def describe(cls) -> list[tuple[str, tp.Any, str]]:
        """(environment variable, default, doc) for every setting, for help texts and docs."""
        return [(ENV_PREFIX + f.name.upper(), f.default, f.metadata["doc"])
                for f in dataclasses.fields(cls)]


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _names(value: str) -> tuple[str, ...]:
    """A comma-separated list of names, blanks and repeats dropped, order kept."""
    return tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))

SECRET_FILE_PREFIXES = ("/", "./", "../", "~")
"""A secret setting starting with one of these names a file holding the secrets."""


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _coerce(field: dataclasses.Field, raw: tp.Any, name: str) -> tp.Any:
    kind = type(field.default)
    choices = field.metadata["choices"]
    if choices and raw not in choices:
        raise ValueError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    if isinstance(raw, kind):
        return raw
    if kind is bool:
        if str(raw).strip().lower() in _TRUE:
            return True
        if str(raw).strip().lower() in _FALSE:
            return False
        raise ValueError(f"{name}={raw!r} is not a valid switch: use 1 or 0")
    try:
        if issubclass(kind, Path):
            return Path(raw).expanduser()
        return kind(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from None


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment on first use."""
    return Settings.from_env()
