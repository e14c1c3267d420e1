"""`GET /v1/workflows`: the named workflows (presets) a job can choose with `preset=NAME`,
the models each needs, and whether this deployment can run it now (`demix.workflows.presets`)."""
from __future__ import annotations

from flask import Blueprint, current_app

from demix.readiness import ready_workers
from demix.workflows.presets import listed_presets

bp = Blueprint("workflows", __name__, url_prefix="/v1/workflows")


@bp.get("")
def list_workflows():
    """Every preset: its workflow, its models (each served or not, by how many warm workers),
    `enabled` (the deployment serves its models) and `available` (warm workers serve them now)."""
    services = current_app.extensions["demix"]
    return {"workflows": listed_presets(services.settings, ready_workers(services.jobs.redis))}
