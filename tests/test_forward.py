"""worker.forward: precision choice, its fallbacks, and segments per forward."""
from __future__ import annotations

import pytest
import torch

from worker import forward as forward_module
from worker.forward import ModelForward, autocast_dtype, batch_segments


class FailsUnderAutocast(torch.nn.Module):
    """Stands in for a model with an op that has no kernel in the autocast dtype."""

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("no bf16 kernel for this op")
        return windows[:, None]


def test_a_model_failing_in_bf16_degrades_to_fp32_with_a_warning(monkeypatch):
    monkeypatch.setattr(forward_module, "cpu_supports_bf16", lambda: True)
    forward, windows = ModelForward("cpu", "bf16"), torch.randn(1, 2, 10)
    with pytest.warns(UserWarning, match="bf16 failed on cpu"):
        assert torch.equal(forward(FailsUnderAutocast(), windows), windows[:, None])
    assert forward.dtype is None


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="fp8"):
        autocast_dtype("fp8", "cpu")


def test_segments_per_forward_default_to_one_on_cpu_and_more_on_cuda():
    assert batch_segments(0, "cpu") == 1
    assert batch_segments(0, "cuda") == forward_module.CUDA_BATCH_SEGMENTS > 1
    assert batch_segments(3, "cpu") == 3
