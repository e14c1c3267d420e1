"""Loading MSST checkpoints: weights only, every tensor accounted for."""
from __future__ import annotations

import collections

import pytest
import torch

from tests.roformer_fixtures import small_checkpoint_path, small_config_path
from demix.separation.roformer import (BSRoformer, MelBandRoformer, RoformerCheckpointError, RoformerConfigError,
                                       load_model)
from demix.separation.roformer.loading import read_state_dict


@pytest.mark.parametrize("architecture, network", [("bs_roformer", BSRoformer),
                                                   ("mel_band_roformer", MelBandRoformer)])
def test_a_checkpoint_and_its_config_give_the_network_in_eval_mode(architecture, network):
    model = load_model(small_checkpoint_path(architecture), small_config_path(architecture))
    assert isinstance(model, network) and not model.training
    assert model.samplerate == 44100 and model.chunk_size == 11008
    weights = torch.load(small_checkpoint_path(architecture), weights_only=True)
    assert all(torch.equal(weights[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize("wrapper", ["state", "state_dict", "model_state_dict"])
def test_msst_wrapped_checkpoints_are_unwrapped(tmp_path, wrapper):
    path = tmp_path / "wrapped.ckpt"
    torch.save({wrapper: torch.load(small_checkpoint_path("bs_roformer"), weights_only=True), "epoch": 3}, path)
    assert load_model(path, small_config_path("bs_roformer")).sources == ("vocals", "other")


def test_a_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    state = collections.OrderedDict(torch.load(small_checkpoint_path("bs_roformer"), weights_only=True))
    state["extra"] = _NotATensor()
    torch.save(state, path)
    with pytest.raises(RoformerCheckpointError, match="cannot read evil.ckpt as weights-only"):
        read_state_dict(path)


class _NotATensor:
    """Any class: weights_only loading refuses to build it."""


def test_a_missing_tensor_is_named(tmp_path):
    state = torch.load(small_checkpoint_path("bs_roformer"), weights_only=True)
    del state["final_norm.gamma"]
    path = tmp_path / "missing.ckpt"
    torch.save(state, path)
    with pytest.raises(RoformerCheckpointError, match="Missing key.*final_norm.gamma"):
        load_model(path, small_config_path("bs_roformer"))


def test_an_extra_tensor_is_named(tmp_path):
    state = torch.load(small_checkpoint_path("bs_roformer"), weights_only=True)
    state["band_split.extra"] = torch.zeros(1)
    path = tmp_path / "extra.ckpt"
    torch.save(state, path)
    with pytest.raises(RoformerCheckpointError, match="Unexpected key.*band_split.extra"):
        load_model(path, small_config_path("bs_roformer"))


def test_a_checkpoint_of_another_config_is_refused_by_shape(tmp_path):
    config = small_config_path("bs_roformer").read_text().replace("dim: 16", "dim: 24")
    (tmp_path / "wider.yaml").write_text(config)
    with pytest.raises(RoformerCheckpointError, match=r"tensors differ in shape, e.g. \S+ \(16,\) "
                                                      r"\(network has \(24,\)\)"):
        load_model(small_checkpoint_path("bs_roformer"), tmp_path / "wider.yaml")


def test_a_config_that_builds_no_network_says_why(tmp_path):
    config = small_config_path("bs_roformer").read_text().replace("  depth: 2\n", "  depth: 2\n  use_pope: true\n")
    (tmp_path / "pope.yaml").write_text(config)
    with pytest.raises(RoformerConfigError, match="does not build a bs_roformer: use_pope"):
        load_model(small_checkpoint_path("bs_roformer"), tmp_path / "pope.yaml")


def test_a_file_that_is_no_checkpoint_is_refused(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    with pytest.raises(RoformerCheckpointError, match="cannot read notes.txt"):
        load_model(path, small_config_path("bs_roformer"))
    torch.save([torch.zeros(1)], tmp_path / "list.ckpt")
    with pytest.raises(RoformerCheckpointError, match="holds no state_dict of tensors"):
        load_model(tmp_path / "list.ckpt", small_config_path("bs_roformer"))
