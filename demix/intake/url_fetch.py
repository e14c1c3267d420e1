"""Fetching a `url` job's input: streamed to a file, bounded like an upload and in wall time,
every hop of every redirect held to the private-address rule (`demix.outbound`).

The network is read on a helper thread, a read taking whatever has arrived; the caller's
thread writes what comes and, at least every `CHECK_INTERVAL_S` whatever the server does
(nothing at all, a byte at a time, its headers a byte at a time), checks the deadline and
whether it must stop. Stopping aborts the session, which wakes the helper thread."""
from __future__ import annotations

import http.client
import logging
import queue
import socket
import threading
import time
import typing as tp
import urllib.parse

import requests
import urllib3

from demix.config import Settings
from demix.errors import DemixError, FetchFailed, UploadTooLarge
from demix.outbound import OutboundSession, check_url_syntax, connection_refusal, outbound_session

log = logging.getLogger(__name__)

READ_BYTES = 64 * 1024
"""Most bytes one read takes; a read returns what has arrived, up to this."""

CHECK_INTERVAL_S = 0.5
"""Longest the fetch waits on the network before it checks its deadline and whether to stop."""

QUEUED_READS = 16
"""Reads the network thread may be ahead of the file writes (at most 1 MiB held)."""

READER_EXIT_S = 5.0
"""How long a stopped fetch waits for its network thread to notice."""

ProgressCallback = tp.Callable[[int, tp.Optional[int]], None]
"""Called with (bytes received, total bytes or None while unknown) as a fetch goes."""


class _Stopped(Exception):
    """The fetch stopped: its network thread has nobody to hand anything to."""


def fetch_url(url: str, file: tp.BinaryIO, settings: Settings,
              progress: tp.Optional[ProgressCallback] = None,
              check_interrupted: tp.Optional[tp.Callable[[], None]] = None) -> int:
    """Download `url` into `file`; returns the bytes written.

    Redirects are followed up to `DEMIX_URL_MAX_REDIRECTS`, each hop held to the rule. The
    whole fetch takes at most `DEMIX_URL_DEADLINE_S`, and the server may stay silent at most
    `DEMIX_URL_TIMEOUT_S` at a time.

    Args:
        progress: called once the answer's headers are in, then as bytes arrive.
        check_interrupted: called at least every `CHECK_INTERVAL_S` while the fetch runs;
            what it raises stops the fetch and is raised (a worker passes its lease's check).

    Raises:
        AddressNotAllowed: a hop names or resolves to a non-public address.
        UploadTooLarge: the body is (or announces itself as) over `DEMIX_MAX_UPLOAD_MB`.
        FetchFailed: anything else: an error status, a timeout, the deadline, too many
            redirects, an answer that is not valid HTTP.
    """
    deadline = time.monotonic() + settings.url_deadline_s
    events: queue.Queue = queue.Queue(QUEUED_READS)
    stopped = threading.Event()
    with outbound_session(settings.allow_private_urls) as session:
        reader = threading.Thread(target=_download, args=(session, url, settings, events, stopped),
                                  name="url-fetch", daemon=True)
        reader.start()
        try:
            return _receive(events, file, settings, deadline, progress, check_interrupted)
        finally:
            stopped.set()
            session.abort()
            reader.join(READER_EXIT_S)
            if reader.is_alive():  # a host name still resolving: it ends when the lookup does
                log.warning("fetching %s: the network thread is still busy after the fetch stopped",
                            _short(url))


def _receive(events: queue.Queue, file: tp.BinaryIO, settings: Settings, deadline: float,
             progress: tp.Optional[ProgressCallback],
             check_interrupted: tp.Optional[tp.Callable[[], None]]) -> int:
    """The caller's side: write what the network thread hands over, and check."""
    limit = settings.max_upload_bytes
    total: tp.Optional[int] = None
    received = 0
    while True:
        if check_interrupted is not None:
            check_interrupted()
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchFailed(f"fetching took longer than {settings.url_deadline_s:g} s "
                              "(DEMIX_URL_DEADLINE_S); gave up")
        try:
            kind, value = events.get(timeout=min(CHECK_INTERVAL_S, left))
        except queue.Empty:
            continue
        if kind == "failed":
            raise value
        if kind == "headers":
            total = value
            if total is not None and total > limit:
                raise _too_large(settings)
        elif kind == "data":
            received += len(value)
            if received > limit:
                raise _too_large(settings)
            file.write(value)
        else:  # the end of the body
            if total is not None and received < total:
                raise FetchFailed(f"the server sent {received} of the {total} bytes it announced")
            return received
        if progress is not None:
            progress(received, total)


def _download(session: OutboundSession, url: str, settings: Settings, events: queue.Queue,
              stopped: threading.Event) -> None:
    """The network thread: follow redirects, then hand over ("headers", total or None),
    ("data", bytes) for each read and ("end", None); or ("failed", the error to raise)."""

    def hand_over(kind: str, value: tp.Any) -> None:
        while not stopped.is_set():
            try:
                events.put((kind, value), timeout=CHECK_INTERVAL_S)
                return
            except queue.Full:
                continue
        raise _Stopped

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
                announced = response.headers.get("Content-Length")
                hand_over("headers", int(announced) if announced and announced.isdigit() else None)
                # read1 returns what has arrived: a trickle is seen byte by byte, not per full buffer.
                while chunk := response.raw.read1(READ_BYTES, decode_content=True):
                    hand_over("data", chunk)
                hand_over("end", None)
                return
        raise FetchFailed(f"fetching {_short(url)} failed: more than {settings.url_max_redirects} "
                          "redirects (DEMIX_URL_MAX_REDIRECTS)")
    except _Stopped:
        return
    except Exception as exc:  # noqa: BLE001 - handed to the caller's thread, which raises it
        if stopped.is_set():
            return  # the caller aborted the session: this is what that looks like from here
        try:
            hand_over("failed", _failure(exc, current))
        except _Stopped:
            pass


def _failure(exc: Exception, url: str) -> Exception:
    """What the caller raises for `exc`, met while fetching `url`."""
    if isinstance(exc, DemixError):
        return exc
    refusal = connection_refusal(exc)
    if refusal is not None:
        return refusal
    if isinstance(exc, (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                        OSError)):
        return FetchFailed(f"fetching {_short(url)} failed: {_reason(exc)}")
    return exc


def _too_large(settings: Settings) -> UploadTooLarge:
    return UploadTooLarge(f"the file at the URL is larger than the {settings.max_upload_mb} MiB limit "
                          "(DEMIX_MAX_UPLOAD_MB)")


def _short(url: str) -> str:
    return url if len(url) <= 200 else url[:197] + "..."


def _reason(exc: BaseException) -> str:
    chain = _exception_chain(exc)
    if any(isinstance(link, (requests.Timeout, urllib3.exceptions.TimeoutError, socket.timeout))
           for link in chain):
        return "the server did not answer in time (DEMIX_URL_TIMEOUT_S)"
    for link in chain:
        # http.client's limits on an answer's head, which requests reports as a connection error.
        if isinstance(link, http.client.LineTooLong):
            return "the server sent a status or header line longer than 64 KiB"
        if isinstance(link, http.client.RemoteDisconnected):
            return "the server closed the connection without answering"
        if isinstance(link, http.client.IncompleteRead):
            return "the server closed the connection before the end of the body"
        if type(link) is http.client.HTTPException and "more than" in str(link) and "headers" in str(link):
            return "the server sent more than 100 headers"  # http.client's fixed limit
        if isinstance(link, http.client.HTTPException):
            return f"the server's answer is not valid HTTP ({type(link).__name__})"
    if any(isinstance(link, (requests.ConnectionError, urllib3.exceptions.NewConnectionError))
           for link in chain):
        return f"could not connect ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}"


def _exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and every exception it wraps (as an argument, a `reason`, a cause or context)."""
    found: list[BaseException] = []
    pending = [exc]
    while pending:
        current = pending.pop()
        if any(current is seen for seen in found):
            continue
        found.append(current)
        pending += [arg for arg in getattr(current, "args", ()) if isinstance(arg, BaseException)]
        pending += [link for link in (getattr(current, "reason", None), current.__cause__, current.__context__)
                    if isinstance(link, BaseException)]
    return found
