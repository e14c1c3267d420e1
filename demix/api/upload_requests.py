"""Receiving uploads straight into the data dir, so accepting one is a rename and a
rejected or aborted one leaves nothing behind."""
from __future__ import annotations

import json
import typing as tp
from pathlib import Path

from flask import Request, current_app, request
from werkzeug.datastructures import Headers
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser, MultiPartParser
from werkzeug.sansio.multipart import File

from demix.config import Settings
from demix.errors import BadRequest, DemixError, FormFieldTooLarge, TooManyFormParts
from demix.intake.job_request import WORKFLOW_FIELD
from demix.intake.uploads import CappedUploadFile, upload_too_large

MULTIPART = "multipart/form-data"
URLENCODED = "application/x-www-form-urlencoded"
JSON = "application/json"

MAX_FORM_PARTS = 100
"""Most parts of a multipart form the API reads. A job's form has a dozen fields; each file
part opens an upload file, so this also bounds the files one request holds open."""

MAX_FORM_FIELD_BYTES = 500_000
"""Largest text field of a multipart form (and largest block of a part's headers), in bytes,
and largest urlencoded body (text fields only, read whole): Werkzeug's default,
made explicit. The longest field, a URL, is at most 2048 characters; it must stay well above
the parser's 64 KiB reads, which it also bounds."""


class _LimitNamingMultiPartParser(MultiPartParser):
    """Werkzeug's multipart parser, telling apart the limits it enforces with one exception
    (`RequestEntityTooLarge`): too many parts, a text field too large, or the body itself."""

    def __init__(self, *args: tp.Any, max_body_bytes: tp.Optional[int], **kwargs: tp.Any):
        super().__init__(*args, **kwargs)
        self.max_body_bytes = max_body_bytes
        self.parts_read = 0

    def get_part_charset(self, headers: Headers) -> str:
        self.parts_read += 1  # asked once for each text field, when it is complete
        return super().get_part_charset(headers)

    def start_file_streaming(self, event: File, total_content_length: tp.Optional[int]) -> tp.IO[bytes]:
        self.parts_read += 1
        return super().start_file_streaming(event, total_content_length)

    def parse(self, stream: tp.IO[bytes], boundary: bytes, content_length: tp.Optional[int]) -> tp.Any:
        counted = _CountingReader(stream)
        try:
            return super().parse(tp.cast(tp.IO[bytes], counted), boundary, content_length)
        except RequestEntityTooLarge:
            if self.max_body_bytes is not None and counted.bytes_read >= self.max_body_bytes:
                raise  # a body without Content-Length ran past the request's limit
            if self.max_form_parts is not None and self.parts_read >= self.max_form_parts:
                # Every part before the one over the limit is complete when it is refused.
                raise TooManyFormParts(
                    f"the form has more than {self.max_form_parts} parts, the most the API reads; "
                    "a job takes the file part 'file' and the text fields /docs lists") from None
            raise FormFieldTooLarge(_field_limit_message(self.max_form_memory_size)) from None


class _CountingReader:
    """A stream's `read`, counting the bytes it returned."""

    def __init__(self, stream: tp.IO[bytes]):
        self._stream = stream
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.bytes_read += len(data)
        return data


class _FormParser(FormDataParser):
    def _parse_multipart(self, stream: tp.IO[bytes], mimetype: str, content_length: tp.Optional[int],
                         options: dict[str, str]) -> tp.Any:
        parser = _LimitNamingMultiPartParser(
            stream_factory=self.stream_factory, max_form_memory_size=self.max_form_memory_size,
            max_form_parts=self.max_form_parts, cls=self.cls, max_body_bytes=self.max_content_length)
        boundary = options.get("boundary", "").encode("ascii")
        if not boundary:
            raise ValueError("Missing boundary")
        form, files = parser.parse(stream, boundary, content_length)
        return stream, form, files


def _field_limit_message(limit: tp.Optional[int]) -> str:
    return (f"a text field of the form (or a part's headers) is larger than {limit} bytes, the most "
            "the API holds in memory for one; the audio goes in the multipart file part 'file'")


class UploadRequest(Request):
    """A request whose file parts stream to `<data_dir>/incoming/` (never into memory or
    `/tmp`), each cut off as soon as it passes the upload limit; a form over one of the
    parser's limits is refused with the error naming that limit."""

    form_data_parser_class = _FormParser

    @property  # type: ignore[override]
    def max_content_length(self) -> tp.Optional[int]:
        """The app's limit; an urlencoded or JSON body (text fields alone) is read whole into
        memory, so it gets the text field limit."""
        limit = super().max_content_length
        if self.mimetype not in (URLENCODED, JSON) or limit is None:
            return limit
        return min(limit, self.max_form_memory_size or limit)

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
        RequestEntityTooLarge: turned into the limit's own error by `body_too_large`.
    """
    limit = request.max_content_length
    if request.content_length is not None and limit is not None and request.content_length > limit:
        raise RequestEntityTooLarge()


def body_too_large(settings: Settings) -> DemixError:
    """The error for a request body over `max_content_length`: an upload over
    DEMIX_MAX_UPLOAD_MB, or an urlencoded body (text fields alone) over the text field limit."""
    if request.mimetype in (URLENCODED, JSON):
        return FormFieldTooLarge(
            f"an {request.mimetype} body holds text fields only, at most {request.max_content_length} "
            f"bytes; send the audio as the file part 'file' of a {MULTIPART} body")
    return upload_too_large(settings)


def json_body_fields() -> dict[str, str]:
    """A JSON body's fields as the form's: an object of strings, numbers or booleans, and the
    `workflow` as JSON text when it is an object (a JSON body carries no file: `url` inputs).

    Raises:
        BadRequest: (`invalid_json`) the body is not such an object.
    """
    try:
        body = json.loads(request.get_data(cache=False) or b"null")
    except ValueError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("a JSON body is an object of the job's fields, e.g. {\"url\": ..., \"preset\": ...}",
                         code="invalid_json")
    fields = {}
    for name, value in body.items():
        if name == WORKFLOW_FIELD and isinstance(value, dict):
            fields[name] = json.dumps(value)
        elif isinstance(value, bool):
            fields[name] = "true" if value else "false"
        elif isinstance(value, (str, int, float)):
            fields[name] = str(value)
        elif value is not None:
            raise BadRequest(f"{name}: expected a string or a number, not {type(value).__name__}",
                             code="invalid_json", details={"field": name})
    return fields


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
