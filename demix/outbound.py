"""Requests the service makes to addresses users give it (`url` inputs, webhook
`callback_url`s), held to the private-address rule.

A user-given address must not reach the service's own network: only public addresses are
allowed (`is_public_address`: loopback, private, link-local — cloud metadata at
169.254.169.254 —, multicast, documentation, benchmarking, reserved and every other
special-purpose range are refused, and IPv6 forms that embed an IPv4 address are judged by
it or refused whole) unless `DEMIX_ALLOW_PRIVATE_URLS=1`. The rule is applied when the URL
is accepted (a quick, clear 400), and again by every connection, before it is made: the
host is resolved once, every address checked, and the socket connected to a checked
address, so a name that resolves differently the second time (DNS rebinding) or a
redirect to an internal host reaches nothing, and no port of an internal host is ever
probed. Refusals name the host, never the address it resolved to. Proxies from the
environment are ignored, as they would hide the address connected to.
"""
from __future__ import annotations

import ipaddress
import socket
import sys
import threading
import typing as tp
import urllib.parse
import weakref

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util.connection import allowed_gai_family

from demix.errors import AddressNotAllowed, BadRequest

MAX_URL_LENGTH = 2048
"""Longest `url` or `callback_url` accepted, in characters."""


# The address rule. An address is public when it is global unicast and on no special-purpose
# range: every entry of IANA's IPv4 and IPv6 Special-Purpose Address Registries is refused,
# even the few the registry calls globally reachable (PCP/TURN anycast, AS112 sinks, AMT
# relays, ORCHIDv2, drone tags): none serves files, and a rule without exceptions inside
# its blocks is easier to audit. Written out rather than `ipaddress.is_global`, whose
# answers differ between Python versions.

_IPV4_NOT_PUBLIC = tuple(ipaddress.IPv4Network(block) for block in (
    "0.0.0.0/8",        # "this network"
    "10.0.0.0/8",       # private-use
    "100.64.0.0/10",    # shared address space (carrier-grade NAT)
    "127.0.0.0/8",      # loopback
    "169.254.0.0/16",   # link-local (cloud metadata at 169.254.169.254)
    "172.16.0.0/12",    # private-use
    "192.0.0.0/24",     # IETF protocol assignments (DS-Lite, NAT64 discovery, PCP/TURN anycast)
    "192.0.2.0/24",     # documentation (TEST-NET-1)
    "192.31.196.0/24",  # AS112-v4
    "192.52.193.0/24",  # AMT
    "192.88.99.0/24",   # 6to4 relay anycast (deprecated) and 6a44
    "192.168.0.0/16",   # private-use
    "192.175.48.0/24",  # AS112 direct delegation
    "198.18.0.0/15",    # benchmarking
    "198.51.100.0/24",  # documentation (TEST-NET-2)
    "203.0.113.0/24",   # documentation (TEST-NET-3)
    "224.0.0.0/4",      # multicast
    "240.0.0.0/4",      # reserved, and the limited broadcast 255.255.255.255
))

_IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
"""IANA's global unicast space. Everything outside it is refused unless it embeds an IPv4
address (below): ::/8 (unspecified, loopback, IPv4-compatible ::/96, IPv4-translated
::ffff:0:0:0/96, NAT64 local-use 64:ff9b:1::/48), 100::/8 (discard-only, dummy), 5f00::/16
(SRv6), fc00::/7 (unique-local), fe80::/10 (link-local), fec0::/10 (site-local), ff00::/8
(multicast)."""

_IPV6_NOT_PUBLIC = tuple(ipaddress.IPv6Network(block) for block in (
    "2001::/23",          # IETF protocol assignments: Teredo 2001::/32, benchmarking 2001:2::/48,
                          # AMT, AS112, ORCHID and ORCHIDv2, drone tags, PCP/TURN/DNS-SD anycast
    "2001:db8::/32",      # documentation
    "2002::/16",          # 6to4
    "2620:4f:8000::/48",  # AS112 direct delegation
    "3fff::/20",          # documentation
))

_IPV6_EMBEDDING_IPV4 = (
    ipaddress.IPv6Network("::ffff:0:0/96"),   # IPv4-mapped: a dual-stack socket connects to the IPv4 address
    ipaddress.IPv6Network("64:ff9b::/96"),    # NAT64 well-known prefix: the translator connects to it
)
"""Forms judged by the IPv4 address in their last 32 bits. The other transition forms are
refused whole, whatever they embed: 6to4 and Teredo are deprecated and relayed by
whoever announces them, IPv4-compatible and IPv4-translated addresses are obsolete, and
NAT64's local-use prefix 64:ff9b:1::/48 places the IPv4 address by a prefix length only
the network's operator knows. (A network-specific NAT64 prefix, chosen inside global
space, cannot be told from a public address: a deployment using one must firewall it.)"""


def is_public_address(address: str) -> bool:
    """Whether an IP address is one the outside world can be reached at: global unicast
    and on no special-purpose range; an IPv4-mapped or NAT64 (64:ff9b::/96) IPv6 address is
    judged as the IPv4 address it embeds, every other IPv6 transition form is refused."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if any(ip in prefix for prefix in _IPV6_EMBEDDING_IPV4):
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        else:
            return ip in _IPV6_GLOBAL_UNICAST and not any(ip in block for block in _IPV6_NOT_PUBLIC)
    return not any(ip in block for block in _IPV4_NOT_PUBLIC)


def check_url_syntax(value: str, field: str) -> str:
    """An absolute http(s) URL with a host, stripped.

    Raises:
        BadRequest: (`invalid_<field>`) too long, not http(s), no host, a bad port.
    """
    url = value.strip()

    def invalid(reason: str) -> BadRequest:
        return BadRequest(f"invalid {field} {url[:200]!r}: {reason}", code=f"invalid_{field}")

    if len(url) > MAX_URL_LENGTH:
        raise invalid(f"longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise invalid("it contains whitespace or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises on a port that is not a number in 0-65535
    except ValueError as exc:
        raise invalid(str(exc)) from None
    if parts.scheme.lower() not in ("http", "https"):
        raise invalid("only http and https URLs are accepted")
    if not parts.hostname:
        raise invalid("it names no host")
    if port == 0:
        raise invalid("port 0 cannot be reached")
    return url


def check_public_url(url: str, field: str, allow_private: bool) -> None:
    """Refuse a URL whose host resolves to any non-public address (unless `allow_private`).

    A host that does not resolve now passes: the check each connection makes is the one
    that counts, and a fetch (or delivery) to a name that still does not resolve fails
    then, saying so, instead of a DNS hiccup refusing submissions.

    Raises:
        AddressNotAllowed: it does (the message names the host and the setting, never the
            address: a caller must not learn where an internal name points).
    """
    if allow_private:
        return
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        addresses = _resolve(host, parts.port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError):
        return
    if not all(is_public_address(str(info[4][0])) for info in addresses):
        raise _not_allowed(host, field)


def _resolve(host: str, port: int) -> list[tuple]:
    return socket.getaddrinfo(host, port, allowed_gai_family(), socket.SOCK_STREAM)


def _not_allowed(host: str, field: str = "") -> AddressNotAllowed:
    subject = f"{field} host {host!r}" if field else f"host {host!r}"
    return AddressNotAllowed(
        f"{subject} is not allowed: it resolves to a non-public address (loopback, private, "
        "link-local, reserved or another special-purpose range); the service does not connect there "
        "(DEMIX_ALLOW_PRIVATE_URLS=1 allows it on a private deployment)")


class _OpenSockets:
    """The sockets one session has opened, so that another thread can cut them (`abort`).

    Each is held as a duplicate of its file descriptor, kept until the session closes: a
    response can go on reading a socket whose connection urllib3 has already closed (a
    `Connection: close` answer), and shutting the duplicate down wakes that read too.
    """

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private
        self._lock = threading.Lock()
        self._duplicates: list[socket.socket] = []
        self._aborted = False

    def check_not_aborted(self) -> None:
        if self._aborted:
            raise ConnectionAbortedError("the session was aborted")

    def opened(self, sock: socket.socket) -> None:
        with self._lock:
            if self._aborted:
                sock.close()
                raise ConnectionAbortedError("the session was aborted")
            self._duplicates.append(sock.dup())

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            for duplicate in self._duplicates:
                try:
                    duplicate.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # not connected any more

    def close(self) -> None:
        with self._lock:
            for duplicate in self._duplicates:
                duplicate.close()
            self._duplicates.clear()


class _OutboundConnectionMixin:
    """Mixed into urllib3's connections: resolve the host once, hold every address to the
    rule (unless the session allows private ones), connect to a checked address, and
    register the socket with the session. Only socket creation changes: the Host header,
    TLS SNI and certificate checks still use the URL's host name."""

    def __init__(self, *args: tp.Any, outbound: _OpenSockets, **kwargs: tp.Any):
        self._outbound = outbound
        super().__init__(*args, **kwargs)

    def _new_conn(self) -> socket.socket:
        self._outbound.check_not_aborted()
        if self._outbound.allow_private:
            sock = super()._new_conn()  # type: ignore[misc]
        else:
            sock = _connect_public(self)  # type: ignore[arg-type]
        self._outbound.opened(sock)
        return sock


def _connect_public(connection: urllib3.connection.HTTPConnection) -> socket.socket:
    """A socket connected to one of the host's addresses, all of them checked first; the
    errors urllib3's own `_new_conn` raises, or the rule's refusal."""
    try:
        addresses = _resolve(connection._dns_host, connection.port)
    except socket.gaierror as exc:
        raise NameResolutionError(connection.host, connection, exc) from exc
    if not all(is_public_address(str(info[4][0])) for info in addresses):
        raise _not_allowed(connection.host)
    try:
        sock = _connect_first(addresses, connection.timeout, connection.source_address,
                              connection.socket_options)
    except socket.timeout as exc:
        raise ConnectTimeoutError(connection, f"Connection to {connection.host} timed out. "
                                              f"(connect timeout={connection.timeout})") from exc
    except OSError as exc:
        raise NewConnectionError(connection, f"Failed to establish a new connection: {exc}") from exc
    sys.audit("http.client.connect", connection, connection.host, connection.port)
    return sock


def _connect_first(addresses: list[tuple], timeout: tp.Any, source_address: tp.Any,
                   options: tp.Any) -> socket.socket:
    """Connect to the first of `addresses` (getaddrinfo's answers) that accepts, as
    `socket.create_connection` would, but with no lookup of its own."""
    error: OSError = OSError("no address to connect to")
    for family, kind, protocol, _name, address in addresses:
        sock = socket.socket(family, kind, protocol)
        try:
            for option in options or ():
                sock.setsockopt(*option)
            if timeout is None or isinstance(timeout, (int, float)):  # else urllib3's "default" token
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    raise error


class _OutboundHTTPConnection(_OutboundConnectionMixin, urllib3.connection.HTTPConnection):
    pass


class _OutboundHTTPSConnection(_OutboundConnectionMixin, urllib3.connection.HTTPSConnection):
    pass


class _OutboundPoolMixin:
    """Mixed into urllib3's pools: each connection they make reports to `outbound_sockets`,
    set on a subclass made per session (`_OutboundAdapter`)."""

    outbound_sockets: _OpenSockets

    def __init__(self, *args: tp.Any, **kwargs: tp.Any):
        # A pool's extra keywords reach each connection's constructor.
        super().__init__(*args, outbound=self.outbound_sockets, **kwargs)  # type: ignore[call-arg]


class _OutboundHTTPPool(_OutboundPoolMixin, HTTPConnectionPool):
    ConnectionCls = _OutboundHTTPConnection


class _OutboundHTTPSPool(_OutboundPoolMixin, HTTPSConnectionPool):
    ConnectionCls = _OutboundHTTPSConnection


class _OutboundAdapter(HTTPAdapter):
    def __init__(self, sockets: _OpenSockets):
        self._sockets = sockets
        super().__init__()

    def init_poolmanager(self, *args: tp.Any, **kwargs: tp.Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        # Classes, not partials: a caller may subclass a session's pool classes (webhooks do).
        self.poolmanager.pool_classes_by_scheme = {
            scheme: type(pool.__name__, (pool,), {"outbound_sockets": self._sockets})
            for scheme, pool in (("http", _OutboundHTTPPool), ("https", _OutboundHTTPSPool))}


class OutboundSession(requests.Session):
    """A `requests` session for user-given URLs (see `outbound_session`) that another
    thread can cut short with `abort`."""

    def __init__(self, allow_private: bool):
        super().__init__()
        self.trust_env = False  # a proxy would hide the address actually connected to
        self._sockets = _OpenSockets(allow_private)
        weakref.finalize(self, self._sockets.close)  # a session dropped without close() leaks no descriptor
        adapter = _OutboundAdapter(self._sockets)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def abort(self) -> None:
        """Shut down every connection the session has opened, waking any thread blocked on
        one (its request or read then fails), and refuse new ones."""
        self._sockets.abort()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._sockets.close()


def outbound_session(allow_private: bool) -> OutboundSession:
    """A `requests` session for user-given URLs: no proxies from the environment, each
    host resolved once per connection and (unless `allow_private`) every address it
    resolves to checked against the rule before connecting, to a checked address."""
    return OutboundSession(allow_private)


def connection_refusal(exc: BaseException) -> tp.Optional[AddressNotAllowed]:
    """The rule's refusal inside a `requests` exception chain, if that is what it is."""
    seen: set[int] = set()
    current: tp.Optional[BaseException] = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, AddressNotAllowed):
            return current
        seen.add(id(current))
        for arg in getattr(current, "args", ()):
            if isinstance(arg, BaseException):
                found = connection_refusal(arg)
                if found is not None:
                    return found
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException) and id(reason) not in seen:
            found = connection_refusal(reason)
            if found is not None:
                return found
        current = current.__cause__ or current.__context__
    return None
