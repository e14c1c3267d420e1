"""Answers a request gets from its headers alone, before its body is read.

The HTTP front (`demix.api.front`) receives a whole request before the app sees it, so on
its own an upload the app would refuse (no API key, a repeated `Idempotency-Key`, a full
disk) would be received to the last byte first. For a request whose body is still coming,
the front asks `answer_from_headers` (in a thread of its own, as it may ask Redis) and, if
there is an answer, sends it at once and stops reading: the same answer the app gives
when the whole request reaches it, since both run the same checks.
"""
from __future__ import annotations

import logging
import typing as tp

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from demix.errors import DemixError

log = logging.getLogger(__name__)


def _before_upload() -> tp.Optional[Response]:
    from demix.api.job_views import answer_before_upload
    return answer_before_upload()


BEFORE_BODY: dict[str, tp.Callable[[], tp.Optional[Response]]] = {"jobs.create_job": _before_upload}
"""The views whose first checks need no body, by endpoint: the checks, answering None
when the body decides."""


def answer_from_headers(app: Flask, environ: dict) -> tp.Optional[Response]:
    """The app's answer to the request `environ` describes (its body not there: `wsgi.input`
    empty), when its headers alone decide it: a failed authentication (`before_request`)
    or one of `BEFORE_BODY`'s checks. None: the body is needed, the app answers later."""
    with app.request_context(environ):
        try:
            answer = app.preprocess_request()
            if answer is None:
                check = BEFORE_BODY.get(request.endpoint or "")
                answer = check() if check is not None else None
        except (DemixError, HTTPException) as exc:
            answer = app.handle_user_exception(exc)  # the app's own JSON error
        except Exception:  # e.g. Redis down: the app, given the whole request, says so
            log.warning("answering a request from its headers failed; the app will answer it", exc_info=True)
            return None
        return None if answer is None else app.make_response(answer)
