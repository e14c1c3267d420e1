"""`GET /v1/models`: the models this deployment serves, what each is, and whether a
warm worker serves it now (`demix.catalogue`)."""
from __future__ import annotations

from flask import Blueprint, current_app

from demix.catalogue import catalogue
from demix.readiness import ready_workers

bp = Blueprint("models", __name__, url_prefix="/v1/models")


@bp.get("")
def list_models():
    """Every served model, the default first."""
    services = current_app.extensions["demix"]
    return {"models": catalogue(services.settings, ready_workers(services.jobs.redis))}
