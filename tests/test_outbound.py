"""The private-address rule (`demix.outbound`): the address table against IANA's special-purpose
registries."""
from __future__ import annotations

import ipaddress

import pytest

from demix.outbound import is_public_address

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
