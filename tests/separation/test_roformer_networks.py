"""The RoFormer networks against MSST's: the same state_dict keys and shapes, the same
output for the same weights, the same mel bands."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.roformer_fixtures import (ARCHITECTURES, FIXTURES, MSST_CONFIGS, reference_arrays, reference_model,
                                     small_checkpoint_path)
from demix.separation.roformer import BSRoformer, MelBandRoformer, build_model, read_config
from demix.separation.roformer.mel_band_roformer import band_membership


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_network_gives_msst_networks_output(architecture):
    model = reference_model(architecture)
    arrays = reference_arrays(architecture)
    with torch.inference_mode():
        output = model(torch.from_numpy(arrays["network_input"])).numpy()
    expected = arrays["network_output"]
    # MSST's Mel-Band RoFormer drops the stem axis when it has one stem; this one keeps it.
    assert output.shape[1] == model.num_stems
    output = output.reshape(expected.shape)
    assert np.abs(output).max() > 0.05  # a real signal, not silence on both sides
    assert np.abs(output - expected).max() < 1e-5


@pytest.mark.parametrize("config_name", sorted(path.name for path in MSST_CONFIGS.glob("*.yaml")))
def test_msst_configs_build_networks_with_msst_state_dict_keys_and_shapes(config_name):
    """What a real checkpoint of these configs needs to load with strict=True."""
    expected = json.loads((FIXTURES / "msst_state_dict_shapes.json").read_text())[config_name]
    model = build_model(read_config(MSST_CONFIGS / config_name))
    assert {name: list(tensor.shape) for name, tensor in model.state_dict().items()} == expected


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_saved_state_dict_loads_back_strictly(architecture, tmp_path):
    model = reference_model(architecture)
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    again = build_model(model.config)
    again.load_state_dict(torch.load(path, weights_only=True), strict=True)
    for (name, tensor), (other_name, other) in zip(model.state_dict().items(), again.state_dict().items()):
        assert name == other_name and torch.equal(tensor, other)
    assert torch.load(small_checkpoint_path(architecture), weights_only=True).keys() == model.state_dict().keys()


@pytest.mark.parametrize("samplerate, n_fft, bands", [(44100, 2048, 60), (44100, 2048, 64), (48000, 2048, 60),
                                                       (44100, 256, 8)])
def test_mel_bands_are_msst_librosa_bands(samplerate, n_fft, bands):
    with np.load(FIXTURES / "mel_bands.npz") as expected:
        assert np.array_equal(band_membership(samplerate, n_fft, bands),
                              expected[f"sr{samplerate}_nfft{n_fft}_bands{bands}"])


def test_the_rotary_frequencies_are_shared_and_kept_per_attention_layer():
    model = BSRoformer(16, depth=2, freqs_per_bands=(1, 2), stft_n_fft=4, stft_hop_length=1, stft_win_length=4,
                       dim_head=8, heads=2)
    time_rotaries = {id(block[0].layers[0][0].rotary_embed) for block in model.layers}
    assert len(time_rotaries) == 1
    keys = [name for name in model.state_dict() if name.endswith("rotary_embed.freqs")]
    assert len(keys) == 2 * 2 * 2  # blocks × (time, freq) × layers: one per attention layer, as MSST


@pytest.mark.parametrize("network", [BSRoformer, MelBandRoformer])
def test_a_mono_network_separates_one_channel(network):
    small = dict(dim=16, depth=1, stft_n_fft=256, stft_hop_length=64, stft_win_length=256, dim_head=8,
                 heads=2, num_stems=2)
    small.update(freqs_per_bands=(64, 65)) if network is BSRoformer else small.update(num_bands=8)
    model = network(stereo=False, **small).eval()
    with torch.inference_mode():
        assert model(torch.randn(3, 1, 640)).shape == (3, 2, 1, 640)
    with pytest.raises(ValueError, match=r"expected audio \[batch, 1, time\]"):
        model(torch.randn(1, 2, 640))


@pytest.mark.parametrize("keyword, message", [
    ({"use_pope": True}, "use_pope"), ({"stft_window_fn": torch.hamming_window}, "stft_window_fn"),
    ({"flash_attn": False, "some_new_option": 1}, "unknown RoFormer keyword"),
    ({"freqs_per_bands": (2, 2)}, "must split the STFT's 129 bins"),
])
def test_unsupported_options_are_refused(keyword, message):
    with pytest.raises((TypeError, ValueError), match=message):
        BSRoformer(16, depth=1, stft_n_fft=256, dim_head=8, heads=2, **keyword)
