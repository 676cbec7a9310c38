# -*- test-case-name: tests.test_proxies -*-
"""chatd.proxies: X-Forwarded-For is believed only as far as trusted proxies wrote it."""

import ipaddress

import pytest

from chatd.proxies import MAX_HOPS, TrustedProxies

NGINX = TrustedProxies([ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8")])


def test_no_trusted_proxies_means_the_header_is_ignored():
    """With the default (empty) list the TCP peer is the client, always."""
    rule = TrustedProxies()
    assert not rule
    assert rule.client("127.0.0.1", [b"198.51.100.7"]) == "127.0.0.1"


def test_untrusted_peer_cannot_forge_its_address():
    """A header from a peer outside the list changes nothing."""
    assert NGINX.client("203.0.113.9", [b"198.51.100.7"]) == "203.0.113.9"


def test_trusted_peer_gives_the_rightmost_untrusted_address():
    """Client-written entries left of the real one are skipped."""
    header = [b"6.6.6.6, 198.51.100.7, 10.1.2.3"]
    assert NGINX.client("127.0.0.1", header) == "198.51.100.7"


def test_one_value_as_text():
    """A single header value (Autobahn's form) reads as the list it holds."""
    assert NGINX.client("127.0.0.1", "6.6.6.6, 198.51.100.7") == "198.51.100.7"
    assert NGINX.client("127.0.0.1", b"198.51.100.7") == "198.51.100.7"


def test_several_header_lines_are_one_list():
    """Two X-Forwarded-For lines read as one comma-separated list, in order."""
    assert NGINX.client("127.0.0.1", [b"6.6.6.6", b"198.51.100.7"]) == "198.51.100.7"


def test_no_header_from_a_trusted_peer_means_the_peer():
    """A trusted proxy that sent no header is itself the client."""
    assert NGINX.client("127.0.0.1", None) == "127.0.0.1"
    assert NGINX.client("127.0.0.1", []) == "127.0.0.1"


def test_garbage_entry_stops_at_the_last_known_hop():
    """An entry that is not an address: the proxy that wrote it is the client."""
    assert NGINX.client("127.0.0.1", [b"198.51.100.7, unknown"]) == "127.0.0.1"
    assert NGINX.client("127.0.0.1", [b"junk, 10.0.0.5"]) == "10.0.0.5"


def test_all_trusted_gives_the_leftmost():
    """A chain made only of trusted proxies ends at its left-most entry."""
    assert NGINX.client("127.0.0.1", [b"10.0.0.9, 10.0.0.5"]) == "10.0.0.9"


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("198.51.100.7:5555", "198.51.100.7"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("2001:db8::1", "2001:db8::1"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        (" 198.51.100.7 ", "198.51.100.7"),
    ],
)
def test_address_forms(entry, expected):
    """Ports, brackets, spaces and IPv4-mapped IPv6 are normalised."""
    assert NGINX.client("127.0.0.1", [entry]) == expected


def test_mapped_peer_is_trusted():
    """A dual-stack listener reports ::ffff:127.0.0.1: still the trusted proxy."""
    assert NGINX.trusts("::ffff:127.0.0.1")
    assert not NGINX.trusts("not an address")


def test_long_chain_is_bounded():
    """Only the right-most MAX_HOPS entries are read."""
    header = ["198.51.100.7"] + ["10.0.0.1"] * (MAX_HOPS + 5)
    # The real client is beyond the bound: the left-most entry read wins.
    assert NGINX.client("127.0.0.1", [", ".join(header)]) == "10.0.0.1"
