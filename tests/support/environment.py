"""The test session's environment, set at import, before any test imports the service:
the service reads its settings (and Celery its broker) from `DEMIX_*` variables once.

tests/conftest.py imports this first; test modules import the names they need from it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from demix.cli.redis_server import free_port
from testkit.tiny_models import TINY_MODEL

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
    # Every test server, webhook receiver and `url` input is on 127.0.0.1.
    "DEMIX_ALLOW_PRIVATE_URLS": "1",
    # The result cache off: the same synthetic songs run again and again through the session's
    # one Redis, and a test that cancels, kills or times a run needs the model to run. The
    # cache's own tests turn it on (tests/jobs/test_result_cache.py, tests/worker/test_cached_runs.py).
    "DEMIX_CACHE_MB": "0",
})
for _name in list(os.environ):  # a developer's own DEMIX_* settings must not leak in
    if _name.startswith("DEMIX_") and _name not in {
            "DEMIX_REDIS_URL", "DEMIX_DATA_DIR", "DEMIX_MODEL", "DEMIX_MODEL_REPO",
            "DEMIX_DEVICE", "DEMIX_TORCH_THREADS", "DEMIX_LEASE_S", "DEMIX_TEST_CACHE",
            "DEMIX_ALLOW_PRIVATE_URLS", "DEMIX_CACHE_MB"}:
        del os.environ[_name]


UNCONSUMED_QUEUE = "demix-tests-unconsumed"
"""The queue the `idle_server` fixture's API sends jobs to and no worker consumes."""

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "demix-tests", "AWS_SECRET_ACCESS_KEY": "demix-tests-secret",
                  "AWS_DEFAULT_REGION": "us-east-1"}
"""Dummy credentials for the test S3 server: it accepts any (boto3 still needs some to sign)."""
