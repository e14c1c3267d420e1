"""Step 2: the ONNX graph's initializers mapped back onto `demucs.htdemucs.HTDemucs`."""
from __future__ import annotations

import typing as tp
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import nn

from demix.separation.weights.pull_errors import ConversionError, MissingDependencyError

if tp.TYPE_CHECKING:
    from demucs.htdemucs import HTDemucs

#: Constructor arguments of the released htdemucs (everything else: HTDemucs defaults).
HTDEMUCS_KWARGS: dict[str, tp.Any] = dict(
    sources=["drums", "bass", "other", "vocals"],
    audio_channels=2,
    samplerate=44100,
    segment=Fraction(39, 5),
    channels=48,
    nfft=4096,
    depth=4,
    freq_emb=0.2,
    emb_scale=10,
    dconv_mode=3,
    dconv_comp=8,
    bottom_channels=512,
    t_layers=5,
    t_heads=8,
    t_hidden_scale=4.0,
    t_dropout=0.02,
    t_norm_first=True,
    t_norm_in=True,
    t_norm_out=True,
    t_layer_scale=True,
    t_gelu=True,
    t_emb="sin",
    rescale=0.1,
)



class GraphNode(tp.NamedTuple):
    """The parts of an ONNX node the weight mapping needs."""
    name: str
    op_type: str
    inputs: tuple[str, ...]


def _unqualified(qualified: str) -> str:
    # torch.onnx names a module's scope from the last non-numeric atom of its qualified
    # name on (`encoder.0` stays `encoder.0`; `dconv.layers.1.4` becomes `layers.1.4`).
    atoms = qualified.split(".")
    for index in range(len(atoms) - 1, -1, -1):
        if not atoms[index].isdigit():
            return ".".join(atoms[index:])
    return qualified


def onnx_scope(module_path: str, model: nn.Module | None = None) -> str:
    """Translate a module path to the scope torch.onnx gives its nodes.

    Only modules whose `forward` runs open a scope, so `nn.ModuleList` and
    `nn.ModuleDict` (never called) are skipped, while `nn.Sequential` is kept:
    `encoder.0.dconv.layers.1.4` -> `/encoder.0/dconv/layers.1/layers.1.4`.
    With `model`, containers are recognised by type; without it, an atom directly
    followed by a numeric atom is assumed to be a `ModuleList` unless it is numeric
    itself (true for every container in HTDemucs).
    """
    atoms = module_path.split(".")
    segments = []
    for end in range(1, len(atoms) + 1):
        prefix = ".".join(atoms[:end])
        if model is not None:
            called = not isinstance(model.get_submodule(prefix), (nn.ModuleList, nn.ModuleDict))
        else:
            last = end == len(atoms)
            called = atoms[end - 1].isdigit() or last or not atoms[end].isdigit()
        if called:
            segments.append(_unqualified(prefix))
    return "/" + "/".join(segments)


class _Graph:
    """Initializer lookup by consuming node name, recording which initializers were used."""

    def __init__(self, initializers: tp.Mapping[str, np.ndarray], nodes: tp.Iterable[GraphNode]):
        self.initializers = initializers
        self.nodes = {node.name: node for node in nodes}
        self.consumers: dict[str, list[GraphNode]] = {}
        for node in self.nodes.values():
            for name in node.inputs:
                if name in initializers:
                    self.consumers.setdefault(name, []).append(node)
        self.used: set[str] = set()

    def take(self, name: str) -> np.ndarray:
        self.used.add(name)
        return self.initializers[name]

    def node_weight(self, node_name: str) -> np.ndarray | None:
        """The single initializer input of node `node_name`, or None."""
        node = self.nodes.get(node_name)
        if node is None:
            return None
        names = [name for name in node.inputs if name in self.initializers]
        if len(names) != 1:
            return None
        return self.take(names[0])


def _resolve(graph: _Graph, model: nn.Module, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """Find the array for state-dict entry `key` in the graph, in the model's layout."""
    if key in graph.initializers:  # kept its name: conv weights, biases, LayerNorms...
        return graph.take(key)
    module_path, _, param = key.rpartition(".")
    module = model.get_submodule(module_path)
    scope = onnx_scope(module_path, model)
    from demucs.hdemucs import ScaledEmbedding
    from demucs.transformer import LayerScale

    def at(node: str) -> np.ndarray:
        array = graph.node_weight(f"{scope}/{node}")
        if array is None:
            raise ConversionError(f"{key}: no initializer feeds node {scope}/{node}")
        return array

    if isinstance(module, nn.GroupNorm) and param in ("weight", "bias"):
        # GroupNorm is exported as InstanceNormalization followed by an affine Mul/Add
        # with anonymous [C, 1] constants.
        return at("Mul" if param == "weight" else "Add").reshape(shape)
    if isinstance(module, LayerScale) and param == "scale":
        return at("Mul").reshape(shape)
    if isinstance(module, nn.Linear) and param in ("weight", "bias"):
        # Linear becomes MatMul(x, Wᵀ) + b.
        return at("MatMul").T if param == "weight" else at("Add")
    if isinstance(module, nn.MultiheadAttention) and param in ("in_proj_weight", "in_proj_bias"):
        matmul, add = f"{scope}/MatMul", f"{scope}/Add"
        single = graph.node_weight(matmul if param == "in_proj_weight" else add)
        if single is not None and single.size == int(np.prod(shape)):
            return single.T if param == "in_proj_weight" else single
        # Cross-attention whose query and key/value come from different tensors: the
        # exporter split in_proj into a q part (MatMul/Add) and a kv part (MatMul_1/Add_1).
        rest = at("MatMul_1" if param == "in_proj_weight" else "Add_1")
        if single is None:
            raise ConversionError(f"{key}: no q projection at {matmul if param == 'in_proj_weight' else add}")
        if param == "in_proj_weight":
            return np.concatenate([single.T, rest.T], axis=0)
        return np.concatenate([single, rest], axis=0)
    parent_path = module_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else None
    if isinstance(module, nn.Embedding) and isinstance(parent, ScaledEmbedding) and param == "weight":
        # Frequencies are a constant range, so the exporter folded the lookup into one
        # constant, (weight * scale)ᵀ shaped [1, dim, num, 1], fed to an Expand.
        num, dim = shape
        for name, array in graph.initializers.items():
            if array.shape == (1, dim, num, 1) and any(
                    node.op_type == "Expand" for node in graph.consumers.get(name, ())):
                return graph.take(name)[0, :, :, 0].T / parent.scale
        raise ConversionError(f"{key}: no folded embedding constant of shape [1, {dim}, {num}, 1]")
    raise ConversionError(f"{key}: no rule maps it to an ONNX initializer")


def state_dict_from_onnx(model: nn.Module, initializers: tp.Mapping[str, np.ndarray],
                         nodes: tp.Iterable[GraphNode]) -> dict[str, torch.Tensor]:
    """Build `model`'s state dict from an exported graph's initializers and nodes.

    Every state-dict entry must be found with the right shape and every initializer
    must be used; anything else means the graph is not this architecture, which is
    reported rather than loaded half-right.
    """
    graph = _Graph(initializers, nodes)
    state: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for key, tensor in model.state_dict().items():
        shape = tuple(tensor.shape)
        try:
            array = _resolve(graph, model, key, shape)
        except ConversionError as exc:
            problems.append(str(exc))
            continue
        if tuple(array.shape) != shape:
            problems.append(f"{key}: graph has shape {list(array.shape)}, model needs {list(shape)}")
            continue
        state[key] = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    unused = sorted(set(initializers) - graph.used)
    if unused:
        problems.append(f"{len(unused)} initializers map to no parameter: {', '.join(unused[:8])}")
    if problems:
        raise ConversionError("the ONNX graph does not match HTDemucs(HTDEMUCS_KWARGS):\n  "
                              + "\n  ".join(problems[:20]))
    return state


def build_htdemucs() -> "HTDemucs":
    """Return an untrained HTDemucs with the released htdemucs architecture."""
    from demucs.htdemucs import HTDemucs
    return HTDemucs(**HTDEMUCS_KWARGS)


def _import_onnx() -> tp.Any:
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError(
            "converting the npm weights needs the `onnx` package: pip install onnx") from exc
    return onnx


def convert_onnx_to_htdemucs(onnx_path: Path) -> "HTDemucs":
    """Load the htdemucs ONNX graph's weights into a new `HTDemucs`, in eval mode."""
    onnx = _import_onnx()
    from onnx import numpy_helper
    graph = onnx.load(str(onnx_path)).graph
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    nodes = [GraphNode(node.name, node.op_type, tuple(node.input)) for node in graph.node]
    del graph  # the protobuf holds a second copy of every weight
    model = build_htdemucs()
    model.load_state_dict(state_dict_from_onnx(model, initializers, nodes), strict=True)
    return model.eval()
