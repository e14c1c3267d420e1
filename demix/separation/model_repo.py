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
import typing as tp
from pathlib import Path

import torch
import yaml

from demix.atomic_files import atomic_open


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
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as file:
        file.write(payload)


def save_bag(bag: torch.nn.Module, repo_dir: Path, name: str) -> Path:
    """Write every model of a demucs `BagOfModels` and its `<name>.yaml` into `repo_dir`."""
    sigs = []
    for index, model in enumerate(bag.models):
        sig = f"{name.replace('-', '_')}_{index}"
        for stale in repo_dir.glob(f"{sig}-*.th"):  # demucs refuses two files for one signature
            stale.unlink()
        save_model(model, repo_dir, sig)
        sigs.append(sig)
    segment = None
    if all(hasattr(model, "segment") for model in bag.models):
        segment = min(float(model.segment) for model in bag.models)
    return write_bag(repo_dir, name, sigs, weights=bag.weights, segment=segment)


def repo_has_model(repo_dir: Path, name: str) -> bool:
    """Whether `repo_dir` holds the bag `<name>.yaml` or a model with signature `name`."""
    if not repo_dir.is_dir():
        return False
    return (repo_dir / f"{name}.yaml").is_file() or any(repo_dir.glob(f"{name}-*.th")) \
        or (repo_dir / f"{name}.th").is_file()


def list_repo(repo_dir: Path) -> list[dict]:
    """The bags in `repo_dir`: name, signatures, total size in bytes, licence note if any."""
    entries = []
    if not repo_dir.is_dir():
        return entries
    for bag_file in sorted(repo_dir.glob("*.yaml")):
        bag = yaml.safe_load(bag_file.read_text()) or {}
        sigs = list(bag.get("models", []))
        files = [f for sig in sigs for f in repo_dir.glob(f"{sig}-*.th")]
        licence = repo_dir / f"{bag_file.stem}.LICENCE.txt"
        entries.append({
            "name": bag_file.stem, "models": sigs, "weights": bag.get("weights"),
            "bytes": sum(f.stat().st_size for f in files),
            "licence": licence.read_text().strip() if licence.is_file() else "",
        })
    return entries
