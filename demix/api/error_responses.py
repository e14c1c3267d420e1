"""The one error-to-HTTP mapping: every error leaves as `{"error": {"code", "message"}}`."""
from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from demix.errors import DemixError

from demix.api.upload_requests import body_too_large

log = logging.getLogger(__name__)


def error_response(http_status: int, code: str, message: str, **extra):
    body = {"error": {"code": code, "message": message, **extra}}
    return jsonify(body), http_status


def register(app: Flask) -> None:
    @app.errorhandler(DemixError)
    def demix_error(exc: DemixError):
        body, status = error_response(exc.http_status, exc.code, exc.message, **exc.details)
        body.headers.update(exc.headers)
        return body, status

    @app.errorhandler(RequestEntityTooLarge)
    def too_large(_exc: RequestEntityTooLarge):
        err = body_too_large(app.config["SETTINGS"])
        return error_response(err.http_status, err.code, err.message)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        body, status = error_response(exc.code or 500, code, exc.description or exc.name)
        # Keep what the exception says besides its body (`Allow` of a 405, for one).
        body.headers.extend((name, value) for name, value in exc.get_headers() if name.lower() != "content-type")
        return body, status

    _register_backend_errors(app)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")


def _register_backend_errors(app: Flask) -> None:
    import redis
    from kombu.exceptions import OperationalError

    @app.errorhandler(redis.exceptions.ConnectionError)
    @app.errorhandler(redis.exceptions.TimeoutError)
    @app.errorhandler(OperationalError)
    def backend_down(exc: Exception):
        log.error("backend unavailable: %s", exc)
        return error_response(503, "service_unavailable",
                              "the job store or queue (Redis) is unreachable; try again shortly")
