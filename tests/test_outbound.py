"""The private-address rule (`demix.outbound`): the address table against IANA's special-purpose
registries, and connections that resolve once, check, and connect only to a checked address.

Names here resolve through a stub, and a guard fails the test if any socket connects to
an address that is not loopback: no test sends a packet off this machine, even by mistake."""
from __future__ import annotations

import contextlib
import dataclasses
import http.server
import ipaddress
import socket
import ssl
import threading
import typing as tp
from pathlib import Path

import pytest
import requests

from demix import outbound
from demix.errors import AddressNotAllowed
from demix.intake.url_fetch import fetch_url
from demix.outbound import check_public_url, connection_refusal, is_public_address, outbound_session
from tests.support.file_server import FileServer
from tests.support.trickle_server import TrickleServer
from tests.support.waiting import wait_for

# -- the table -----------------------------------------------------------------------------------

IPV4_SPECIAL_PURPOSE = [
    # IANA IPv4 Special-Purpose Address Registry (name, block), every entry.
    ("This network", "0.0.0.0/8"),
    ("This host on this network", "0.0.0.0/32"),
    ("Private-Use", "10.0.0.0/8"),
    ("Shared Address Space", "100.64.0.0/10"),
    ("Loopback", "127.0.0.0/8"),
    ("Link Local", "169.254.0.0/16"),
    ("Private-Use", "172.16.0.0/12"),
    ("IETF Protocol Assignments", "192.0.0.0/24"),
    ("IPv4 Service Continuity Prefix", "192.0.0.0/29"),
    ("IPv4 dummy address", "192.0.0.8/32"),
    ("Port Control Protocol Anycast", "192.0.0.9/32"),
    ("Traversal Using Relays around NAT Anycast", "192.0.0.10/32"),
    ("NAT64/DNS64 Discovery", "192.0.0.170/32"),
    ("NAT64/DNS64 Discovery", "192.0.0.171/32"),
    ("Documentation (TEST-NET-1)", "192.0.2.0/24"),
    ("AS112-v4", "192.31.196.0/24"),
    ("AMT", "192.52.193.0/24"),
    ("Deprecated (6to4 Relay Anycast)", "192.88.99.0/24"),
    ("6a44-relay anycast address", "192.88.99.2/32"),
    ("Private-Use", "192.168.0.0/16"),
    ("Direct Delegation AS112 Service", "192.175.48.0/24"),
    ("Benchmarking", "198.18.0.0/15"),
    ("Documentation (TEST-NET-2)", "198.51.100.0/24"),
    ("Documentation (TEST-NET-3)", "203.0.113.0/24"),
    ("Reserved", "240.0.0.0/4"),
    ("Limited Broadcast", "255.255.255.255/32"),
    # Not in that registry, refused all the same: IANA's multicast space.
    ("Multicast", "224.0.0.0/4"),
]

IPV6_SPECIAL_PURPOSE = [
    # IANA IPv6 Special-Purpose Address Registry (name, block), every entry.
    ("Loopback Address", "::1/128"),
    ("Unspecified Address", "::/128"),
    ("IPv4-mapped Address", "::ffff:0:0/96"),
    ("IPv4-IPv6 Translat.", "64:ff9b::/96"),
    ("IPv4-IPv6 Translat. (local use)", "64:ff9b:1::/48"),
    ("Discard-Only Address Block", "100::/64"),
    ("Dummy IPv6 Prefix", "100:0:0:1::/64"),
    ("IETF Protocol Assignments", "2001::/23"),
    ("TEREDO", "2001::/32"),
    ("Port Control Protocol Anycast", "2001:1::1/128"),
    ("Traversal Using Relays around NAT Anycast", "2001:1::2/128"),
    ("DNS-SD Service Registration Protocol Anycast", "2001:1::3/128"),
    ("Benchmarking", "2001:2::/48"),
    ("AMT", "2001:3::/32"),
    ("AS112-v6", "2001:4:112::/48"),
    ("Deprecated (previously ORCHID)", "2001:10::/28"),
    ("ORCHIDv2", "2001:20::/28"),
    ("Drone Remote ID Protocol Entity Tags (DETs) Prefix", "2001:30::/28"),
    ("Documentation", "2001:db8::/32"),
    ("6to4", "2002::/16"),
    ("Direct Delegation AS112 Service", "2620:4f:8000::/48"),
    ("Documentation", "3fff::/20"),
    ("Segment Routing (SRv6) SIDs", "5f00::/16"),
    ("Unique-Local", "fc00::/7"),
    ("Link-Local Unicast", "fe80::/10"),
    # Not in that registry, refused all the same.
    ("IPv4-compatible (deprecated, RFC 4291)", "::/96"),
    ("IPv4-translated (RFC 2765)", "::ffff:0:0:0/96"),
    ("Site-local (deprecated, RFC 3879)", "fec0::/10"),
    ("Multicast", "ff00::/8"),
]

EMBEDDED_INTERNAL_IPV4 = [
    # (form, address) for 10.0.0.1, 169.254.169.254 and 127.0.0.1 in each IPv6 form that can carry them.
    *[(form, address) for internal in ("10.0.0.1", "169.254.169.254", "127.0.0.1")
      for form, address in [
          ("IPv4-mapped", f"::ffff:{internal}"),
          ("NAT64 well-known prefix", f"64:ff9b::{internal}"),
          ("NAT64 local-use prefix, /96 layout", f"64:ff9b:1::{internal}"),
          ("IPv4-compatible", f"::{internal}"),
          ("IPv4-translated", f"::ffff:0:{internal}"),
          ("6to4", "2002:{:x}:{:x}::1".format(*divmod(int(ipaddress.IPv4Address(internal)), 1 << 16))),
      ]],
    ("NAT64 local-use prefix, /48 layout (RFC 6052), 10.0.0.1", "64:ff9b:1:a00:0:100::"),
    ("Teredo, server 10.0.0.1", "2001:0:a00:1::1"),
    ("Teredo, client 10.0.0.1 (obfuscated)", "2001:0:4136:e378:8000:63bf:f5ff:fffe"),
]

PUBLIC = ["8.8.8.8", "1.1.1.1", "9.9.9.9", "93.184.215.14", "2606:4700::1111", "2001:4860:4860::8888",
          "2a00:1450:4001:80b::200e",
          # Just outside special-purpose blocks.
          "100.63.255.255", "100.128.0.0", "172.15.255.255", "172.32.0.0", "192.0.1.255", "198.17.255.255",
          "198.20.0.0", "223.255.255.255", "2001:200::1", "2003::1",
          # Forms judged by the public IPv4 address they embed.
          "::ffff:8.8.8.8", "64:ff9b::8.8.8.8"]


def _ends(block: str) -> list[str]:
    network = ipaddress.ip_network(block)
    return [str(network[0]), str(network[-1])]


@pytest.mark.parametrize("name, block", IPV4_SPECIAL_PURPOSE + IPV6_SPECIAL_PURPOSE,
                         ids=[f"{name} {block}" for name, block in IPV4_SPECIAL_PURPOSE + IPV6_SPECIAL_PURPOSE])
def test_every_special_purpose_block_is_refused_first_to_last(name, block):
    assert [address for address in _ends(block) if is_public_address(address)] == []


@pytest.mark.parametrize("form, address", EMBEDDED_INTERNAL_IPV4, ids=[f"{f} {a}" for f, a in EMBEDDED_INTERNAL_IPV4])
def test_ipv6_forms_embedding_an_internal_ipv4_address_are_refused(form, address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["2002:808:808::1", "64:ff9b:1::8.8.8.8", "::8.8.8.8", "::ffff:0:8.8.8.8",
                                     "2001:0:808:808::1"])
def test_transition_forms_other_than_mapped_and_nat64_are_refused_whatever_they_embed(address):
    assert not is_public_address(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address):
    assert is_public_address(address)


def test_a_scope_id_does_not_change_the_answer():
    assert not is_public_address("fe80::1%eth0")


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("127.1.2.3", False), ("::1", False), ("10.1.2.3", False),
    ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False), ("fe80::1", False),
    ("fd00::1", False), ("224.0.0.1", False), ("0.0.0.0", False), ("240.0.0.1", False),
    ("100.64.0.1", False), ("::ffff:10.0.0.1", False), ("::ffff:8.8.8.8", True),
])
def test_public_addresses_are_told_from_the_rest(address, public):
    assert is_public_address(address) is public


@pytest.mark.parametrize("url", ["http://localhost:8000/a.wav", "http://127.0.0.1/a.wav",
                                 "https://[::1]/a.wav", "http://10.0.0.7/a.wav",
                                 "http://169.254.169.254/latest/meta-data/"])
def test_a_private_host_is_refused_before_any_connection(url):
    with pytest.raises(AddressNotAllowed) as refused:
        check_public_url(url, "url", allow_private=False)
    assert refused.value.code == "url_not_allowed" and "DEMIX_ALLOW_PRIVATE_URLS" in refused.value.message
    check_public_url(url, "url", allow_private=True)  # a private deployment may


def test_a_redirect_inward_is_refused_at_its_hop(strict, monkeypatch, tmp_path):
    """127.0.0.2 plays a public server (the rule is told so) that redirects to 127.0.0.1."""
    real = outbound.is_public_address
    monkeypatch.setattr(outbound, "is_public_address", lambda address: address == "127.0.0.2" or real(address))
    with FileServer("127.0.0.2") as public, FileServer() as internal:
        internal.routes["/secret"] = (200, {}, b"internal data")
        public.routes["/song.wav"] = (302, {"Location": f"{internal.base}/secret"}, b"")
        with open(tmp_path / "got", "wb") as file, pytest.raises(AddressNotAllowed):
            fetch_url(f"{public.base}/song.wav", file, strict)
    assert public.requests == ["/song.wav"] and internal.requests == []


def test_the_session_ignores_proxies_from_the_environment(monkeypatch):
    with FileServer() as files:
        files.routes["/x"] = (200, {}, b"direct")
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9/")  # nothing listens on the discard port
        with outbound_session(True) as session:
            assert session.get(f"{files.base}/x", timeout=5).content == b"direct"


# -- connections ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Network:
    """The stubbed resolver's answers and what the code under test did with them."""
    answers: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    lookups: list[str] = dataclasses.field(default_factory=list)
    connects: list[tuple] = dataclasses.field(default_factory=list)


@pytest.fixture
def network(monkeypatch) -> Network:
    """Names in `answers` resolve to their addresses (one per lookup; the last one stays);
    every connect is recorded, and one to an address that is not loopback fails the test
    without being made."""
    seen = Network()
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in seen.answers:
            return real_getaddrinfo(host, port, *args, **kwargs)
        seen.lookups.append(host)
        answers = seen.answers[host]
        address = answers.pop(0) if len(answers) > 1 else answers[0]
        if ":" in address:
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, int(port), 0, 0))]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port)))]

    def connect(sock, address):
        seen.connects.append(address)
        if not ipaddress.ip_address(address[0]).is_loopback:
            pytest.fail(f"a connection to {address} was attempted")
        return real_connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", lambda sock, address: pytest.fail(f"connect_ex {address}"))
    return seen


@pytest.fixture
def strict(settings):
    return dataclasses.replace(settings, allow_private_urls=False, url_timeout_s=5.0)


INTERNAL = ["10.0.0.1", "169.254.169.254", "64:ff9b::a00:1", "2002:a00:1::1", "::ffff:0:a00:1", "fec0::1"]


@pytest.mark.parametrize("address", INTERNAL)
def test_a_name_resolving_inward_is_refused_before_any_connection_without_naming_the_address(
        network, strict, address, tmp_path):
    network.answers["internal.example"] = [address]
    url = "http://internal.example:8080/song.wav"
    with pytest.raises(AddressNotAllowed) as at_submission:
        check_public_url(url, "url", allow_private=False)
    with outbound_session(False) as session, pytest.raises(Exception) as by_session:
        session.get(url, timeout=5)
    with open(tmp_path / "got", "wb") as file, pytest.raises(AddressNotAllowed) as by_fetch:
        fetch_url(url, file, strict)
    refusals = [at_submission.value, connection_refusal(by_session.value), by_fetch.value]
    assert network.connects == []
    for refusal in refusals:
        assert refusal is not None and refusal.to_dict() == {"code": "url_not_allowed", "message": refusal.message}
        assert "internal.example" in refusal.message and "DEMIX_ALLOW_PRIVATE_URLS" in refusal.message
        assert address not in refusal.message and str(ipaddress.ip_address(address)) not in refusal.message
        assert refusal.details == {}


def test_refusal_is_the_same_for_an_open_and_a_closed_port(network, strict, tmp_path):
    """Refused before connecting, a host's ports are never probed: nothing tells them apart."""
    network.answers["vm.example"] = ["127.0.0.1"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # nothing listens once the probe is closed
    messages = []
    with FileServer() as files:
        files.routes["/song.wav"] = (200, {}, b"RIFF....")
        for port in (files.port, closed):
            with open(tmp_path / "got", "wb") as file, pytest.raises(AddressNotAllowed) as refused:
                fetch_url(f"http://vm.example:{port}/song.wav", file, strict)
            messages.append(refused.value.message.replace(str(port), "PORT"))
        assert files.requests == []
    assert messages[0] == messages[1] and "127.0.0.1" not in messages[0]
    assert network.connects == []


def test_a_name_is_resolved_once_and_the_checked_address_connected_to(network, strict, monkeypatch, tmp_path):
    """DNS rebinding: the name answers a public address first and an internal one after.
    The fetch looks it up once, checks that answer and connects to it; a later fetch whose
    one lookup answers inward is refused without connecting. (127.0.0.2 plays the public
    server: the rule is told so.)"""
    real = outbound.is_public_address
    monkeypatch.setattr(outbound, "is_public_address", lambda address: address == "127.0.0.2" or real(address))
    with FileServer() as internal, FileServer("127.0.0.2", internal.port) as public:
        internal.routes["/song.wav"] = (200, {}, b"internal data")
        public.routes["/song.wav"] = (200, {}, b"public data")
        network.answers["rebinding.example"] = ["127.0.0.2", "127.0.0.1"]
        url = f"http://rebinding.example:{internal.port}/song.wav"
        with open(tmp_path / "got", "wb") as file:
            assert fetch_url(url, file, strict) == len(b"public data")
        assert (tmp_path / "got").read_bytes() == b"public data"
        assert network.lookups == ["rebinding.example"] and network.connects == [("127.0.0.2", internal.port)]
        with open(tmp_path / "again", "wb") as file, pytest.raises(AddressNotAllowed):
            fetch_url(url, file, strict)
        assert network.connects == [("127.0.0.2", internal.port)]
        assert internal.requests == [] and public.requests == ["/song.wav"]


def test_a_redirect_hop_is_resolved_and_checked_the_same_way(network, strict, monkeypatch, tmp_path):
    real = outbound.is_public_address
    monkeypatch.setattr(outbound, "is_public_address", lambda address: address == "127.0.0.2" or real(address))
    with FileServer() as internal, FileServer("127.0.0.2") as public:
        network.answers["inward.example"] = ["127.0.0.1"]
        public.routes["/song.wav"] = (302, {"Location": f"http://inward.example:{internal.port}/secret"}, b"")
        with open(tmp_path / "got", "wb") as file, pytest.raises(AddressNotAllowed) as refused:
            fetch_url(f"{public.base}/song.wav", file, strict)
        assert "127.0.0.1" not in refused.value.message
        assert public.requests == ["/song.wav"] and internal.requests == []
        assert network.connects == [("127.0.0.2", public.port)]


TLS = Path(__file__).resolve().parent / "data" / "tls"
"""A self-signed certificate (and its key) for files.example, valid until 2126: only these tests trust it."""


@contextlib.contextmanager
def https_server(host: str) -> tp.Iterator[dict]:
    """An HTTPS server on `host` with the files.example certificate; yields what it saw:
    its `port`, the TLS server names asked for (`sni`) and the requests' Host headers."""
    seen: dict = {"sni": [], "host": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen["host"].append(self.headers["Host"])
            self.send_response(200)
            self.send_header("Content-Length", "6")
            self.end_headers()
            self.wfile.write(b"secure")

        def log_message(self, *_: tp.Any) -> None:
            pass

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(TLS / "files.example.crt", TLS / "files.example.key")
    context.sni_callback = lambda sock, name, ctx: seen["sni"].append(name)
    server = http.server.ThreadingHTTPServer((host, 0), Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    seen["port"] = server.server_port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_https_keeps_the_name_for_sni_the_host_header_and_the_certificate_check(network, monkeypatch):
    """The socket goes to the checked address; TLS still asks for, and verifies, the name."""
    real = outbound.is_public_address
    monkeypatch.setattr(outbound, "is_public_address", lambda address: address == "127.0.0.2" or real(address))
    network.answers.update({"files.example": ["127.0.0.2"], "other.example": ["127.0.0.2"]})
    with https_server("127.0.0.2") as seen, outbound_session(False) as session:
        port = seen["port"]
        response = session.get(f"https://files.example:{port}/song.wav", verify=str(TLS / "files.example.crt"),
                               timeout=10)
        assert response.content == b"secure"
        assert seen["sni"] == ["files.example"] and seen["host"] == [f"files.example:{port}"]
        with pytest.raises(requests.exceptions.SSLError, match="Hostname mismatch"):
            session.get(f"https://other.example:{port}/song.wav", verify=str(TLS / "files.example.crt"),
                        timeout=10)
    assert network.connects == [("127.0.0.2", port), ("127.0.0.2", port)]


def test_an_aborted_session_wakes_a_blocked_read_and_opens_nothing_more():
    failed: list[BaseException] = []
    with TrickleServer("headers", lifetime=30) as server, outbound_session(True) as session:
        def get() -> None:
            try:
                session.get(server.url, timeout=30).close()
            except Exception as exc:  # noqa: BLE001 - what the abort looks like to the reader
                failed.append(exc)

        reader = threading.Thread(target=get)
        reader.start()
        wait_for(lambda: server.requests == 1, "the request", timeout=10)
        session.abort()
        reader.join(5)
        assert not reader.is_alive() and len(failed) == 1
        assert server.hung_up.wait(5)
        with pytest.raises(Exception):
            session.get(server.url, timeout=5)
        assert server.connections == 1

