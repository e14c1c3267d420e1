"""Requests the service makes to addresses users give it (`url` inputs, webhook
`callback_url`s), held to the private-address rule.

A user-given address must not reach the service's own network: only public addresses are
allowed (`is_public_address`: loopback, private, link-local — cloud metadata at
169.254.169.254 —, multicast, documentation, benchmarking, reserved and every other
special-purpose range are refused, and IPv6 forms that embed an IPv4 address are judged by
it or refused whole) unless `DEMIX_ALLOW_PRIVATE_URLS=1`. The rule is checked twice: on the resolved
addresses when the URL is accepted (a quick, clear 400), and on the address each
connection is actually made to (after DNS, so a name that resolves differently the
second time — DNS rebinding — or a redirect to an internal host reads nothing). Proxies
from the environment are ignored, as they would hide the address connected to.
"""
from __future__ import annotations

import ipaddress
import socket
import typing as tp
import urllib.parse

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

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

    A host that does not resolve now passes: the connection-time check is the one that
    counts, and a fetch (or delivery) to a name that still does not resolve fails then,
    saying so, instead of a DNS hiccup refusing submissions.

    Raises:
        AddressNotAllowed: it does (the message names the address and the setting).
    """
    if allow_private:
        return
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return
    for info in infos:
        address = str(info[4][0])
        if not is_public_address(address):
            raise _not_allowed(field, host, address)


def _not_allowed(field: str, host: str, address: str) -> AddressNotAllowed:
    return AddressNotAllowed(
        f"{field} host {host!r} is at {address}, an address on a private, loopback, link-local, "
        "multicast or reserved range; the service does not connect there "
        "(DEMIX_ALLOW_PRIVATE_URLS=1 allows it on a private deployment)",
        details={"address": address})


class _PeerCheck:
    """Mixed into urllib3's connections: the rule, on the socket's actual peer, before
    anything is sent."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        address = sock.getpeername()[0]
        if not is_public_address(address):
            sock.close()
            raise _not_allowed("the", str(getattr(self, "host", "")), address)
        return sock


class _CheckedHTTPConnection(_PeerCheck, urllib3.connection.HTTPConnection):
    pass


class _CheckedHTTPSConnection(_PeerCheck, urllib3.connection.HTTPSConnection):
    pass


class _CheckedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _CheckedHTTPConnection


class _CheckedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _CheckedHTTPSConnection


class _PublicOnlyAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: tp.Any, **kwargs: tp.Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _CheckedHTTPPool, "https": _CheckedHTTPSPool}
        self.poolmanager.key_fn_by_scheme = dict(self.poolmanager.key_fn_by_scheme)


def outbound_session(allow_private: bool) -> requests.Session:
    """A `requests` session for user-given URLs: no proxies from the environment, and
    (unless `allow_private`) every connection's peer checked against the rule."""
    session = requests.Session()
    session.trust_env = False  # a proxy would hide the address actually connected to
    if not allow_private:
        adapter = _PublicOnlyAdapter()
        session.mount("http://", adapter)
        session.mount("https://", adapter)
    return session


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
