"""demix.separation.weights.convert: module paths to ONNX scopes, and the weight mapping on a tiny
synthetic model exported by torch.onnx."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from demix.separation.weights import convert


# ----------------------------------------------------------------- weight mapping

@pytest.mark.parametrize("path, scope", [
    ("encoder.0.dconv.layers.1.4", "/encoder.0/dconv/layers.1/layers.1.4"),
    ("tdecoder.3.dconv.layers.0.6", "/tdecoder.3/dconv/layers.0/layers.0.6"),
    ("crosstransformer.layers.0.norm_out", "/crosstransformer/layers.0/norm_out"),
    ("crosstransformer.layers_t.1.cross_attn", "/crosstransformer/layers_t.1/cross_attn"),
    ("channel_upsampler", "/channel_upsampler"),
])
def test_onnx_scope_translation(path: str, scope: str) -> None:
    assert convert.onnx_scope(path) == scope


class _DConv(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        from demucs.transformer import LayerScale
        self.layers = nn.ModuleList([nn.Sequential(
            nn.Conv1d(channels, channels, 1), nn.GroupNorm(1, channels), nn.GELU(),
            LayerScale(channels))])


class _Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv1d(2, channels, 3)
        self.dconv = _DConv(channels)


class _Layer(nn.Module):
    def __init__(self, dim: int, cross: bool):
        super().__init__()
        attn = nn.MultiheadAttention(dim, 2)
        if cross:
            self.cross_attn = attn
        else:
            self.self_attn = attn
        self.linear1 = nn.Linear(dim, 2 * dim)


class _Tiny(nn.Module):
    """Containers, norms and attention laid out like HTDemucs, at toy size."""

    def __init__(self) -> None:
        super().__init__()
        from demucs.hdemucs import ScaledEmbedding
        self.encoder = nn.ModuleList([_Block(4)])
        self.freq_emb = ScaledEmbedding(6, 4, scale=10.0)
        self.layers = nn.ModuleList([_Layer(8, cross=False), _Layer(8, cross=True)])


def _exported_graph(model: _Tiny) -> tuple[dict[str, np.ndarray], list[convert.GraphNode]]:
    """Initializers and nodes as torch.onnx lays out `_Tiny`'s weights."""
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    inits: dict[str, np.ndarray] = {}
    nodes: list[convert.GraphNode] = []

    def add(node: str, op: str, name: str, array: np.ndarray) -> None:
        inits[name] = array
        nodes.append(convert.GraphNode(node, op, ("/prev_output_0", name)))

    for key in ("encoder.0.conv.weight", "encoder.0.conv.bias",
                "encoder.0.dconv.layers.0.0.weight", "encoder.0.dconv.layers.0.0.bias",
                "layers.0.self_attn.in_proj_bias", "layers.0.self_attn.out_proj.weight",
                "layers.0.self_attn.out_proj.bias", "layers.1.cross_attn.out_proj.weight",
                "layers.1.cross_attn.out_proj.bias", "layers.0.linear1.bias",
                "layers.1.linear1.bias"):
        add(f"/named/{key}", "Conv", key, sd[key])
    gn = "/encoder.0/dconv/layers.0/layers.0.1"
    add(f"{gn}/Mul", "Mul", "onnx::Mul_1", sd["encoder.0.dconv.layers.0.1.weight"][:, None])
    add(f"{gn}/Add", "Add", "onnx::Add_2", sd["encoder.0.dconv.layers.0.1.bias"][:, None])
    add("/encoder.0/dconv/layers.0/layers.0.3/Mul", "Mul", "onnx::Mul_3",
        sd["encoder.0.dconv.layers.0.3.scale"][:, None])
    add("/Expand", "Expand", "onnx::Expand_4",
        (sd["freq_emb.embedding.weight"] * 10.0).T[None, :, :, None])
    add("/layers.0/self_attn/MatMul", "MatMul", "onnx::MatMul_5",
        sd["layers.0.self_attn.in_proj_weight"].T)
    for index in (0, 1):
        add(f"/layers.{index}/linear1/MatMul", "MatMul", f"onnx::MatMul_l{index}",
            sd[f"layers.{index}.linear1.weight"].T)
    weight, bias = sd["layers.1.cross_attn.in_proj_weight"], sd["layers.1.cross_attn.in_proj_bias"]
    add("/layers.1/cross_attn/MatMul", "MatMul", "onnx::MatMul_6", weight[:8].T)
    add("/layers.1/cross_attn/MatMul_1", "MatMul", "onnx::MatMul_7", weight[8:].T)
    add("/layers.1/cross_attn/Add", "Add", "onnx::Add_8", bias[:8])
    add("/layers.1/cross_attn/Add_1", "Add", "onnx::Add_9", bias[8:])
    return inits, nodes


def test_state_dict_mapping_on_synthetic_graph() -> None:
    torch.manual_seed(0)
    reference = _Tiny()
    with torch.no_grad():  # make every parameter distinct from a fresh init
        for param in reference.parameters():
            param.normal_()
    inits, nodes = _exported_graph(reference)
    state = convert.state_dict_from_onnx(_Tiny(), inits, nodes)
    expected = reference.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_state_dict_mapping_rejects_missing_and_extra_initializers() -> None:
    inits, nodes = _exported_graph(_Tiny())
    extra = dict(inits, **{"onnx::Mul_999": np.zeros((3, 1), np.float32)})
    with pytest.raises(convert.ConversionError, match="onnx::Mul_999"):
        convert.state_dict_from_onnx(_Tiny(), extra, nodes)
    missing = {k: v for k, v in inits.items() if k != "onnx::Mul_3"}
    with pytest.raises(convert.ConversionError, match="layers.0.3.scale"):
        convert.state_dict_from_onnx(_Tiny(), missing, nodes)
