"""The workflow JSON's checks: what is accepted, and every refusal naming the bad field's path."""
from __future__ import annotations

import dataclasses
import json

import pytest

from demix.config import Settings
from demix.errors import BadRequest
from demix.workflows.spec import ENSEMBLE_ALGORITHMS, MIX, StemRef, Workflow, parse_workflow

SETTINGS = Settings(models="htdemucs,mel_band_roformer_kim,bs_roformer_viperx,htdemucs_6s", workflow_max_runs=4)

ISSUE_EXAMPLE = {
    "steps": [
        {"name": "voc", "input": "mix", "models": ["mel_band_roformer_kim", "bs_roformer_viperx"],
         "ensemble": "avg_wave", "weights": [1, 1]},
        {"name": "band", "input": "voc/no_vocals", "models": ["htdemucs"]}],
    "outputs": {"vocals": "voc/vocals", "drums": "band/drums", "bass": "band/bass", "other": "band/other"}}


def refusal(workflow, settings: Settings = SETTINGS, reported=None) -> tuple[str, str]:
    with pytest.raises(BadRequest) as caught:
        parse_workflow(workflow if isinstance(workflow, str) else json.dumps(workflow), settings, reported or {})
    assert caught.value.code == "invalid_workflow"
    field = caught.value.details["field"]
    assert caught.value.message.startswith(f"{field}: ")
    return field, caught.value.message


def with_step(index: int, **changes) -> dict:
    workflow = json.loads(json.dumps(ISSUE_EXAMPLE))
    workflow["steps"][index].update(changes)
    return workflow


def test_the_issue_example_is_accepted_with_its_sources_and_stems():
    workflow = parse_workflow(json.dumps(ISSUE_EXAMPLE), SETTINGS)
    voc, band = workflow.steps
    assert (voc.sources, voc.stems, voc.ensemble, voc.weights) == (("vocals",), ("vocals", "no_vocals"),
                                                                    "avg_wave", (1.0, 1.0))
    assert band.input == StemRef("voc", "no_vocals") and band.ensemble is None
    assert band.stems == ("drums", "bass", "other", "vocals", "no_drums", "no_bass", "no_other", "no_vocals")
    assert workflow.models == ("mel_band_roformer_kim", "bs_roformer_viperx", "htdemucs") and workflow.runs == 3
    assert workflow.needed_stems("voc") == ("vocals", "no_vocals")
    assert workflow.needed_stems("band") == ("drums", "bass", "other")
    assert Workflow.from_dict(json.loads(json.dumps(workflow.to_dict()))) == workflow  # as stored in the record


def test_a_decoded_object_is_accepted_too_and_an_ensemble_defaults_to_avg_wave():
    workflow = parse_workflow({"steps": [{"name": "v", "models": ["mel_band_roformer_kim", "bs_roformer_viperx"]}]},
                              SETTINGS)
    assert workflow.steps[0].input.is_mix and workflow.steps[0].ensemble == "avg_wave"
    assert workflow.steps[0].weights is None


def test_without_outputs_the_job_returns_the_last_steps_stems_as_a_plain_job_would():
    band_only = parse_workflow({"steps": [{"name": "band", "input": MIX, "models": ["htdemucs"]}]}, SETTINGS)
    assert {name: str(ref) for name, ref in band_only.outputs.items()} == {
        "drums": "band/drums", "bass": "band/bass", "other": "band/other", "vocals": "band/vocals"}
    vocals_only = parse_workflow({"steps": [{"name": "v", "models": ["bs_roformer_viperx"]}]}, SETTINGS)
    assert {name: str(ref) for name, ref in vocals_only.outputs.items()} == {"vocals": "v/vocals",
                                                                           "no_vocals": "v/no_vocals"}


def test_steps_may_be_listed_in_any_order_and_run_after_what_they_read():
    workflow = parse_workflow({"steps": [{"name": "band", "input": "voc/no_vocals", "models": ["htdemucs"]},
                                         {"name": "voc", "input": "mix", "models": ["bs_roformer_viperx"]}]},
                              SETTINGS)
    assert [step.name for step in workflow.steps] == ["voc", "band"]


def test_models_of_different_sources_ensemble_the_sources_they_share():
    # A vocals RoFormer with the 4-stem Demucs: their shared source is vocals.
    workflow = parse_workflow({"steps": [{"name": "v", "models": ["htdemucs", "bs_roformer_viperx"]}]}, SETTINGS)
    assert workflow.steps[0].sources == ("vocals",)
    # What a warm worker reports wins over the catalogue (a model's own sources).
    reported = {"htdemucs": {"sources": ["drums", "bass"]}}
    field, message = refusal({"steps": [{"name": "v", "models": ["htdemucs", "bs_roformer_viperx"]}]},
                             reported=reported)
    assert field == "workflow.steps[0].models"
    assert "share none" in message and "htdemucs separates drums, bass" in message \
        and "bs_roformer_viperx separates vocals" in message


@pytest.mark.parametrize("workflow, field, words", [
    ("{not json", "workflow", "not valid JSON"),
    ("[1, 2]", "workflow", "expected a JSON object"),
    ({"steps": []}, "workflow.steps", "non-empty list"),
    ({"steps": [{"name": "a", "models": ["htdemucs"]}], "extra": 1}, "workflow.extra", "unknown key"),
    (with_step(0, colour="red"), "workflow.steps[0].colour", "unknown key"),
    (with_step(1, name="Band!"), "workflow.steps[1].name", "lower-case"),
    (with_step(1, name="mix"), "workflow.steps[1].name", "other than 'mix'"),
    (with_step(1, name="voc"), "workflow.steps[1].name", "named twice"),
    (with_step(1, models=[]), "workflow.steps[1].models", "non-empty list"),
    (with_step(1, models=["htdemucs", "nope"]), "workflow.steps[1].models[1]", "unknown model 'nope'"),
    (with_step(1, models=["htdemucs", "htdemucs"]), "workflow.steps[1].models[1]", "listed twice"),
    (with_step(1, input="vox/no_vocals"), "workflow.steps[1].input", "no step is named 'vox'"),
    (with_step(1, input="voc/drums"), "workflow.steps[1].input", "makes no stem 'drums'; it makes vocals, no_vocals"),
    (with_step(1, input="voc"), "workflow.steps[1].input", "is not \"step/stem\" or \"mix\""),
    (with_step(1, input=3), "workflow.steps[1].input", "expected a string"),
    (with_step(0, ensemble="mean"), "workflow.steps[0].ensemble", "unknown algorithm 'mean'"),
    (with_step(0, weights=[1]), "workflow.steps[0].weights", "2 finite non-negative numbers"),
    (with_step(0, weights=[1, -1]), "workflow.steps[0].weights", "non-negative"),
    (with_step(0, weights=[0, 0]), "workflow.steps[0].weights", "not all zero"),
    (with_step(0, weights=[1, True]), "workflow.steps[0].weights", "numbers"),
    (with_step(0, input="band/drums"), "workflow.steps[0].input", "voc -> band -> voc read each other's stems"),
    ({**ISSUE_EXAMPLE, "outputs": {"vocals": "band/guitar"}}, "workflow.outputs.vocals", "makes no stem 'guitar'"),
    ({**ISSUE_EXAMPLE, "outputs": {"vocals": "mix"}}, "workflow.outputs.vocals", "is not \"step/stem\""),
    ({**ISSUE_EXAMPLE, "outputs": {"Vocals!": "voc/vocals"}}, "workflow.outputs.Vocals!", "a stem name"),
    ({**ISSUE_EXAMPLE, "outputs": {}}, "workflow.outputs", "expected an object"),
])
def test_a_bad_workflow_is_refused_naming_the_path_of_the_bad_field(workflow, field, words):
    found_field, message = refusal(workflow)
    assert found_field == field
    assert words in message


def test_a_self_reading_step_is_a_cycle():
    field, message = refusal({"steps": [{"name": "a", "input": "a/vocals", "models": ["htdemucs"]}]})
    assert field == "workflow.steps[0].input" and "a -> a" in message


def test_too_many_model_runs_are_refused_with_the_limit_and_its_setting():
    five = {"steps": [{"name": "a", "models": ["mel_band_roformer_kim", "bs_roformer_viperx"]},
                      {"name": "b", "input": "a/no_vocals", "models": ["htdemucs", "htdemucs_6s"]},
                      {"name": "c", "input": "b/drums", "models": ["htdemucs"]}]}
    field, message = refusal(five)
    assert field == "workflow.steps" and "5 model runs; at most 4 (DEMIX_WORKFLOW_MAX_RUNS)" in message
    assert parse_workflow(five, dataclasses.replace(SETTINGS, workflow_max_runs=5)).runs == 5


def test_an_overlong_workflow_text_is_refused_before_it_is_decoded():
    field, message = refusal(" " * 20_001)
    assert field == "workflow" and "at most 20000" in message


def test_the_algorithms_are_msst_s_eight():
    assert ENSEMBLE_ALGORITHMS == ("avg_wave", "median_wave", "min_wave", "max_wave",
                                   "avg_fft", "median_fft", "min_fft", "max_fft")


def test_a_long_key_is_cut_in_the_path_so_the_reason_stays_readable():
    field, message = refusal({**ISSUE_EXAMPLE, "outputs": {"x" * 5000: "voc/vocals"}})
    assert field == "workflow.outputs." + "x" * 40 + "…" and message.endswith("starting with a letter")
    assert len(message) < 200
