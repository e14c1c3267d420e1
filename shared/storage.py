"""Uploads and stems on disk, under `DEMIX_DATA_DIR`: one folder per job.

    <data_dir>/incoming/          uploads still being received (same filesystem, so
                                  accepting one is a rename, never a copy)
    <data_dir>/jobs/<id>/input.wav
    <data_dir>/jobs/<id>/stems-<attempt>/<name>.<wav|flac|mp3>
    <data_dir>/jobs/<id>/split-<attempt>/   a split job's mix, plan and parts, while it runs

Each run (attempt) of a job writes its own stem folder, and the job record names the
attempt whose stems are the job's: a late run of a worker presumed dead can never
replace or corrupt the stems of the run that replaced it.

Files become visible under their final name only when complete (write to a hidden
temporary name, then rename), so no reader ever sees half a file.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import typing as tp
from pathlib import Path

DEFAULT_EXTENSION = "wav"


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

    def clear_split(self, job_id: str, attempt: int) -> None:
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
        os.replace(upload_path, target)
        return target

    def temporary_stem_path(self, job_id: str, name: str, extension: str = DEFAULT_EXTENSION,
                            attempt: int = 0) -> Path:
        """Where a stem is written before `publish_stem` makes it visible.

        Raises:
            FileNotFoundError: the job's folder is gone (the job was deleted or cancelled).
        """
        directory = self.stems_dir(job_id, attempt)
        # Not `parents=True`: a run must not bring back the folder of a deleted job.
        directory.mkdir(exist_ok=True)
        return directory / f".{name}.{extension}.part"

    def publish_stem(self, job_id: str, name: str, extension: str = DEFAULT_EXTENSION,
                     attempt: int = 0) -> Path:
        final = self.stem_path(job_id, name, extension, attempt)
        os.replace(self.temporary_stem_path(job_id, name, extension, attempt), final)
        return final

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
        """Remove the stem folders of every attempt but `keep` (leftovers of lost runs)."""
        for attempt in self.attempts_on_disk(job_id):
            if attempt != keep:
                self.clear_stems(job_id, attempt)

    def delete_job(self, job_id: str) -> None:
        """Remove every file of the job: its input and all its attempts' stems."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
