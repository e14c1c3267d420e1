"""Uploads and stems on disk, under `DEMIX_DATA_DIR`: one folder per job.

    <data_dir>/incoming/          uploads still being received (same filesystem, so
                                  accepting one is a rename, never a copy)
    <data_dir>/jobs/<id>/input.wav
    <data_dir>/jobs/<id>/stems/<name>.<wav|flac|mp3>

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

    def stems_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "stems"

    def stem_path(self, job_id: str, name: str, extension: str = DEFAULT_EXTENSION) -> Path:
        return self.stems_dir(job_id) / f"{name}.{extension}"

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

    def temporary_stem_path(self, job_id: str, name: str, extension: str = DEFAULT_EXTENSION) -> Path:
        """Where a stem is written before `publish_stem` makes it visible."""
        directory = self.stems_dir(job_id)
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f".{name}.{extension}.part"

    def publish_stem(self, job_id: str, name: str, extension: str = DEFAULT_EXTENSION) -> Path:
        final = self.stem_path(job_id, name, extension)
        os.replace(self.temporary_stem_path(job_id, name, extension), final)
        return final

    def clear_stems(self, job_id: str) -> None:
        """Remove a job's stems (and leftovers of an interrupted attempt) before a new run."""
        shutil.rmtree(self.stems_dir(job_id), ignore_errors=True)

    def delete_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
