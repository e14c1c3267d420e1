"""The RoFormer reference fixtures made once from MSST (`tests/data/roformer/make_fixtures.py`)."""
from __future__ import annotations

import typing as tp
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "data" / "roformer"
ARCHITECTURES = ("bs_roformer", "mel_band_roformer")
DEMIX_CASES = ("long", "short", "tiny")
LENGTH_CASES = ("under_half_window", "under_window", "one_window", "between_borders", "two_borders", "long")
"""The length classes of `<arch>_small_lengths.npz`, each demixed with every one of `LENGTH_BATCH_SIZES`."""
LENGTH_BATCH_SIZES = (1, 4)
MSST_CONFIGS = FIXTURES / "msst_configs"


def small_config_path(architecture: str) -> Path:
    return FIXTURES / f"{architecture}_small.yaml"


def small_checkpoint_path(architecture: str) -> Path:
    """MSST's network of the small config, seeded random weights, as MSST saved it."""
    return FIXTURES / f"{architecture}_small.pt"


def reference_arrays(architecture: str) -> tp.Mapping[str, np.ndarray]:
    """MSST's outputs on the small config (see the fixture script for the names)."""
    with np.load(FIXTURES / f"{architecture}_small.npz") as arrays:
        return dict(arrays)


def length_arrays(architecture: str) -> tp.Mapping[str, np.ndarray]:
    """MSST's outputs on the small config with a shorter window, one per length class and
    batch size (see the fixture script for the names)."""
    with np.load(FIXTURES / f"{architecture}_small_lengths.npz") as arrays:
        return dict(arrays)


def reference_model(architecture: str):
    """This package's network of the small config with MSST's weights loaded strictly."""
    from demix.separation.roformer import load_model

    return load_model(small_checkpoint_path(architecture), small_config_path(architecture))
