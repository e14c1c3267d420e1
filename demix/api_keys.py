"""API keys: who may submit and see jobs, for every door (HTTP and gRPC) alike.

With `DEMIX_API_KEYS` empty the service is open, as on a private machine. With keys set,
every call needs `Authorization: Bearer <key>`. A key is known by its *owner id*, a
truncated SHA-256 of it, which is what job records store and what may appear in Redis
keys; the key itself is never stored or logged.
"""
from __future__ import annotations

import hashlib
import hmac
import typing as tp
from pathlib import Path

from demix.config import SECRET_FILE_PREFIXES
from demix.errors import Unauthorized

OWNER_ID_HEX_DIGITS = 16
"""Length of an owner id: 64 bits of the key's SHA-256, plenty to tell a deployment's keys apart."""

OPEN_OWNER = ""
"""The owner of every call (and job) when no API keys are configured."""


class ApiKeys:
    """The configured keys, matched in constant time.

    Each key is compared as its SHA-256 digest (fixed length, so the comparison's time
    does not depend on the key's length) against every configured key, with no early exit.
    """

    def __init__(self, keys: tp.Iterable[str]):
        self._owners = [(hashlib.sha256(key.encode()).digest(), owner_id(key)) for key in keys]

    def __bool__(self) -> bool:
        return bool(self._owners)

    def __len__(self) -> int:
        return len(self._owners)

    def __repr__(self) -> str:  # never the keys
        return f"ApiKeys({len(self)} keys)"

    def owner_of(self, key: str) -> tp.Optional[str]:
        """The owner id of `key`, or None when it is not one of the keys."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found = None
        for candidate, owner in self._owners:
            if hmac.compare_digest(digest, candidate):
                found = owner
        return found

    def authenticate(self, authorization: str, how_to_send: str,
                     headers: tp.Optional[tp.Callable[[str], dict]] = None) -> str:
        """The owner id of an `Authorization` value (`Bearer <key>`); `OPEN_OWNER` when
        no keys are configured.

        Args:
            authorization: the header or metadata value, "" when the call has none.
            how_to_send: how this door's callers send a key, for the error message.
            headers: extra error headers by error kind ("missing" or "invalid"), for HTTP's
                `WWW-Authenticate`.

        Raises:
            Unauthorized: keys are configured and the value is missing or names no key.
        """
        if not self:
            return OPEN_OWNER
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized(f"this service needs an API key: send {how_to_send}",
                               headers=headers("missing") if headers else None)
        owner = self.owner_of(token)
        if owner is None:
            raise Unauthorized("the API key is not valid", headers=headers("invalid") if headers else None)
        return owner


def owner_id(key: str) -> str:
    """The id a key's jobs are stored under: the first hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:OWNER_ID_HEX_DIGITS]


def load_api_keys(setting: str) -> ApiKeys:
    """Parse `DEMIX_API_KEYS`: a path (starting with `/`, `./`, `../` or `~`) of a file with
    one key per line (blank lines and `#` comments skipped), or comma-separated keys.

    Raises:
        ValueError: the file cannot be read, it holds no key, or a key has whitespace.
    """
    setting = setting.strip()
    if not setting:
        return ApiKeys(())
    if setting.startswith(SECRET_FILE_PREFIXES):
        path = Path(setting).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"DEMIX_API_KEYS names the file {str(path)!r}, which cannot be read: "
                             f"{exc.strerror}") from None
        keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        source = f"the file {str(path)!r}"
    else:
        keys = [key.strip() for key in setting.split(",") if key.strip()]
        source = "DEMIX_API_KEYS"
    if not keys:
        raise ValueError(f"{source} holds no API key")
    if any(len(key.split()) != 1 for key in keys):
        # Said without the key: settings errors get printed and logged.
        raise ValueError(f"an API key in {source} contains whitespace")
    return ApiKeys(keys)
