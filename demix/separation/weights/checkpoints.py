"""RoFormer checkpoints in the local model cache: `demix models add` (a checkpoint and
MSST config you have) and `demix models pull` (a well-known public one, downloaded).

Either way the config is read and the checkpoint loaded into its network before anything
is kept, both files are copied into the cache as `<name>.ckpt` and `<name>.config.yml` (not
`.yaml`: demucs reads every `*.yaml` of a model folder as one of its bags), and the
manifest `<name>.model.json` records the architecture, sources, sample rate, origin,
licence note and the checkpoint's sha256 (`demix.catalogue`); the worker checks that
sha256 when it loads the model. Weights never go into the repository.
"""
from __future__ import annotations

import hashlib
import typing as tp
from pathlib import Path

from demix.atomic_files import atomic_open
from demix.catalogue import KNOWN_MODELS, Download, ModelInfo, write_manifest

from demix.separation.weights.download import CHUNK_BYTES, Progress, download_resumable
from demix.separation.weights.pull_errors import WeightsError


class CheckpointError(WeightsError):
    """A checkpoint or config cannot be added: unreadable, unsupported or not matching."""


def add_checkpoint(name: str, checkpoint: Path, config: Path, models_dir: Path, *,
                   architecture: tp.Optional[str] = None, origin: str = "", licence: str = "",
                   sha256: tp.Optional[str] = None) -> ModelInfo:
    """Check that `checkpoint` loads into the network of the MSST `config`, copy both into
    `models_dir` and write the manifest of model `name`; returns it.

    `architecture` (`bs_roformer` or `mel_band_roformer`) is inferred from the config when
    not given; `sha256`, when given, must be the checkpoint's.

    Raises:
        CheckpointError: a file is missing, the config or checkpoint does not load, or the
            checkpoint's sha256 is not `sha256`.
    """
    from demix.separation.roformer import RoformerCheckpointError, RoformerConfigError, load_model

    if not name or "/" in name or name.startswith("."):
        raise CheckpointError(f"model name {name!r} must be a plain file name")
    for path in (checkpoint, config):
        if not Path(path).is_file():
            raise CheckpointError(f"{path} is not a file")
    try:
        model = load_model(Path(checkpoint), Path(config), architecture)
    except (RoformerConfigError, RoformerCheckpointError) as exc:
        raise CheckpointError(f"model {name!r}: {exc}") from None
    models_dir.mkdir(parents=True, exist_ok=True)
    digest = _copy(Path(checkpoint), models_dir / f"{name}.ckpt")
    if sha256 is not None and digest != sha256.lower():
        (models_dir / f"{name}.ckpt").unlink()
        raise CheckpointError(f"{checkpoint} has sha256 {digest}, not {sha256}")
    _copy(Path(config), models_dir / f"{name}.config.yml")
    info = ModelInfo(name=name, architecture=model.config.architecture, sources=tuple(model.sources),
                     samplerate=int(model.samplerate), origin=origin or f"added from {Path(checkpoint).resolve()}",
                     licence=licence or "not recorded (added by hand: see where the checkpoint came from)",
                     checkpoint=f"{name}.ckpt", config=f"{name}.config.yml", sha256=digest)
    write_manifest(models_dir, info)
    return info


def _copy(source: Path, dest: Path) -> str:
    """Copy `source` to `dest` (atomically); returns the sha256 of what was copied."""
    digest = hashlib.sha256()
    with open(source, "rb") as reader, atomic_open(dest) as writer:
        while chunk := reader.read(CHUNK_BYTES):
            digest.update(chunk)
            writer.write(chunk)
    return digest.hexdigest()


def pullable(name: str) -> tp.Optional[ModelInfo]:
    """The built-in entry of a checkpoint `demix models pull` can download, if `name` is one."""
    info = KNOWN_MODELS.get(name)
    return info if info is not None and info.download is not None else None


def pull_checkpoint(name: str, models_dir: Path, downloads_dir: Path, *, download: tp.Optional[Download] = None,
                    progress: tp.Optional[Progress] = None, log: tp.Callable[[str], None] = print) -> ModelInfo:
    """Download the well-known checkpoint `name` and its config (resuming a download a
    broken connection left in `downloads_dir`), check the checkpoint's sha256 when it is
    pinned, and add it to `models_dir` (see `add_checkpoint`); returns its manifest.

    `download` replaces the built-in URLs and sha256 (a mirror, or a local copy to test with).

    Raises:
        CheckpointError: `name` is not a known checkpoint, or what came does not load.
        DownloadError, ChecksumError: the download failed or is not the published file.
    """
    known = pullable(name)
    if known is None:
        choices = ", ".join(sorted(n for n, info in KNOWN_MODELS.items() if info.download))
        raise CheckpointError(f"{name!r} is not a checkpoint `demix models pull` knows ({choices}); "
                              "add your own with `demix models add NAME --checkpoint PATH --config PATH`")
    source = download or known.download
    assert source is not None
    log(f"model {name}: {known.licence}")
    downloads_dir.mkdir(parents=True, exist_ok=True)
    config = downloads_dir / f"{name}.yaml"
    checkpoint = downloads_dir / f"{name}.ckpt"
    log(f"downloading {source.config_url}")
    download_resumable(source.config_url, config)
    log(f"downloading {source.checkpoint_url}")
    digest = download_resumable(source.checkpoint_url, checkpoint, progress, sha256=source.sha256)
    log(f"sha256 {digest}" + (" (matches the pinned value)" if source.sha256 else
                              " (recorded now: no published sha256 is pinned for it)"))
    try:
        info = add_checkpoint(name, checkpoint, config, models_dir, architecture=known.architecture,
                              origin=f"{known.origin}; downloaded from {source.checkpoint_url}",
                              licence=known.licence, sha256=digest)
    finally:
        for path in (checkpoint, config):
            path.unlink(missing_ok=True)
    return info
