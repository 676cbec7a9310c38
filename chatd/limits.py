# -*- test-case-name: tests.test_limits,tests.test_guard -*-
"""
The bookkeeping behind chatd's resource limits, without I/O.

  - L{TokenBucket}: per-connection message rate, over an injected clock.
  - L{ConnectionCaps}: open connections in all and per client address
    (WebSocket connections in L{chatd.ws}; connections still in their TLS or
    HTTP stage in L{chatd.guard}).
  - L{SendBudget}: how far one connection's outgoing buffer may grow while
    the peer is not reading.

docs/security.md says which threat each answers.
"""

import collections
import functools
import ipaddress

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from chatd import errors
from chatd.observer import OneShotObserverList


class TokenBucket:
    """
    C{rate} tokens a second, at most C{burst} saved up.  Starts full, so a
    client may send C{burst} messages at once after being quiet.
    """

    __slots__ = ("_rate", "_burst", "_clock", "_tokens", "_last")  # two per connection

    def __init__(self, rate, burst, clock):
        self._rate = float(rate)
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock.seconds()

    def take(self):
        """Spend one token; False when there is none (the caller refuses)."""
        now = self._clock.seconds()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@functools.lru_cache(maxsize=1024)
def client_key(host):
    """
    The unit per-address limits count in: the IPv4 address, or the /64 an
    IPv6 address is in (one subscriber usually gets a whole /64, so counting
    single IPv6 addresses would let one client take 2**64 slots).
    IPv4-mapped IPv6 counts as the IPv4 address; anything that is not an IP
    address (a UNIX socket peer) counts as itself.

    Memoized (a bounded cache): each new connection asks four or five times
    (the guard's check and admit, the WebSocket caps' check and admit), and
    parsing an address is most of the caps' cost (docs/performance.md).
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return str(host)
    if address.version == 6:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network((address, 64), strict=False))
    return str(address)


class CapReached(Exception):
    """A connection over a cap; C{status} is the HTTP answer, if any is sent."""

    def __init__(self, status, reason):
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


class ConnectionCaps:
    """
    Connections held, in all and per L{client_key}.  Each connection is a
    hashable key (the protocol object); L{release} is idempotent, so callers
    release on every way a connection can end.  Memory is bounded by the
    connections held: an address's count is dropped when it reaches zero.
    """

    def __init__(self, max_total, max_per_address):
        self.max_total = max_total
        self.max_per_address = max_per_address
        self._holders = {}  # key -> client key
        self._per_address = collections.Counter()

    def __len__(self):
        return len(self._holders)

    def __contains__(self, key):
        return key in self._holders

    def count(self, host):
        return self._per_address.get(client_key(host), 0)

    def check(self, host):
        """
        @raise CapReached: 429 when C{host} holds its share already, else 503
            when all slots are taken.  The per-address cap is checked first:
            a client at its own cap is told it is the problem.
        """
        if self._per_address.get(client_key(host), 0) >= self.max_per_address:
            raise CapReached(errors.HTTP_TOO_MANY_REQUESTS, "too many connections from your address")
        if len(self._holders) >= self.max_total:
            raise CapReached(errors.HTTP_UNAVAILABLE, "too many connections")

    def admit(self, key, host):
        """Take a slot for C{key}, or raise L{CapReached} (see L{check})."""
        if key in self._holders:
            return
        self.check(host)
        address = client_key(host)
        self._holders[key] = address
        self._per_address[address] += 1

    def release(self, key):
        address = self._holders.pop(key, None)
        if address is None:
            return
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]


@implementer(IPushProducer)
class SendBudget:
    """
    How many bytes one connection may queue for a peer that is not reading.

    Registered as the transport's streaming producer, it learns from the
    transport itself when the outgoing buffer is full: TCP calls
    C{pauseProducing} once its userspace buffer passes its high-water mark
    (64 KiB in Twisted) and C{resumeProducing} only when that buffer has
    drained completely.  The connection reports every write with L{wrote};
    bytes written while paused are bytes on top of a full buffer, so the
    buffer never holds more than the high-water mark plus C{limit} (plus TLS
    record overhead).  Once over C{limit}, C{overflow} is called, once.

    This uses only the public producer/consumer contract; the alternative,
    reading the size of TCP's buffer, means private attributes
    (C{_tempDataBuffer}) that differ between transports and releases.
    """

    __slots__ = ("limit", "unsent", "paused", "over", "_overflow", "_drained")  # one per connection

    def __init__(self, limit, overflow):
        self.limit = limit
        self.unsent = 0  # bytes written since the transport said it was full
        self.paused = False
        self.over = False
        self._overflow = overflow
        # The waiters for the buffer to drain while it is full; L{None} (as
        # one fired with None) while it is not: most connections' never fills,
        # and an idle connection's every object is work for the cyclic
        # garbage collector (docs/performance.md).
        self._drained = None

    def when_drained(self):
        """
        A Deferred that fires once the transport's buffer has drained (at
        once when it is not full) or the connection is gone: a writer that
        waits for it between writes never queues much over the high-water
        mark, so it is never over C{limit} either.
        """
        drained = self._drained
        if drained is None:
            return defer.succeed(None)
        return drained.when_fired()

    def wrote(self, size):
        if not self.paused or self.over:
            return
        self.unsent += size
        if self.unsent > self.limit:
            self.over = True
            self._overflow(self.unsent)

    # IPushProducer

    def pauseProducing(self):
        self.paused = True
        if self._drained is None:
            self._drained = OneShotObserverList()

    def resumeProducing(self):
        self.paused = False
        self.unsent = 0
        self._fire_drained()

    def stopProducing(self):
        self.paused = False
        self._fire_drained()

    def _fire_drained(self):
        drained, self._drained = self._drained, None
        if drained is not None:
            drained.fire(None)
