"""A RoFormer from an MSST checkpoint and its YAML config, loaded strictly and safely."""
from __future__ import annotations

import typing as tp
from pathlib import Path

import torch

from demix.separation.roformer.bs_roformer import BSRoformer
from demix.separation.roformer.config import (BS_ROFORMER, MEL_BAND_ROFORMER, RoformerConfig, RoformerConfigError,
                                              read_config)
from demix.separation.roformer.mel_band_roformer import MelBandRoformer
from demix.separation.roformer.network import RoformerNetwork

NETWORKS: dict[str, type[RoformerNetwork]] = {BS_ROFORMER: BSRoformer, MEL_BAND_ROFORMER: MelBandRoformer}
"""The network class of each architecture."""

CHECKPOINT_WRAPPERS = ("state", "state_dict", "model_state_dict")
"""Keys under which some MSST checkpoints nest the weights (MSST unwraps them likewise)."""


class RoformerCheckpointError(ValueError):
    """A checkpoint cannot be read, or its tensors do not fit the config's network."""


def build_model(config: RoformerConfig) -> RoformerNetwork:
    """The config's network with freshly initialised weights, in eval mode, carrying
    the config (its sources, sample rate and window settings).

    Raises:
        RoformerConfigError: the config's `model:` keywords do not build a network.
    """
    try:
        model = NETWORKS[config.architecture](**config.model_kwargs())
    except (TypeError, ValueError) as exc:
        raise RoformerConfigError(f"config's model: section does not build a {config.architecture}: "
                                  f"{exc}") from exc
    model.config = config
    return model.eval()


def load_model(checkpoint: Path, config_path: Path, architecture: tp.Optional[str] = None) -> RoformerNetwork:
    """The network of the MSST config at `config_path` with the weights at `checkpoint`
    (read with `weights_only=True`, loaded with `strict=True`), on the CPU, in eval mode.

    Raises:
        RoformerConfigError: the config is unsafe, malformed or unsupported.
        RoformerCheckpointError: the checkpoint is unreadable or does not match the
            config's network (the message names the first missing, unexpected or
            mis-shaped tensors).
    """
    model = build_model(read_config(config_path, architecture))
    state = read_state_dict(checkpoint)
    mismatched = [f"{name} {tuple(state[name].shape)} (network has {tuple(own.shape)})"
                  for name, own in model.state_dict().items()
                  if name in state and tuple(state[name].shape) != tuple(own.shape)]
    if mismatched:
        raise RoformerCheckpointError(f"checkpoint {checkpoint.name} does not fit the config: "
                                      f"{len(mismatched)} tensors differ in shape, e.g. {mismatched[0]}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RoformerCheckpointError(f"checkpoint {checkpoint.name} does not fit the config: {exc}") from exc
    return model


def read_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from MSST's optional nesting.

    Raises:
        RoformerCheckpointError: the file is not a weights-only torch checkpoint of tensors.
    """
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike
        raise RoformerCheckpointError(f"cannot read {checkpoint.name} as weights-only torch checkpoint: "
                                      f"{exc}") from exc
    for key in CHECKPOINT_WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RoformerCheckpointError(f"{checkpoint.name} holds no state_dict of tensors")
    return state
