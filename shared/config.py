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


def _setting(default: tp.Any, doc: str, choices: tp.Sequence[str] = ()) -> tp.Any:
    return dataclasses.field(default=default, metadata={"doc": doc, "choices": tuple(choices)})


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
    max_upload_mb: int = _setting(500, "Largest accepted upload, in MiB; larger ones get 413.")
    max_duration_s: int = _setting(
        3 * 3600, "Longest accepted input, in seconds; longer uploads get 422.")
    model: str = _setting("htdemucs", "Demucs model (or bag of models) name.")
    model_repo: str = _setting(
        "", "Local folder in demucs' repo format (`<sig>-<sha8>.th`, `<name>.yaml`); empty: "
            "fetch the model the way demucs does.")
    device: str = _setting("auto", "Torch device for separation: auto (cuda if present), cpu, cuda, cuda:N.")
    shifts: int = _setting(0, "Random-shift passes averaged per job (0: one deterministic pass).")
    overlap: float = _setting(0.25, "Overlap between model segments, as a fraction of a segment.")
    precision: str = _setting(
        "fp32", "Model arithmetic: fp32 (exact), bf16 (CPU autocast, ~2x faster), fp16 (CUDA only).",
        choices=("fp32", "bf16", "fp16"))
    batch_segments: int = _setting(
        0, "Model segments per forward pass (0: chosen per device, 1 on CPU, more on CUDA).")
    torch_threads: int = _setting(0, "Torch intra-op threads per worker process (0: all cores / concurrency).")
    worker_concurrency: int = _setting(1, "Jobs one worker runs at once (each process loads the model once).")
    api_workers: int = _setting(2, "Gunicorn worker processes serving the API.")
    queue: str = _setting("demix", "Celery queue the separation tasks go to.")
    job_timeout_s: int = _setting(
        6 * 3600, "Longest a job may run before the broker hands it to another worker, in seconds.")
    lease_s: int = _setting(
        30, "A running job's lease, in seconds: renewed every third of it while the job runs; "
            "a job whose lease expires (its worker died) is requeued.")
    split_s: int = _setting(
        600, "Jobs longer than this many seconds are split into parts of about this length, "
             "run by any workers and merged (0: never split; jobs with shifts always run whole).")
    max_attempts: int = _setting(
        3, "Runs of a job whose worker was lost before it fails with worker_lost (a worker "
           "stopped gracefully gives the job back without using up an attempt).")

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024

    @property
    def models_dir(self) -> Path:
        """The local model cache (demucs repository format) that `demix models pull` fills."""
        return self.data_dir / "models"

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

    @classmethod
    def describe(cls) -> list[tuple[str, tp.Any, str]]:
        """(environment variable, default, doc) for every setting, for help texts and docs."""
        return [(ENV_PREFIX + f.name.upper(), f.default, f.metadata["doc"])
                for f in dataclasses.fields(cls)]


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _coerce(field: dataclasses.Field, raw: tp.Any, name: str) -> tp.Any:
    kind = type(field.default)
    choices = field.metadata["choices"]
    if choices and raw not in choices:
        raise ValueError(f"{name}={raw!r} is not one of {', '.join(choices)}")
    if isinstance(raw, kind):
        return raw
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
