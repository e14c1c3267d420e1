"""Receiving uploads straight into the data dir, so accepting one is a rename and a
rejected or aborted one leaves nothing behind."""
from __future__ import annotations

import typing as tp
from pathlib import Path

from flask import Request, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from demix.intake.uploads import CappedUploadFile


class UploadRequest(Request):
    """A request whose file parts stream to `<data_dir>/incoming/` (never into memory or
    `/tmp`), each cut off as soon as it passes the upload limit."""

    def _get_file_stream(self, total_content_length: tp.Optional[int], content_type: tp.Optional[str],
                         filename: tp.Optional[str] = None,
                         content_length: tp.Optional[int] = None) -> tp.IO[bytes]:
        services = current_app.extensions["demix"]
        stream = CappedUploadFile(services.storage.open_upload(), services.settings)
        self.__dict__.setdefault("upload_streams", []).append(stream)
        return tp.cast(tp.IO[bytes], stream)


def refuse_oversized_body() -> None:
    """Refuse a request whose Content-Length is over its limit (413), before anything else
    is checked: a body that will not be read needs no room on the disk.

    Raises:
        RequestEntityTooLarge: the API's error handler names the limit.
    """
    limit = request.max_content_length
    if request.content_length is not None and limit is not None and request.content_length > limit:
        raise RequestEntityTooLarge()


def upload_path(file_storage: tp.Any) -> Path:
    """The on-disk path of a received file part, flushed and closed."""
    stream = file_storage.stream
    stream.flush()
    stream.close()
    return Path(stream.name)


def discard_unclaimed_uploads(_exc: tp.Optional[BaseException] = None) -> None:
    """After every request: delete upload files no job claimed (rejected, aborted, extra parts)."""
    for stream in request.__dict__.get("upload_streams", []):
        stream.close()  # a part cut off mid-stream is still open
        Path(stream.name).unlink(missing_ok=True)
