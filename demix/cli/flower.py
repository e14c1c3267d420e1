"""Flower behind the same door as the API: with API keys configured, Flower asks for its own
login (`DEMIX_FLOWER_AUTH`, Flower's HTTP basic auth), or listens on 127.0.0.1 only.

Flower lists every job's id and task arguments, whoever submitted them: with API keys it
must not be open to the callers the keys keep apart. The login reaches Flower through its
environment (`FLOWER_BASIC_AUTH`), never its command line, which any local user can read.
"""
from __future__ import annotations

import base64
import typing as tp

from demix.config import Settings

LOOPBACK = "127.0.0.1"

AUTH_VARIABLE = "FLOWER_BASIC_AUTH"
"""Flower's own setting for its basic auth logins, read from its environment."""


def flower_address(settings: Settings) -> str:
    """Where Flower listens: DEMIX_HOST, or 127.0.0.1 when API keys are set and Flower has no login."""
    return LOOPBACK if settings.api_keys.strip() and not flower_logins(settings) else settings.host


def flower_limited_to_loopback(settings: Settings) -> bool:
    """Whether `flower_address` keeps Flower off DEMIX_HOST (which is not loopback already)."""
    return flower_address(settings) == LOOPBACK and settings.host != LOOPBACK


def flower_logins(settings: Settings) -> list[str]:
    """The `user:password` logins of DEMIX_FLOWER_AUTH.

    Raises:
        ValueError: one is not `user:password` with both parts non-empty (said without it).
    """
    logins = [login.strip() for login in settings.flower_auth.split(",") if login.strip()]
    for index, login in enumerate(logins, 1):
        user, _, password = login.partition(":")
        if not user or not password:
            raise ValueError(f"DEMIX_FLOWER_AUTH: login {index} is not user:password")
    return logins


def flower_environment(settings: Settings, environ: tp.Mapping[str, str]) -> dict[str, str]:
    """`environ` for the Flower process, with its logins (`FLOWER_BASIC_AUTH`) when
    DEMIX_FLOWER_AUTH has any.

    Raises:
        ValueError: DEMIX_FLOWER_AUTH is malformed.
    """
    env = dict(environ)
    logins = flower_logins(settings)
    if logins:
        env[AUTH_VARIABLE] = ",".join(logins)
    return env


def flower_authorization(settings: Settings) -> dict[str, str]:
    """Headers logging in to Flower with DEMIX_FLOWER_AUTH's first login (none without one)."""
    logins = flower_logins(settings)
    if not logins:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(logins[0].encode()).decode("ascii")}


def flower_access_note(settings: Settings) -> str:
    """How an operator reaches Flower, for `demix up`'s and `demix flower`'s log."""
    if flower_logins(settings):
        return "Flower asks for the login in DEMIX_FLOWER_AUTH"
    if flower_limited_to_loopback(settings):
        return (f"Flower listens on {LOOPBACK} only: DEMIX_API_KEYS is set and DEMIX_FLOWER_AUTH "
                "(Flower's login) is not")
    return ""
