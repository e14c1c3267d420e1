"""`/metrics`: the service's metrics in the Prometheus text format.

The numbers live in Redis (`demix.jobs.metrics`), so every API process shows the same ones;
a registry of our own holds only the collector reading them."""
from __future__ import annotations

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from demix.jobs.metrics import ServiceCollector

bp = Blueprint("metrics", __name__)


def make_registry(services) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    settings = services.settings
    queues = {model: settings.queue_for(model) for model in settings.served_models}
    registry.register(ServiceCollector(services.jobs.redis, queues, settings.data_dir))
    return registry


@bp.get("/metrics")
def metrics():
    registry = current_app.extensions["demix_metrics"]
    return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
