"""Workflows over HTTP, on the idle server (one served model, no worker: what is queued stays
queued): `GET /v1/workflows`, choosing a preset, and every refusal before anything is kept."""
from __future__ import annotations

import json

import pytest
import requests

from testkit.synthetic_audio import wav_bytes
from testkit.tiny_models import TINY_MODEL
from tests.support.http_api import assert_error

BAND = {"steps": [{"name": "band", "models": [TINY_MODEL]}], "outputs": {"drums": "band/drums", "rest": "band/no_drums"}}


def post(server, tmp_path, **fields) -> requests.Response:
    return requests.post(f"{server.url}/v1/jobs", files={"file": ("a.wav", wav_bytes(tmp_path))},
                         data=fields, timeout=30)


@pytest.fixture
def band_preset(idle_server):
    """A preset `band` in the idle server's presets file, for the length of a test."""
    from demix.workflows.presets import add_preset, remove_preset

    add_preset(idle_server.settings, "band", json.dumps(BAND), "the tiny model's band")
    yield "band"
    remove_preset(idle_server.settings, "band")


def test_the_presets_are_listed_with_their_models_and_whether_they_can_run(idle_server, band_preset):
    listed = {preset["name"]: preset for preset in
              requests.get(f"{idle_server.url}/v1/workflows", timeout=30).json()["workflows"]}
    assert list(listed) == ["best_vocals", "vocals_then_band", "band"]
    best = listed["best_vocals"]
    assert (best["origin"], best["enabled"], best["available"], best["workflow"], best["models"]) == \
        ("shipped", False, False, None, [])
    assert "two or more served models with a vocals source" in best["disabled_reason"]
    band = listed["band"]
    assert (band["enabled"], band["disabled_reason"], band["workflow"], band["description"]) == \
        (True, None, BAND, "the tiny model's band")
    # No worker serves the idle server's model: the preset can run, but would wait.
    assert band["models"] == [{"name": TINY_MODEL, "served": True, "workers": 0}] and band["available"] is False


def test_a_preset_job_is_its_workflow_started(idle_server, band_preset, tmp_path):
    response = post(idle_server, tmp_path, preset=band_preset, format="flac")
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["status"], job["model"], job["output"]["format"]) == ("running", "workflow", "flac")
    (step,) = job["workflow"]["steps"]
    assert (step["name"], step["status"], step["runs"]) == ("band", "queued", [
        {"model": TINY_MODEL, "status": "queued", "progress": 0.0, "cached": False, "attempts": 0}])
    assert job["workflow"]["outputs"] == BAND["outputs"]
    requests.delete(f"{idle_server.url}/v1/jobs/{job['id']}", timeout=30)


@pytest.mark.parametrize("fields, code, field, words", [
    ({"workflow": "{"}, "invalid_workflow", "workflow", "not valid JSON"),
    ({"workflow": json.dumps({"steps": [{"name": "a", "models": ["nope"]}]})}, "invalid_workflow",
     "workflow.steps[0].models[0]", "unknown model 'nope'"),
    ({"workflow": json.dumps({**BAND, "outputs": {"x": "band/guitar"}})}, "invalid_workflow",
     "workflow.outputs.x", "makes no stem 'guitar'"),
    ({"workflow": json.dumps(BAND), "model": TINY_MODEL}, "invalid_workflow", "model", "leave 'model' out"),
    ({"workflow": json.dumps(BAND), "samplerate": "22050"}, "invalid_output", "samplerate", "input's rate"),
    ({"preset": "nope"}, "unknown_preset", "preset", "the presets are best_vocals, vocals_then_band"),
    ({"preset": "best_vocals"}, "preset_disabled", "preset", "two or more served models"),
    ({"preset": "best_vocals", "workflow": json.dumps(BAND)}, "invalid_workflow", "workflow", "leave 'workflow' out"),
])
def test_a_refused_workflow_keeps_and_queues_nothing(idle_server, snapshot, tmp_path, fields, code, field, words):
    response = post(idle_server, tmp_path, **fields)
    assert_error(response, 400, code, words)
    assert response.json()["error"]["field"] == field
    assert snapshot()


def test_too_many_runs_are_refused_naming_the_setting(idle_server, snapshot, tmp_path):
    many = {"steps": [{"name": f"s{index}", "input": "mix" if index == 0 else f"s{index - 1}/drums",
                       "models": [TINY_MODEL]} for index in range(idle_server.settings.workflow_max_runs + 1)]}
    assert_error(post(idle_server, tmp_path, workflow=json.dumps(many)), 400, "invalid_workflow",
                 "DEMIX_WORKFLOW_MAX_RUNS")
    assert snapshot()
