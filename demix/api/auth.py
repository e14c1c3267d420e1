"""The HTTP door's side of API keys (`demix.api_keys`): every `/v1` request needs a key
when keys are configured, and the request's owner is kept for the views."""
from __future__ import annotations

from flask import Flask, current_app, g, request

from demix.api_keys import OPEN_OWNER, ApiKeys

PROTECTED_PREFIX = "/v1/"
"""Paths needing a key. `/healthz`, `/metrics`, `/`, `/docs` and `/openapi.json` stay open:
they describe the service and show no one's jobs."""

REALM = "demix"

_CHALLENGES = {
    "missing": f'Bearer realm="{REALM}"',
    "invalid": f'Bearer realm="{REALM}", error="invalid_token"',
}
"""`WWW-Authenticate` (RFC 6750) by why a request's key was refused."""


def challenge_headers(why: str) -> dict[str, str]:
    """The headers of a 401, by why the key was refused ("missing" or "invalid")."""
    return {"WWW-Authenticate": _CHALLENGES[why]}


def request_owner() -> str:
    """The owner id of the current request's key (`OPEN_OWNER` without API keys).

    The seam for anything scoped per key: job ownership, active-job limits, idempotency keys.
    """
    return g.get("demix_owner", OPEN_OWNER)


def register(app: Flask) -> None:
    """Require a key on every `/v1` request when keys are configured."""
    app.before_request(authenticate)


def authenticate() -> None:
    """Resolve the request's owner from its bearer token.

    Raises:
        Unauthorized: keys are configured and the token is missing or unknown.
    """
    api_keys: ApiKeys = current_app.extensions["demix"].api_keys
    if not api_keys or not (request.path + "/").startswith(PROTECTED_PREFIX):
        return
    g.demix_owner = api_keys.authenticate(
        request.headers.get("Authorization", ""), "the header 'Authorization: Bearer <key>'",
        headers=challenge_headers)
