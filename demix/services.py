"""The service's connections, built in one place for every process that needs them: the
API, the gRPC server, each worker's job runs and its maintenance loop."""
from __future__ import annotations

import dataclasses
import functools
import typing as tp

import redis

from demix.api_keys import ApiKeys, load_api_keys
from demix.celery_app import make_celery
from demix.config import Settings
from demix.jobs.records import JobStore
from demix.jobs.limits import ActiveJobLimit
from demix.storage.local import JobStorage, Storage
from demix.jobs.webhooks import WebhookQueue
from demix.workflows.runs import on_child_finished

REDIS_CONNECT_TIMEOUT_S = 5
REDIS_SOCKET_TIMEOUT_S = 30
REDIS_HEALTH_CHECK_S = 30
"""A connection idle this long is checked before use (a restarted Redis is noticed at once)."""


def redis_client(settings: Settings, connect_timeout_s: float = REDIS_CONNECT_TIMEOUT_S,
                 socket_timeout_s: float = REDIS_SOCKET_TIMEOUT_S) -> redis.Redis:
    """A client of the service's Redis (`DEMIX_REDIS_URL`, or the embedded one)."""
    return redis.Redis.from_url(settings.effective_redis_url, socket_connect_timeout=connect_timeout_s,
                                socket_timeout=socket_timeout_s, health_check_interval=REDIS_HEALTH_CHECK_S)


@dataclasses.dataclass
class Services:
    """What the doors (HTTP, gRPC) and the workers work with, built once per process."""
    settings: Settings
    jobs: JobStore
    storage: Storage
    celery: tp.Any
    limits: ActiveJobLimit

    @functools.cached_property
    def api_keys(self) -> ApiKeys:
        """The configured keys, read on first use: only the doors check keys, so a worker
        never needs the keys file mounted."""
        return load_api_keys(self.settings.api_keys)


def build_services(settings: Settings, celery: tp.Any = None) -> Services:
    """Connect to the settings' Redis and storage.

    Every job store built here queues a finished job's webhook, whoever finishes it: a
    worker, a cancel at either door, or the maintenance sweep failing a lost job; and moves
    a workflow on when one of its runs finishes.

    Args:
        celery: the Celery app to enqueue with; by default a new one from the same settings,
            so the broker and the job store can never be different Redis servers.
    """
    client = redis_client(settings)
    services = Services(
        settings=settings,
        jobs=JobStore(client, on_finished=[WebhookQueue(client, settings).on_job_finished]),
        storage=make_storage(settings),
        celery=celery if celery is not None else make_celery(settings),
        limits=ActiveJobLimit(client, settings.max_active_jobs_per_key),
    )
    # A finished workflow run moves its workflow on, whoever finished it (`demix.workflows.runs`).
    services.jobs.on_finished.append(lambda job: on_child_finished(job, services))
    return services


def make_storage(settings: tp.Any) -> Storage:
    """The storage the settings name: `DEMIX_STORAGE=s3://bucket/prefix` for a bucket, else
    the local folder `DEMIX_DATA_DIR`."""
    location = getattr(settings, "storage", "") or ""
    if location.startswith("s3://"):
        from demix.storage.s3 import ObjectStorage  # boto3 is needed only then
        return ObjectStorage.from_settings(settings)
    return JobStorage(settings.data_dir)
