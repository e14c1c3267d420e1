"""`GET /v1/workflows`: the named workflows (presets) a job can choose with `preset=NAME`,
the models each needs, and whether this deployment can run it now (`demix.workflows.presets`)."""
from __future__ import annotations

from flask import Blueprint, current_app

from demix.catalogue import warm_model_notes
from demix.intake.submission import reported_models
from demix.readiness import ready_workers
from demix.workflows.presets import all_presets

bp = Blueprint("workflows", __name__, url_prefix="/v1/workflows")


@bp.get("")
def list_workflows():
    """Every preset: its workflow, its models (each served or not, by how many warm workers),
    `enabled` (the deployment serves its models) and `available` (warm workers serve them now)."""
    services = current_app.extensions["demix"]
    warm = warm_model_notes(ready_workers(services.jobs.redis))
    served = set(services.settings.served_models)
    listed = []
    for preset in all_presets(services.settings, reported_models(services)):
        models = [{"name": name, "served": name in served, "workers": len(warm.get(name, []))}
                  for name in preset.models]
        listed.append({"name": preset.name, "description": preset.description, "origin": preset.origin,
                       "workflow": preset.workflow, "models": models, "enabled": preset.disabled is None,
                       "disabled_reason": preset.disabled,
                       "available": preset.disabled is None and all(model["workers"] for model in models)})
    return {"workflows": listed}
