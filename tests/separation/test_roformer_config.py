"""Reading MSST's YAML configs: the safe loader, and what the config says."""
from __future__ import annotations

import pytest

from tests.roformer_fixtures import MSST_CONFIGS, small_config_path
from demix.separation.roformer.config import RoformerConfigError, load_yaml, parse_config, read_config

SMALL = """
audio: {chunk_size: 1000, sample_rate: 32000}
model: {dim: 8, depth: 1, num_bands: 4}
training: {instruments: [vocals, other], target_instrument: vocals}
inference: {num_overlap: 2}
"""


def test_python_tuples_are_read_as_tuples():
    assert load_yaml("sizes: !!python/tuple [1, 2, 3]\nnested: !!python/tuple\n- !!python/tuple [4]\n") == {
        "sizes": (1, 2, 3), "nested": ((4,),)}


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system ['true']", "!!python/name:os.system",
                                 "!!python/object:collections.OrderedDict {}", "!!python/module:os"])
def test_other_python_tags_are_refused(tag):
    with pytest.raises(RoformerConfigError, match="not plain YAML"):
        load_yaml(f"model: {tag}\n")


def test_a_tuple_tag_on_a_mapping_is_refused():
    with pytest.raises(RoformerConfigError, match="must tag a sequence"):
        load_yaml("sizes: !!python/tuple {a: 1}\n")


@pytest.mark.parametrize("name, architecture, sources, chunk_size, overlap", [
    ("model_bs_roformer_ep_317_sdr_12.9755.yaml", "bs_roformer", ("vocals",), 352800, 2),
    ("model_mel_band_roformer_ep_3005_sdr_11.4360.yaml", "mel_band_roformer", ("vocals",), 352800, 2),
    ("config_vocals_mel_band_roformer_kj.yaml", "mel_band_roformer", ("vocals",), 352800, 2),
])
def test_msst_configs_are_read(name, architecture, sources, chunk_size, overlap):
    config = read_config(MSST_CONFIGS / name)
    assert (config.architecture, config.sources, config.chunk_size, config.num_overlap, config.samplerate) == (
        architecture, sources, chunk_size, overlap, 44100)
    assert config.batch_size == 4  # what MSST's inference runs them with (its fades depend on it)
    assert config.model["stft_hop_length"] == 441
    assert isinstance(config.model["multi_stft_resolutions_window_sizes"], tuple)


def test_instruments_are_the_sources_without_a_target():
    config = read_config(small_config_path("bs_roformer"))
    assert config.sources == ("vocals", "other")
    assert config.model["freqs_per_bands"][:3] == (4, 4, 4)


def test_the_settings_come_from_their_sections():
    config = parse_config(SMALL)
    assert (config.architecture, config.samplerate, config.chunk_size, config.num_overlap, config.sources) == (
        "mel_band_roformer", 32000, 1000, 2, ("vocals",))
    assert parse_config(SMALL.replace("inference: {", "inference: {chunk_size: 2000, ")).chunk_size == 2000


def test_the_batch_size_is_the_configs_or_one():
    assert parse_config(SMALL).batch_size == 1
    assert parse_config(SMALL.replace("inference: {", "inference: {batch_size: 3, ")).batch_size == 3


@pytest.mark.parametrize("change, message", [
    (("num_bands: 4", "freqs_per_bands: [1, 2]"), None),
    (("num_bands: 4", "stereo: true"), "cannot tell BS-RoFormer from Mel-Band"),
    (("inference: {num_overlap: 2}", "inference: {}"), "no inference.num_overlap"),
    (("chunk_size: 1000, ", ""), "no chunk_size"),
    (("chunk_size: 1000", "chunk_size: -5"), "chunk_size must be a positive integer"),
    (("inference: {", "inference: {batch_size: 0, "), "inference.batch_size must be a positive integer"),
    (("target_instrument: vocals", "target_instrument: null"), "num_stems is 1 but the config names 2"),
    (("instruments: [vocals, other], target_instrument: vocals", "batch_size: 2"), "names no sources"),
    (("model: {", "model: [1]\nx: {"), "no model: section"),
])
def test_malformed_configs_say_what_is_wrong(change, message):
    text = SMALL.replace(*change)
    if message is None:
        assert parse_config(text).architecture == "bs_roformer"
    else:
        with pytest.raises(RoformerConfigError, match=message):
            parse_config(text)


def test_an_explicit_architecture_wins_and_must_be_known():
    assert parse_config(SMALL, "bs_roformer").architecture == "bs_roformer"
    with pytest.raises(RoformerConfigError, match="unknown architecture 'mdx23c'"):
        parse_config(SMALL, "mdx23c")
