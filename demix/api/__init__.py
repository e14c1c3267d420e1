"""The HTTP API: accepts uploads, enqueues jobs, reports them. Imports no torch, demix.separation or demix.worker."""
from __future__ import annotations

import typing as tp

from flask import Flask

from demix.celery_app import make_celery
from demix.config import Settings, get_settings
from demix.services import Services, build_services

from demix.api.upload_requests import MAX_FORM_FIELD_BYTES, MAX_FORM_PARTS, UploadRequest, discard_unclaimed_uploads

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
        MAX_FORM_PARTS=MAX_FORM_PARTS,
        MAX_FORM_MEMORY_SIZE=MAX_FORM_FIELD_BYTES,
    )
    if test_config is not None:
        app.config.from_mapping({k: v for k, v in test_config.items() if k != "SETTINGS"})

    # The broker comes from the same settings as the job store, so the two can never be
    # different Redis servers (the pattern of Flask's own Celery example).
    app.extensions["celery"] = make_celery(settings)
    services: Services = build_services(settings, celery=app.extensions["celery"])
    services.api_keys  # read now: a bad DEMIX_API_KEYS stops the API at start, not its first request
    app.extensions["demix"] = services
    app.teardown_request(discard_unclaimed_uploads)

    from demix.api import (auth, docs, error_responses as errors, health, job_views as jobs, metrics_view as metrics,
                           model_views as models, web, workflow_views as workflows)
    errors.register(app)
    auth.register(app)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(models.bp)
    app.register_blueprint(workflows.bp)
    app.register_blueprint(health.bp)
    app.extensions["demix_metrics"] = metrics.make_registry(app.extensions["demix"])
    app.register_blueprint(metrics.bp)
    app.register_blueprint(docs.bp)
    app.register_blueprint(web.bp)
    return app

