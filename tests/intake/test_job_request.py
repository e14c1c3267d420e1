"""The one job-request parser: form fields in, stems choice and resolved output out."""
from __future__ import annotations

import pytest

import dataclasses

from demix.audio.io import AudioInfo
from demix.config import Settings
from demix.errors import BadRequest
from demix.audio.output_formats import default_output
from demix.intake.job_request import FORM_FIELDS, JobRequest, parse_job_request
from demix.audio.output_formats import OutputOptions
from demix.stems import STEM_CHOICES, output_names


def info(subtype: str = "PCM_24", samplerate: int = 48000, channels: int = 1) -> AudioInfo:
    return AudioInfo(samplerate=samplerate, channels=channels, frames=1000, subtype=subtype, container="WAV")


def test_an_empty_form_asks_the_default_model_for_all_stems_in_the_inputs_own_format(settings):
    request = parse_job_request({}, info())
    assert request == JobRequest(stems="all", model=settings.default_model, output=OutputOptions(
        format="wav", sample_format="pcm24", samplerate=48000, channels=1, channel_mode="input",
        bitrate=320, clip="clamp"))
    assert default_output(info()) == request.output


@pytest.mark.parametrize("raw,stems", [("vocals", "vocals"), (" Drums ", "drums"), ("", "all"), ("ALL", "all")])
def test_stems_are_matched_case_insensitively_and_blank_means_all(raw, stems):
    assert parse_job_request({"stems": raw}, info()).stems == stems


def test_an_unknown_stems_value_is_invalid_stems_naming_the_choices():
    with pytest.raises(BadRequest) as caught:
        parse_job_request({"stems": "guitar"}, info())
    assert caught.value.code == "invalid_stems" and caught.value.http_status == 400
    assert "'guitar'" in caught.value.message and all(c in caught.value.message for c in STEM_CHOICES)


def test_output_names_refuse_what_the_parser_refuses_with_the_same_error():
    assert output_names("bass") == ["bass", "no_bass"]
    with pytest.raises(BadRequest, match="unknown stems value 'no_bass'") as caught:
        output_names("no_bass")
    assert caught.value.code == "invalid_stems"


def test_the_output_error_of_the_parser_is_invalid_output():
    with pytest.raises(BadRequest, match="FLAC stores integer samples only") as caught:
        parse_job_request({"stems": "vocals", "format": "flac", "sample_format": "float32"}, info())
    assert caught.value.code == "invalid_output"


@pytest.mark.parametrize("field", [f for f in FORM_FIELDS if f.choices], ids=lambda f: f.name)
def test_every_documented_choice_is_accepted_and_others_refused(field):
    for choice in field.choices:
        parse_job_request({field.name: choice}, info(channels=2))
    with pytest.raises(BadRequest):
        parse_job_request({field.name: "no-such-value"}, info(channels=2))


def test_every_mp3_bitrate_in_the_fields_schema_is_accepted():
    bitrate = next(f for f in FORM_FIELDS if f.name == "bitrate")
    for rate in bitrate.schema["enum"]:
        assert parse_job_request({"format": "mp3", "bitrate": str(rate)}, info()).output.bitrate == rate
    with pytest.raises(BadRequest, match="bitrate"):
        parse_job_request({"format": "mp3", "bitrate": "100"}, info())


def test_documented_defaults_are_what_the_parser_fills_in():
    defaults = {f.name: f.default for f in FORM_FIELDS if f.default is not None}
    assert "model" not in defaults  # its default is a setting, not a constant
    parsed = parse_job_request({}, info())
    resolved = {"stems": parsed.stems, "bitrate": str(parsed.output.bitrate),
                "clip": parsed.output.clip, "channels": parsed.output.channel_mode,
                "samplerate": "input" if parsed.output.samplerate == info().samplerate else None,
                "cache": str(parsed.cache).lower()}
    assert defaults == resolved
    assert parse_job_request(defaults, info()) == parsed


SERVING = Settings.from_env({}, models="htdemucs, htdemucs_6s,mel_band_roformer_kim")
"""A deployment of a 4-stem and a 6-stem Demucs and a one-source (vocals) RoFormer."""


def test_the_first_served_model_is_the_default_and_others_are_chosen_by_name():
    assert parse_job_request({}, info(), SERVING).model == "htdemucs"
    assert parse_job_request({"model": " htdemucs_6s "}, info(), SERVING).model == "htdemucs_6s"


def test_an_unknown_model_is_unknown_model_listing_the_served_ones():
    with pytest.raises(BadRequest) as caught:
        parse_job_request({"model": "htdemucs_ft"}, info(), SERVING)
    assert caught.value.code == "unknown_model" and caught.value.http_status == 400
    assert caught.value.message == ("unknown model 'htdemucs_ft'; this service serves htdemucs, htdemucs_6s, "
                                    "mel_band_roformer_kim")


@pytest.mark.parametrize("model,offered", [
    ("htdemucs", ["all", "drums", "bass", "other", "vocals"]),
    ("htdemucs_6s", ["all", "drums", "bass", "other", "vocals", "guitar", "piano"]),
    ("mel_band_roformer_kim", ["all", "vocals"]),
])
def test_stems_are_checked_against_the_chosen_models_own_sources(model, offered):
    for stems in offered:
        assert parse_job_request({"model": model, "stems": stems}, info(), SERVING).stems == stems
    refused = "piano" if model != "htdemucs_6s" else "kick"
    with pytest.raises(BadRequest) as caught:
        parse_job_request({"model": model, "stems": refused}, info(), SERVING)
    assert caught.value.code == "invalid_stems"
    assert caught.value.message == f"unknown stems value {refused!r}; model {model!r} offers {', '.join(offered)}"


def test_a_model_of_ones_own_offers_what_its_warm_worker_reported():
    mine = dataclasses.replace(SERVING, models="drumsep")
    # Not loaded anywhere yet: taken to be a 4-stem Demucs, as before models were chosen.
    assert parse_job_request({"stems": "bass"}, info(), mine).stems == "bass"
    reported = {"drumsep": {"architecture": "demucs", "sources": ["kick", "snare", "toms"], "samplerate": 44100}}
    assert parse_job_request({"stems": "snare"}, info(), mine, reported).stems == "snare"
    with pytest.raises(BadRequest, match="model 'drumsep' offers all, kick, snare, toms"):
        parse_job_request({"stems": "bass"}, info(), mine, reported)


def test_one_source_models_give_the_source_and_its_complement_for_all():
    assert output_names("all", ("vocals",)) == ["vocals", "no_vocals"]
    assert output_names("vocals", ("vocals",)) == ["vocals", "no_vocals"]
    assert output_names("all", ("vocals", "other")) == ["vocals", "other"]


@pytest.mark.parametrize("raw,cache", [("", True), ("true", True), (" FALSE ", False), ("false", False)])
def test_cache_is_true_unless_false(raw, cache):
    assert parse_job_request({"cache": raw}, info()).cache is cache
    assert parse_job_request({"cache": raw, "workflow": '{"steps": [{"name": "a", "models": ["tiny"]}], '
                              '"outputs": {"v": "a/vocals"}}'}, info(samplerate=44100)).cache is cache


def test_a_cache_neither_true_nor_false_is_invalid_cache():
    with pytest.raises(BadRequest) as caught:
        parse_job_request({"cache": "sometimes"}, info())
    assert caught.value.code == "invalid_cache" and "sometimes" in caught.value.message
