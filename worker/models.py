"""Loading Demucs models, once per worker process.

Models come through `demucs.pretrained.get_model`, the loader `demucs` itself uses:
from a local demucs-format repository when `DEMIX_MODEL_REPO` is set, otherwise from
the Hugging Face hub (then Meta's legacy server), cached where demucs caches them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import threading
import time
import typing as tp
from pathlib import Path

import torch

from shared.errors import ModelUnavailable

log = logging.getLogger(__name__)

DOWNLOAD_SOCKET_TIMEOUT_S = 30.0
"""Network reads while fetching weights give up after this long instead of hanging."""

HOW_TO_PROVIDE_WEIGHTS = (
    "Provide weights locally: set DEMIX_MODEL_REPO to a folder in demucs' repository "
    "format (<sig>-<sha8>.th files and a <name>.yaml bag, what `demucs --repo` reads), "
    "or run the worker where the Hugging Face hub is reachable."
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model, from where, on which device: the key of the per-process cache."""
    name: str
    repo: str = ""
    device: str = "cpu"


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
    """Load (and, for remote models, download) a model or bag of models, in eval mode.

    Raises:
        ModelUnavailable: the weights cannot be found, downloaded or read; the message
            says where the loader looked and how to provide weights.
    """
    from demucs.pretrained import get_model

    repo = Path(spec.repo).expanduser() if spec.repo else None
    if repo is not None and not repo.is_dir():
        raise ModelUnavailable(f"DEMIX_MODEL_REPO={spec.repo} is not a folder. {HOW_TO_PROVIDE_WEIGHTS}")
    where = f"local repository {repo}" if repo else "the Hugging Face hub / demucs' download server"
    try:
        with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
            model = get_model(spec.name, repo=repo)
    except SystemExit as exc:  # demucs' loader calls sys.exit() on some errors
        raise ModelUnavailable(f"could not load model {spec.name!r} from {where}: {exc}. "
                               f"{HOW_TO_PROVIDE_WEIGHTS}") from None
    except Exception as exc:
        raise ModelUnavailable(f"could not load model {spec.name!r} from {where}: "
                               f"{type(exc).__name__}: {exc}. {HOW_TO_PROVIDE_WEIGHTS}") from None
    return model.to(spec.device).eval()


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> tp.Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


class ModelCache:
    """Models loaded by this process, kept for its lifetime; `loads` counts real loads."""

    def __init__(self, loader: tp.Callable[[ModelSpec], torch.nn.Module] = load_model):
        self._loader = loader
        self._models: dict[ModelSpec, torch.nn.Module] = {}
        self._lock = threading.Lock()
        self.loads = 0

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
