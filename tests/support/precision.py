"""What every model's precision tests check, whatever the model (HT-Demucs, RoFormers):
reduced precision stays close to fp32, and a precision the device cannot run falls back
to fp32 with a warning."""
from __future__ import annotations

import copy
import typing as tp
from pathlib import Path

import numpy as np
import pytest

from testkit.memory_sink import separate, stems_snr_db


def assert_bf16_close_to_fp32(model: tp.Any, path: Path) -> None:
    """Every stem of a bf16 run within 20-200 dB of the fp32 run's: close, and not fp32
    again under another name."""
    snrs = stems_snr_db(separate(model, path), separate(model, path, precision="bf16"))
    assert all(20 < snr < 200 for snr in snrs.values()), snrs


def assert_gpu_close_to_cpu(model: tp.Any, path: Path, precision: str) -> None:
    """Every stem of a CUDA run in `precision` close to the CPU's fp32 run's (60 dB in
    fp32, 20 in a reduced precision)."""
    snrs = stems_snr_db(separate(model, path),
                        separate(copy.deepcopy(model), path, device="cuda", precision=precision))
    assert all(snr > (60 if precision == "fp32" else 20) for snr in snrs.values()), snrs


def assert_falls_back_to_fp32(model: tp.Any, path: Path, precision: str, warning: str, stem: str) -> None:
    """A run in `precision` warns (`warning`, a regex) and gives the fp32 run's `stem` exactly."""
    with pytest.warns(UserWarning, match=warning):
        reduced = separate(model, path, precision=precision)
    assert np.array_equal(reduced.stem(stem), separate(model, path).stem(stem))
