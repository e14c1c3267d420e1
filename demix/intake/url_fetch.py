"""Fetching a `url` job's input: streamed to a file, bounded like an upload, every hop of
every redirect held to the private-address rule (`demix.outbound`)."""
from __future__ import annotations

import time
import typing as tp
import urllib.parse

import requests

from demix.config import Settings
from demix.errors import DemixError, FetchFailed, UploadTooLarge
from demix.outbound import check_url_syntax, connection_refusal, outbound_session

CHUNK_BYTES = 1 << 20
"""Bytes read and written per step of a fetch."""

FETCH_DEADLINE_S = 3600.0
"""Longest a whole fetch may take, however steadily the server trickles."""

ProgressCallback = tp.Callable[[int, tp.Optional[int]], None]
"""Called with (bytes received, total bytes or None while unknown) as a fetch goes."""


def fetch_url(url: str, file: tp.BinaryIO, settings: Settings,
              progress: tp.Optional[ProgressCallback] = None) -> int:
    """Download `url` into `file`; returns the bytes written.

    Redirects are followed up to `DEMIX_URL_MAX_REDIRECTS`, each target checked again.

    Raises:
        AddressNotAllowed: a hop names or resolves to a non-public address (each connection
            resolves its host once and checks every address before connecting).
        UploadTooLarge: the body is (or announces itself as) over `DEMIX_MAX_UPLOAD_MB`.
        FetchFailed: anything else: an error status, a timeout, too many redirects.
    """
    with outbound_session(settings.allow_private_urls) as session:
        deadline = time.monotonic() + FETCH_DEADLINE_S
        current = url
        try:
            for _hop in range(settings.url_max_redirects + 1):
                with session.get(current, stream=True, allow_redirects=False,
                                 timeout=(settings.url_timeout_s, settings.url_timeout_s),
                                 headers={"User-Agent": "demix", "Accept-Encoding": "identity"}) as response:
                    if response.is_redirect:
                        current = check_url_syntax(urllib.parse.urljoin(current, response.headers["Location"]), "url")
                        continue
                    if not 200 <= response.status_code < 300:
                        raise FetchFailed(f"fetching {_short(current)} failed: the server answered "
                                          f"HTTP {response.status_code} {response.reason or ''}".rstrip())
                    return _save_body(response, file, settings, deadline, progress)
            raise FetchFailed(f"fetching {_short(url)} failed: more than {settings.url_max_redirects} "
                              "redirects (DEMIX_URL_MAX_REDIRECTS)")
        except DemixError:
            raise
        except (requests.RequestException, OSError) as exc:
            refusal = connection_refusal(exc)
            if refusal is not None:
                raise refusal from None
            raise FetchFailed(f"fetching {_short(current)} failed: {_reason(exc)}") from None


def _save_body(response: requests.Response, file: tp.BinaryIO, settings: Settings, deadline: float,
               progress: tp.Optional[ProgressCallback]) -> int:
    limit = settings.max_upload_bytes
    announced = response.headers.get("Content-Length")
    total = int(announced) if announced and announced.isdigit() else None
    if total is not None and total > limit:
        raise _too_large(settings)
    received = 0
    if progress is not None:
        progress(0, total)
    for chunk in response.iter_content(CHUNK_BYTES):
        received += len(chunk)
        if received > limit:
            raise _too_large(settings)
        if time.monotonic() > deadline:
            raise FetchFailed(f"fetching took longer than {FETCH_DEADLINE_S:.0f} s; gave up")
        file.write(chunk)
        if progress is not None:
            progress(received, total)
    if total is not None and received < total:
        raise FetchFailed(f"the server sent {received} of the {total} bytes it announced")
    return received


def _too_large(settings: Settings) -> UploadTooLarge:
    return UploadTooLarge(f"the file at the URL is larger than the {settings.max_upload_mb} MiB limit "
                          "(DEMIX_MAX_UPLOAD_MB)")


def _short(url: str) -> str:
    return url if len(url) <= 200 else url[:197] + "..."


def _reason(exc: BaseException) -> str:
    if isinstance(exc, requests.Timeout):
        return "the server did not answer in time (DEMIX_URL_TIMEOUT_S)"
    if isinstance(exc, requests.ConnectionError):
        return f"could not connect ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"
