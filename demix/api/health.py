"""`/healthz`: is the API up, can it reach Redis, how long are the queues (all models')."""
from __future__ import annotations

from flask import Blueprint, current_app

from demix import redis_keys as keys

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    services = current_app.extensions["demix"]
    client = services.jobs.redis
    try:
        client.ping()
        settings = services.settings
        queued = sum(client.llen(key) for model in settings.served_models
                     for key in keys.queue_keys(settings.queue_for(model)))
    except Exception as exc:  # report, don't raise: health checks want a body either way
        return {"status": "degraded", "redis": f"unreachable: {type(exc).__name__}"}, 503
    return {"status": "ok", "redis": "ok", "queue_length": queued, "model": settings.default_model,
            "models": list(settings.served_models)}
