"""Demucs-format local model repositories: the folder layout `demucs --repo` reads.

A repository holds one `<sig>-<sha8>.th` file per model (a pickled package with the
model class, its constructor arguments and its state dict, `sha8` being the first 8
hex digits of the file's sha256) and one `<name>.yaml` per bag of models listing
signatures and optional per-source weights. Everything the service serves goes
through `demucs.pretrained.get_model(name, repo=...)`, so a folder written here is
loaded by the exact code path used for any other demucs repository.
"""
from __future__ import annotations

import hashlib
import io
import os
import typing as tp
from pathlib import Path

import torch
import yaml


def model_package(model: torch.nn.Module) -> dict:
    """Return the demucs package dict (`klass`, `args`, `kwargs`, `state`) for a model.

    The model must have been built by a demucs class decorated with `capture_init`,
    which records its constructor arguments.
    """
    args, kwargs = model._init_args_kwargs  # set by demucs.states.capture_init
    state = {key: value.detach().to("cpu") for key, value in model.state_dict().items()}
    return {"klass": model.__class__, "args": args, "kwargs": kwargs, "state": state}


def save_model(model: torch.nn.Module, repo_dir: Path, sig: str) -> Path:
    """Write `model` into `repo_dir` as `<sig>-<sha8>.th` and return the file's path.

    The file is written under a temporary name and renamed, so a concurrent reader
    never sees a partial model.
    """
    if "-" in sig:
        raise ValueError(f"model signature {sig!r} must not contain '-'")
    repo_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(model_package(model), buffer)
    payload = buffer.getvalue()
    checksum = hashlib.sha256(payload).hexdigest()[:8]
    path = repo_dir / f"{sig}-{checksum}.th"
    _write_atomically(path, payload)
    return path


def write_bag(repo_dir: Path, name: str, sigs: tp.Sequence[str],
              weights: tp.Optional[tp.Sequence[tp.Sequence[float]]] = None,
              segment: tp.Optional[float] = None) -> Path:
    """Write the bag `<name>.yaml` listing model signatures (and optional weights)."""
    bag: dict = {"models": list(sigs)}
    if weights is not None:
        bag["weights"] = [list(map(float, row)) for row in weights]
    if segment is not None:
        bag["segment"] = float(segment)
    path = repo_dir / f"{name}.yaml"
    _write_atomically(path, yaml.safe_dump(bag).encode())
    return path


def _write_atomically(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
