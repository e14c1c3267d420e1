"""The HTTP API: accepts uploads, enqueues jobs, reports them. Never imports torch."""
from __future__ import annotations

import typing as tp

import redis
from flask import Flask

from shared.celery_app import celery_app
from shared.config import Settings, get_settings
from shared.jobs import JobStore
from shared.storage import JobStorage

from .uploads import UploadRequest, discard_unclaimed_uploads

FORM_OVERHEAD_BYTES = 1024 * 1024
"""Slack over the upload limit for the multipart framing and the other form fields."""


def create_app(test_config: tp.Optional[tp.Mapping[str, tp.Any]] = None) -> Flask:
    """Application factory. `test_config` may hold a `SETTINGS` object replacing the
    environment's, and any Flask config keys."""
    app = Flask(__name__)
    app.request_class = UploadRequest
    app.json.sort_keys = False  # keep job fields in their documented order
    settings: Settings = (test_config or {}).get("SETTINGS") or get_settings()
    app.config.from_mapping(
        SETTINGS=settings,
        # Bodies far over the limit are refused from their Content-Length, before reading;
        # the exact per-file limit is enforced while the file part streams to disk.
        MAX_CONTENT_LENGTH=settings.max_upload_bytes + FORM_OVERHEAD_BYTES,
    )
    if test_config is not None:
        app.config.from_mapping({k: v for k, v in test_config.items() if k != "SETTINGS"})

    app.extensions["demix"] = Services(
        jobs=JobStore(redis.Redis.from_url(settings.effective_redis_url,
                                           socket_connect_timeout=5, socket_timeout=30)),
        storage=JobStorage(settings.data_dir),
        celery=celery_app,
        settings=settings,
    )
    app.teardown_request(discard_unclaimed_uploads)

    from . import errors, health, jobs, metrics
    errors.register(app)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(health.bp)
    app.extensions["demix_metrics"] = metrics.make_registry(app.extensions["demix"])
    app.register_blueprint(metrics.bp)
    return app


class Services(tp.NamedTuple):
    """What the views work with, built once per app."""
    jobs: JobStore
    storage: JobStorage
    celery: tp.Any
    settings: Settings
