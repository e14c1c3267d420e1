"""Fixtures: a real redis-server on a free port, a tiny real HT-Demucs in a
demucs-format model folder, a real Celery worker, and the real app over real HTTP.

The environment is set first (tests.support.environment, at import), before any test
module imports the service: the service reads its settings from `DEMIX_*` variables once.

Tests that start real processes (a redis-server, a Celery worker, `demix up`, any
subprocess) carry the `processes` marker: the ones using the fixtures below get it here;
the ones that start processes themselves declare it. The rest run alone in seconds with
`pytest -m "not processes"`, and fail if they start a process all the same.
"""
from __future__ import annotations

from tests.support.environment import REDIS_PORT, S3_CREDENTIALS, SESSION_DIR, UNCONSUMED_QUEUE  # first: sets DEMIX_*

import shutil
import subprocess
import typing as tp
from pathlib import Path

import pytest

from demix.cli.redis_server import RedisServer
from testkit.tiny_models import write_tiny_repo
from tests.support.live import LiveServer
from tests.support.service_state import files_under, job_count, queue_length

PROCESS_FIXTURES = frozenset({"redis_server", "redis_client", "celery_worker", "live_server",
                              "idle_server", "snapshot", "s3_server"})
"""Fixtures that start real processes (directly or through another): their tests are `processes`."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests using a process fixture are marked `processes`; `requires_cuda` tests run where
    torch sees a GPU, and are skipped (saying so) elsewhere."""
    import torch

    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.processes)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: tp.Optional[pytest.Item]):
    """A test without the `processes` marker that starts a process (in the test or in any
    fixture it sets up) fails saying so: the fast set stays fast."""
    if item.get_closest_marker("processes") is not None:
        yield
        return

    def refuse(popen, args=None, *rest, **kwargs):
        raise AssertionError(f"{item.nodeid} starts a process ({args!r:.200}): "
                             "mark it (or its module) `pytest.mark.processes`")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", refuse)
        yield


@pytest.fixture(scope="session", autouse=True)
def _session_dir() -> tp.Iterator[Path]:
    yield SESSION_DIR
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> tp.Iterator[RedisServer]:
    with RedisServer(SESSION_DIR / "redis", port=REDIS_PORT, persist=False) as server:
        yield server


@pytest.fixture
def redis_client(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def settings():
    from demix.config import get_settings
    return get_settings()


@pytest.fixture(scope="session")
def tiny_model_repo(settings) -> Path:
    return write_tiny_repo(Path(settings.model_repo))


@pytest.fixture(scope="session")
def celery_worker(redis_server, tiny_model_repo):
    """A real Celery worker (solo pool, in a thread) consuming the service's queue."""
    from celery.contrib.testing.worker import start_worker

    from demix.celery_app import celery_app
    import demix.worker.tasks  # noqa: F401  registers the task

    from demix.worker.runner import worker_context

    with start_worker(celery_app, pool="solo", concurrency=1, perform_ping_check=False,
                      loglevel="WARNING", shutdown_timeout=60) as running_worker:
        yield running_worker
    if worker_context.cache_info().currsize:
        worker_context().jobs.redis.close()
    celery_app.pool.force_close_all()


@pytest.fixture(scope="session")
def live_server(redis_server, celery_worker) -> tp.Iterator[LiveServer]:
    """The API in front of a consuming worker: jobs run."""
    from demix.api import create_app

    with LiveServer(create_app()) as server:
        yield server


@pytest.fixture(scope="session")
def idle_server(redis_server, settings) -> tp.Iterator[LiveServer]:
    """The API in front of a queue no worker consumes: jobs stay queued, so tests can
    count exactly what was enqueued."""
    import dataclasses

    from demix.api import create_app

    idle_settings = dataclasses.replace(settings, queue=UNCONSUMED_QUEUE,
                                        data_dir=SESSION_DIR / "idle-data", max_upload_mb=1)
    with LiveServer(create_app({"SETTINGS": idle_settings})) as server:
        server.settings = idle_settings
        yield server


@pytest.fixture
def snapshot(idle_server, redis_client) -> tp.Callable[[], bool]:
    """The idle server's state before the request (queue, job index, data files); call it
    after the request: True if nothing changed."""
    data_dir = idle_server.settings.data_dir
    before = (queue_length(redis_client), job_count(redis_client), files_under(data_dir))

    def unchanged() -> bool:
        after = (queue_length(redis_client), job_count(redis_client), files_under(data_dir))
        return after == before

    return unchanged


@pytest.fixture(scope="session")
def s3_server() -> tp.Iterator[tp.Any]:
    """A real S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1, started on first use."""
    from testkit.s3_server import S3Server

    server = S3Server(SESSION_DIR / "s3").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_settings(s3_server, settings, tmp_path, monkeypatch):
    """Settings whose storage is a fresh bucket on the test S3 server (and whose local
    folder is this test's own); the AWS variables are set for boto3 in this process."""
    import dataclasses
    import uuid

    import boto3

    for name, value in S3_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    bucket = f"demix-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint_url).create_bucket(Bucket=bucket)
    return dataclasses.replace(settings, storage=f"s3://{bucket}/tests", s3_endpoint_url=s3_server.endpoint_url,
                               data_dir=tmp_path / "local")
