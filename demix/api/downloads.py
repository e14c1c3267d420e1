"""Sending a stored file (a stem) to a client: from the local disk, as a redirect to a
presigned bucket URL (`DEMIX_S3_PRESIGN=1`), or streamed from the bucket with range
support."""
from __future__ import annotations

from flask import Response, redirect, request, send_file, stream_with_context

from demix.storage.local import StoredFile


def send_stored_file(stored: StoredFile, mimetype: str, download_name: str):
    """The response serving `stored` as an attachment named `download_name`."""
    if stored.local_path is not None:
        return send_file(stored.local_path, mimetype=mimetype, as_attachment=True,
                         download_name=download_name, conditional=True)
    url = stored.presigned_url(download_name, mimetype)
    if url is not None:
        return redirect(url, code=302)
    size = stored.size()
    start, stop, status = 0, size, 200
    wanted = request.range
    if wanted is not None and wanted.units == "bytes":
        bounds = wanted.range_for_length(size)
        if bounds is None:
            response = Response(status=416)
            response.headers["Content-Range"] = f"bytes */{size}"
            return response
        (start, stop), status = bounds, 206
    response = Response(stream_with_context(stored.read_range(start, stop)), status=status, mimetype=mimetype,
                        direct_passthrough=True)
    response.headers["Content-Length"] = str(stop - start)
    response.headers["Accept-Ranges"] = "bytes"
    response.headers["Content-Disposition"] = f'attachment; filename="{download_name}"'
    if status == 206:
        response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    return response
