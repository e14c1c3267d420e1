"""Uploads and stems on disk, under `DEMIX_DATA_DIR`: one folder per job.

    <data_dir>/incoming/          uploads still being received (same filesystem, so
                                  accepting one is a rename, never a copy)
    <data_dir>/jobs/<id>/input.wav
    <data_dir>/jobs/<id>/stems-<attempt>/<name>.<wav|flac|mp3>
    <data_dir>/jobs/<id>/split-<attempt>/   a split job's mix, plan and parts, while it runs

Each run (attempt) of a job writes its own stem folder, and the job record names the
attempt whose stems are the job's: a late run of a worker presumed dead can never
replace or corrupt the stems of the run that replaced it.

Files become visible under their final name only when complete (`shared.atomic`:
written under a hidden temporary name, flushed, renamed), so no reader ever sees half a
file.
"""
from __future__ import annotations

import errno
import logging
import shutil
import tempfile
import time
import typing as tp
from pathlib import Path

from .atomic import PendingFile, publish_file
from .errors import DiskFull

log = logging.getLogger(__name__)

DEFAULT_EXTENSION = "wav"

DELETE_TRIES = 20
"""Attempts at removing a job's folder while a worker may still be writing into it."""

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
"""`OSError` numbers meaning "no room left": the disk is full, or the user's quota is."""


class JobStorage:
    """Knows where each job's files live and moves them there atomically."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def incoming_dir(self) -> Path:
        return self.root / "incoming"

    def job_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def input_path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "input.wav"

    def stems_dir(self, job_id: str, attempt: int) -> Path:
        """The stem folder of one attempt (0: jobs recorded before attempts existed)."""
        return self.job_dir(job_id) / (f"stems-{attempt}" if attempt else "stems")

    def stem_path(self, job_id: str, name: str, extension: str = DEFAULT_EXTENSION,
                  attempt: int = 0) -> Path:
        return self.stems_dir(job_id, attempt) / f"{name}.{extension}"

    def split_dir(self, job_id: str, attempt: int) -> Path:
        """The working folder of one attempt of a split job: its model-rate mix, its plan
        and its parts' sums (removed when the job finishes)."""
        return self.job_dir(job_id) / f"split-{attempt}"

    def make_split_dir(self, job_id: str, attempt: int) -> Path:
        """Create attempt `attempt`'s split folder (its files are written with `shared.atomic`).

        Raises:
            FileNotFoundError: the job's folder is gone (the job was deleted or cancelled).
        """
        # Not `parents=True`: a run that outlived its job's deletion must not recreate its folder.
        folder = self.split_dir(job_id, attempt)
        folder.mkdir(exist_ok=True)
        return folder

    def clear_split(self, job_id: str, attempt: int) -> None:
        """Remove one attempt's split folder (finished or partial)."""
        shutil.rmtree(self.split_dir(job_id, attempt), ignore_errors=True)

    def open_upload(self) -> tp.BinaryIO:
        """A new temporary file in `incoming/` to stream an upload into.

        The caller `accept_upload`s it; the API deletes unclaimed ones after each request.
        """
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        return tempfile.NamedTemporaryFile(dir=self.incoming_dir, prefix="upload-", suffix=".part",
                                           delete=False)

    def accept_upload(self, upload_path: Path, job_id: str) -> Path:
        """Move a complete upload into its job's folder; returns the input's final path."""
        target = self.input_path(job_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        return publish_file(Path(upload_path), target)

    def pending_stem(self, job_id: str, name: str, extension: str = DEFAULT_EXTENSION,
                     attempt: int = 0) -> PendingFile:
        """A stem file of attempt `attempt` to write under a temporary name; `commit()` publishes it.

        Raises:
            FileNotFoundError: the job's folder is gone (the job was deleted or cancelled).
        """
        # Not `parents=True`: a run that outlived its job's deletion must not recreate its folder.
        self.stems_dir(job_id, attempt).mkdir(exist_ok=True)
        return PendingFile(self.stem_path(job_id, name, extension, attempt))

    def attempts_on_disk(self, job_id: str) -> list[int]:
        """Attempts that have a stem folder (0: a folder from before attempts existed)."""
        found = []
        for path in self.job_dir(job_id).glob("stems*"):
            suffix = path.name[len("stems-"):] if path.name.startswith("stems-") else ""
            if path.name == "stems":
                found.append(0)
            elif suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    def clear_stems(self, job_id: str, attempt: int) -> None:
        """Remove one attempt's stems (finished or partial)."""
        shutil.rmtree(self.stems_dir(job_id, attempt), ignore_errors=True)

    def clear_other_attempts(self, job_id: str, keep: int) -> None:
        """Remove the stem and split folders of every attempt but `keep` (leftovers of lost runs)."""
        for attempt in self.attempts_on_disk(job_id):
            if attempt != keep:
                self.clear_stems(job_id, attempt)
        for folder in self.job_dir(job_id).glob("split-*"):
            if folder.name[len("split-"):] != str(keep):
                shutil.rmtree(folder, ignore_errors=True)

    def delete_job(self, job_id: str) -> None:
        """Remove every file of the job: its input and all its attempts' stems.

        A worker still running the job may create a file while the tree is being removed
        (the folder is then not empty when its turn comes), so this tries again until the
        folder is gone; anything the worker writes after that it removes itself when it
        stops at its next segment.
        """
        folder = self.job_dir(job_id)
        for _ in range(DELETE_TRIES):
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                return
            time.sleep(0.05)
        log.warning("job %s: its folder %s could not be removed completely", job_id, folder)

    def free_bytes(self) -> int:
        """Free space on the filesystem holding the data dir, in bytes (for unprivileged users)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return disk_free_bytes(self.root)


def disk_free_bytes(path: Path) -> int:
    """Bytes an unprivileged process can still write on `path`'s filesystem."""
    return shutil.disk_usage(path).free


def is_disk_full(exc: tp.Optional[BaseException]) -> bool:
    """Whether `exc` (or an exception it was raised from) is `OSError(ENOSPC/EDQUOT)`
    (audio writers raise it too: `shared.audio.disk_full_as_os_error`)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def disk_full_error(exc: BaseException) -> tp.Optional[DiskFull]:
    """The `disk_full` job error for an exception caused by a full disk, else None."""
    if not is_disk_full(exc):
        return None
    return DiskFull("the disk holding DEMIX_DATA_DIR filled up while the stems were written; "
                    "no partial stems were kept. Free some space and submit the job again.")
