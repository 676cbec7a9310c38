# -*- test-case-name: tests.test_proxies -*-
"""
Who the client is behind a TLS-terminating proxy.

Pure: addresses in, an address out.  C{X-Forwarded-For} is a list every
proxy appends its peer to, so only its right end is written by proxies we
trust; anything further left was written by whoever connected to the first
of them, and may be forged.  So, with C{[server] trusted_proxies}:

  - a TCP peer that is not a trusted proxy is the client, whatever the
    header says (a client cannot choose its own address for the caps);
  - from a trusted peer, the header is read from the right, skipping
    trusted proxies; the first address that is not one is the client;
  - an entry that is not an address stops the walk: the hop that wrote it
    is the last one known, so it is taken as the client (nginx's realip
    module does the same);
  - if every entry is a trusted proxy, the left-most is the client.
"""

import ipaddress

# Entries read from the right at most; a longer chain is either a loop or an
# attempt to make each request cost more to parse.
MAX_HOPS = 16


def _address(text):
    """An C{ip_address} from one header entry, or L{None}."""
    text = text.strip()
    if text.startswith("["):  # [2001:db8::1]:443
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:  # 192.0.2.1:443
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


class TrustedProxies:
    """The C{[server] trusted_proxies} rule, applied to one request at a time."""

    def __init__(self, networks=()):
        """
        @param networks: C{ipaddress} networks (as C{config} parses them);
            empty: no proxy is trusted and the header is never read.
        """
        self._networks = tuple(networks)

    def __bool__(self):
        return bool(self._networks)

    def trusts(self, host):
        """
        @param host: an address as text (a transport's C{getPeer().host}).
        @return: whether C{host} is one of the trusted proxies.
        """
        if not self._networks:
            return False
        address = _address(host) if isinstance(host, str) else None
        return address is not None and any(address in net for net in self._networks)

    def client(self, peer_host, forwarded_for):
        """
        @param peer_host: the TCP peer's address, as text.
        @param forwarded_for: the C{X-Forwarded-For} value (text or bytes,
            as Autobahn gives it), or the values (a list, one per header
            line, as C{Headers.getRawHeaders} gives them), or L{None}.
        @return: the client's address as text.
        """
        if not forwarded_for or not self.trusts(peer_host):
            return peer_host
        if isinstance(forwarded_for, (str, bytes)):
            forwarded_for = [forwarded_for]
        entries = []
        for value in forwarded_for:
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            entries.extend(value.split(","))
        client = peer_host
        for entry in reversed(entries[-MAX_HOPS:]):
            address = _address(entry)
            if address is None:
                return client
            client = str(address)
            if not any(address in net for net in self._networks):
                return client
        return client
