"""Named workflows: the shipped ones built from the served models (or disabled saying why),
the operator's file, and `demix workflows add/list/remove`."""
from __future__ import annotations

import dataclasses
import json

import pytest

from demix.config import Settings
from demix.errors import BadRequest
from demix.workflows.presets import add_preset, all_presets, preset_workflow, remove_preset, shipped_presets

VOCALS_AND_BAND = "htdemucs,mel_band_roformer_kim,bs_roformer_viperx"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(models=VOCALS_AND_BAND, data_dir=tmp_path / "data")


def by_name(presets) -> dict:
    return {preset.name: preset for preset in presets}


def test_the_shipped_presets_are_made_of_the_served_models(settings):
    presets = by_name(shipped_presets(settings))
    assert presets["best_vocals"].disabled is None
    assert presets["best_vocals"].workflow == {
        "steps": [{"name": "vocals", "input": "mix", "models": VOCALS_AND_BAND.split(","), "ensemble": "avg_wave"}],
        "outputs": {"vocals": "vocals/vocals", "instrumental": "vocals/no_vocals"}}
    then_band = presets["vocals_then_band"]
    assert then_band.models == ["mel_band_roformer_kim", "htdemucs"] and then_band.disabled is None
    workflow = preset_workflow("vocals_then_band", settings)
    assert [str(step.input) for step in workflow.steps] == ["mix", "vocals/no_vocals"]
    assert {name: str(ref) for name, ref in workflow.outputs.items()} == {
        "vocals": "vocals/vocals", "drums": "band/drums", "bass": "band/bass", "other": "band/other"}


def test_a_shipped_preset_the_served_models_cannot_make_is_disabled_saying_what_is_missing(settings):
    only_demucs = dataclasses.replace(settings, models="htdemucs")
    presets = by_name(shipped_presets(only_demucs))
    assert presets["best_vocals"].workflow is None
    assert "two or more served models with a vocals source" in presets["best_vocals"].disabled
    assert "serves 1 (htdemucs)" in presets["best_vocals"].disabled
    assert "a vocals model (e.g. `demix models pull mel_band_roformer_kim`)" in presets["vocals_then_band"].disabled
    with pytest.raises(BadRequest) as refused:
        preset_workflow("vocals_then_band", only_demucs)
    assert refused.value.code == "preset_disabled" and refused.value.details == {"field": "preset"}


def test_an_unknown_preset_is_refused_listing_the_presets(settings):
    with pytest.raises(BadRequest) as refused:
        preset_workflow("nope", settings)
    assert refused.value.code == "unknown_preset"
    assert "the presets are best_vocals, vocals_then_band" in refused.value.message


def test_added_presets_are_checked_kept_in_the_file_and_listed_after_the_shipped_ones(settings):
    karaoke = {"steps": [{"name": "voc", "models": ["bs_roformer_viperx"]}], "outputs": {"karaoke": "voc/no_vocals"}}
    path = add_preset(settings, "karaoke", json.dumps(karaoke), "the backing track")
    assert path == settings.data_dir / "workflows.yaml"
    presets = by_name(all_presets(settings))
    assert list(presets) == ["best_vocals", "vocals_then_band", "karaoke"]
    assert (presets["karaoke"].description, presets["karaoke"].origin, presets["karaoke"].workflow) == \
        ("the backing track", str(path), karaoke)
    assert list(preset_workflow("karaoke", settings).outputs) == ["karaoke"]
    # YAML works too, and a file preset replaces a shipped one of its name.
    add_preset(settings, "best_vocals", "steps:\n  - {name: v, models: [htdemucs]}\n")
    assert by_name(all_presets(settings))["best_vocals"].origin == str(path)
    assert remove_preset(settings, "karaoke") and not remove_preset(settings, "karaoke")
    assert "karaoke" not in by_name(all_presets(settings))


def test_a_preset_that_would_not_run_is_refused_when_added_and_disabled_when_its_model_goes(settings):
    with pytest.raises(BadRequest) as refused:
        add_preset(settings, "bad", '{"steps": [{"name": "v", "models": ["nope"]}]}')
    assert refused.value.details["field"] == "workflow.steps[0].models[0]"
    with pytest.raises(BadRequest):
        add_preset(settings, "9lives", '{"steps": [{"name": "v", "models": ["htdemucs"]}]}')
    add_preset(settings, "viperx", '{"steps": [{"name": "v", "models": ["bs_roformer_viperx"]}]}')
    without = dataclasses.replace(settings, models="htdemucs")
    viperx = by_name(all_presets(without))["viperx"]
    assert viperx.disabled.startswith("workflow.steps[0].models[0]: unknown model 'bs_roformer_viperx'")
