"""Fixtures: a real redis-server on a free port, a tiny real HT-Demucs in a
demucs-format model folder, a real Celery worker, and the real app over real HTTP.

The environment is set here, at import, before any test module imports the service:
the service reads its settings (and Celery its broker) from `DEMIX_*` variables once.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import typing as tp
from pathlib import Path

import pytest

from cli.redis_server import RedisServer, free_port
from tests.tiny_models import TINY_MODEL, TINY_SOURCES, make_tiny_htdemucs, write_tiny_repo  # noqa: F401

SESSION_DIR = Path(tempfile.mkdtemp(prefix="demix-tests-"))
REDIS_PORT = free_port()

os.environ.update({
    "DEMIX_REDIS_URL": f"redis://127.0.0.1:{REDIS_PORT}/0",
    "DEMIX_DATA_DIR": str(SESSION_DIR / "data"),
    "DEMIX_MODEL": TINY_MODEL,
    "DEMIX_MODEL_REPO": str(SESSION_DIR / "models"),
    "DEMIX_DEVICE": "cpu",
    "DEMIX_TORCH_THREADS": "2",
    # Short leases, so tests see lost workers recovered in seconds (the sweep runs every
    # third of a lease); long enough that a loaded machine does not lose live ones.
    "DEMIX_LEASE_S": "6",
})
for _name in list(os.environ):  # a developer's own DEMIX_* settings must not leak in
    if _name.startswith("DEMIX_") and _name not in {
            "DEMIX_REDIS_URL", "DEMIX_DATA_DIR", "DEMIX_MODEL", "DEMIX_MODEL_REPO",
            "DEMIX_DEVICE", "DEMIX_TORCH_THREADS", "DEMIX_LEASE_S", "DEMIX_TEST_CACHE"}:
        del os.environ[_name]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`requires_cuda` tests run where torch sees a GPU, and are skipped (saying so) elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)


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
    from shared.config import get_settings
    return get_settings()


@pytest.fixture(scope="session")
def tiny_model_repo(settings) -> Path:
    return write_tiny_repo(Path(settings.model_repo))


@pytest.fixture(scope="session")
def celery_worker(redis_server, tiny_model_repo):
    """A real Celery worker (solo pool, in a thread) consuming the service's queue."""
    from celery.contrib.testing.worker import start_worker

    from shared.celery_app import celery_app
    import worker.tasks  # noqa: F401  registers the task

    from worker.runner import worker_context

    with start_worker(celery_app, pool="solo", concurrency=1, perform_ping_check=False,
                      loglevel="WARNING", shutdown_timeout=60) as running_worker:
        yield running_worker
    if worker_context.cache_info().currsize:
        worker_context().jobs.redis.close()
    celery_app.pool.force_close_all()


class LiveServer:
    """The app served over real HTTP by werkzeug in a background thread."""

    def __init__(self, app):
        from werkzeug.serving import make_server

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.shutdown()
        self.thread.join(10)
        self.server.server_close()
        self.server.app.extensions["demix"].jobs.redis.close()
        # Not the Celery app's connection pool: kombu shares it between every app with the
        # same broker URL (the worker's included); the celery_worker fixture closes it.


@pytest.fixture(scope="session")
def live_server(redis_server, celery_worker) -> tp.Iterator[LiveServer]:
    """The API in front of a consuming worker: jobs run."""
    from api import create_app

    with LiveServer(create_app()) as server:
        yield server


UNCONSUMED_QUEUE = "demix-tests-unconsumed"


@pytest.fixture(scope="session")
def idle_server(redis_server, settings) -> tp.Iterator[LiveServer]:
    """The API in front of a queue no worker consumes: jobs stay queued, so tests can
    count exactly what was enqueued."""
    import dataclasses

    from api import create_app

    idle_settings = dataclasses.replace(settings, queue=UNCONSUMED_QUEUE,
                                        data_dir=SESSION_DIR / "idle-data", max_upload_mb=1)
    with LiveServer(create_app({"SETTINGS": idle_settings})) as server:
        server.settings = idle_settings
        yield server


def wait_for_job(base_url: str, job_id: str, timeout: float = 120.0,
                 on_poll: tp.Optional[tp.Callable[[dict], None]] = None) -> dict:
    """Poll a job until it is finished; returns its last JSON."""
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = requests.get(f"{base_url}/v1/jobs/{job_id}", timeout=10).json()
        if on_poll is not None:
            on_poll(job)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish within {timeout}s: {job}")


@pytest.fixture(scope="session")
def s3_server() -> tp.Iterator[tp.Any]:
    """A real S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1, started on first use."""
    from tests.s3_server import S3Server

    server = S3Server(SESSION_DIR / "s3").start()
    try:
        yield server
    finally:
        server.stop()


S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "demix-tests", "AWS_SECRET_ACCESS_KEY": "demix-tests-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}
"""Dummy credentials: the test server accepts any (boto3 still needs some to sign)."""


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
