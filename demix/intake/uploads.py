"""Staging an upload in storage before it becomes a job, for every door alike: bounded by
`DEMIX_MAX_UPLOAD_MB` while it streams, refused when the disk is low on room."""
from __future__ import annotations

import typing as tp
from pathlib import Path

from demix.config import Settings
from demix.errors import InsufficientStorage, UploadTooLarge
from demix.storage.local import MIB, is_disk_full



class CappedUploadFile:
    """A file part being written to disk that refuses to grow past `DEMIX_MAX_UPLOAD_MB`.

    The request's Content-Length is checked before reading, but a chunked upload has
    none: counting here stops any upload at the limit while it streams.
    """

    def __init__(self, file: tp.BinaryIO, settings: Settings):
        self._file = file
        self._settings = settings
        self.size = 0

    @property
    def name(self) -> str:
        return self._file.name

    def write(self, data: bytes) -> int:
        """Append `data`; raises `UploadTooLarge` instead once the part passes the limit."""
        self.size += len(data)
        if self.size > self._settings.max_upload_bytes:
            raise upload_too_large(self._settings)
        try:
            return self._file.write(data)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_filled_while_receiving() from exc
            raise

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._file.seek(offset, whence)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def upload_too_large(settings: Settings) -> UploadTooLarge:
    """The error of an upload over `DEMIX_MAX_UPLOAD_MB`, wherever it is noticed (the app's
    file part, its Content-Length, the HTTP front)."""
    return UploadTooLarge(f"upload is larger than the {settings.max_upload_mb} MiB limit (DEMIX_MAX_UPLOAD_MB)")


def disk_filled_while_receiving() -> InsufficientStorage:
    """The error of an upload the disk filled up under (written by the app or spooled by the front)."""
    return InsufficientStorage("the server's disk filled up while receiving the upload; it was not kept, "
                               "try again later")


def ensure_room_for_upload(services, incoming_bytes: int = 0) -> None:
    """Refuse an upload when the data dir's free space, less `incoming_bytes` still to be
    written, is under `DEMIX_MIN_FREE_MB`.

    Raises:
        InsufficientStorage: not enough room (507); the message says how much there is.
    """
    settings = services.settings
    if settings.min_free_mb <= 0:
        return
    free = services.storage.free_bytes()
    if free - incoming_bytes < settings.min_free_bytes:
        needed = f"{settings.min_free_mb} MiB free (DEMIX_MIN_FREE_MB)"
        if incoming_bytes:
            needed += f" plus the upload's {incoming_bytes / MIB:.1f} MiB"
        raise InsufficientStorage(
            f"the server is low on disk space: {free / MIB:.0f} MiB free under DEMIX_DATA_DIR, "
            f"it keeps at least {needed}; the upload was not kept, try again later",
            details={"free_mb": free // MIB, "min_free_mb": settings.min_free_mb})




def stage_upload_bytes(services, audio: bytes, field: str = "upload") -> Path:
    """Write an upload held in memory (a gRPC message's bytes) to a staged upload file, as
    an HTTP upload streams to one; returns its path. The caller claims it or deletes it.

    Raises:
        UploadTooLarge: over `DEMIX_MAX_UPLOAD_MB` (413).
        InsufficientStorage: the disk lacks room for it (507).
    """
    settings = services.settings
    if len(audio) > settings.max_upload_bytes:
        raise UploadTooLarge(f"{field} is larger than the {settings.max_upload_mb} MiB limit "
                             "(DEMIX_MAX_UPLOAD_MB)")
    ensure_room_for_upload(services, len(audio))
    upload = CappedUploadFile(services.storage.open_upload(), settings)
    try:
        upload.write(audio)
    except BaseException:
        upload.close()
        Path(upload.name).unlink(missing_ok=True)
        raise
    upload.close()
    return Path(upload.name)
