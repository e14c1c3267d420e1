"""demix.separation.forward: precision choice, its fallbacks, and segments per forward."""
from __future__ import annotations

import pytest
import torch

from demix.separation import forward as forward_module
from testkit.tiny_models import make_tiny_htdemucs
from demix.separation.forward import BlockwiseAttention, ModelForward, autocast_dtype, batch_segments, cpu_bf16_copy


class FailsInBf16(torch.nn.Module):
    """Stands in for a model with a layer that has no bf16 kernel for some op."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        if self.layer.weight.dtype == torch.bfloat16:
            raise RuntimeError("no bf16 kernel for this op")
        return windows[:, None]


def test_a_model_failing_in_bf16_degrades_to_fp32_with_a_warning(monkeypatch):
    monkeypatch.setattr(forward_module, "cpu_supports_bf16", lambda: True)
    forward, windows = ModelForward("cpu", "bf16"), torch.randn(1, 2, 10)
    with pytest.warns(UserWarning, match="bf16 failed on cpu"):
        assert torch.equal(forward(FailsInBf16(), windows), windows[:, None])
    assert forward.dtype is None


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="fp8"):
        autocast_dtype("fp8", "cpu")


def test_segments_per_forward_default_to_one_on_cpu_and_more_on_cuda():
    assert batch_segments(0, "cpu") == 1
    assert batch_segments(0, "cuda") == forward_module.CUDA_BATCH_SEGMENTS > 1
    assert batch_segments(3, "cpu") == 3


# -- the CPU bf16 copy ------------------------------------------------------------------

@pytest.mark.parametrize("lengths", [(37, 37), (37, 53), (1, 9)])
def test_blockwise_attention_equals_the_module_it_wraps(lengths):
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    query_length, key_length = lengths
    query, key = torch.randn(2, query_length, 16), torch.randn(2, key_length, 16)
    with torch.inference_mode():
        expected, _ = attention(query, key, key, need_weights=False)
        for block in (1, 8, 37, 512):  # blocks that divide the queries, that do not, and one for all
            got, weights = BlockwiseAttention(attention, block=block)(query, key, key, need_weights=False)
            assert weights is None and torch.allclose(got, expected, atol=1e-5)


def test_blockwise_attention_leaves_what_it_does_not_cover_to_the_module():
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    blockwise = BlockwiseAttention(attention, block=4)
    query, mask = torch.randn(1, 10, 16), torch.zeros(10, 10, dtype=torch.bool)
    mask[:, -3:] = True
    with torch.inference_mode():
        for kwargs in ({"attn_mask": mask, "need_weights": False}, {"need_weights": True}):
            expected, expected_weights = attention(query, query, query, **kwargs)
            got, weights = blockwise(query, query, query, **kwargs)
            assert torch.equal(got, expected)
            assert (weights is None) == (expected_weights is None)


@pytest.mark.slow  # runs the model in fp32 and bf16
def test_the_cpu_bf16_copy_runs_layers_in_bf16_and_keeps_the_fp32_model_and_the_norms():
    model = make_tiny_htdemucs().eval()
    weights_before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    bf16 = cpu_bf16_copy(model)
    assert cpu_bf16_copy(model) is bf16  # made once per model
    assert all(tensor.dtype == torch.float32 for tensor in model.state_dict().values())
    assert all(torch.equal(tensor, weights_before[name]) for name, tensor in model.state_dict().items())
    layers = [m for m in bf16.modules() if isinstance(m, forward_module.BF16_MODULES)]
    assert layers and all(p.dtype == torch.bfloat16 for m in layers for p in m.parameters(recurse=False))
    norms = [m for m in bf16.modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert norms and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    attention = [m for m in bf16.modules() if isinstance(m, BlockwiseAttention)]
    assert attention and not any(m.training for m in attention)
    # Where bf16 is slow (no kernels), the tiny model still runs: this checks dtypes only.
    windows = torch.randn(1, 2, model.valid_length(int(model.samplerate * model.segment)))
    with torch.inference_mode():
        out = bf16(windows)
    assert out.dtype == torch.float32 and out.shape == model(windows).shape
