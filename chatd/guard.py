# -*- test-case-name: tests.test_guard -*-
"""
The outermost layer of the listener: limits on connections that are not
(yet) WebSockets.

Twisted holds an accepted connection as long as the peer keeps it barely
alive: twisted.web's idle timeout (60 s, plus 15 s before an abort) is reset
by every byte, so a client dribbling its headers a byte at a time, or
keeping a connection alive with one request a minute, is never timed out;
and Autobahn's C{openHandshakeTimeout} only starts once an HTTP request has
reached the WebSocket resource.  So
L{ConnectionGuard} guards the whole listening factory, TLS included
(L{ConnectionGuard.wrap}), and:

  - gives every connection C{[websocket] handshake_timeout} seconds from
    accept to open a WebSocket or complete an HTTP request, and as long again
    after each HTTP request it completes (so keep-alive connections idle at
    most that long); over it the connection is aborted;
  - caps the connections in that stage (none of them authenticated yet) per
    client address (IPv6: per /64) at C{[limits] max_pending_per_ip} (or
    C{max_connections_per_ip} if smaller): over it a new connection is closed
    unanswered, since not even TLS has been spoken.  In all they are capped
    at C{max_connections}; when that is full, the connection that has been
    waiting longest is aborted to make room, so idle sockets from many
    addresses cannot lock everyone out for a whole deadline (open WebSockets
    are capped separately, in L{chatd.ws}, where a refusal can be answered
    with 503/429);
  - caps HTTP request bodies at L{MAX_REQUEST_BODY_BYTES} (twisted.web has
    no limit and spools large bodies to a temporary file): a body over it is
    thrown away as it arrives and answered 413 JSON, or cut off unanswered
    past L{MAX_DISCARDED_BODY_BYTES}.

The WebSocket side tells the guard when a connection has opened (see
L{ConnectionGuard.upgraded}); requests report themselves through the Site's
C{requestFactory} (see L{ConnectionGuard.guard_requests}).  Both find their
connection by the peer address, which is unique among a TCP listener's
live connections.  The guard is built first and handed to the Site and the
WebSocket factories; the factory that wraps the listener
(L{ConnectionGuard.wrap}) is built last, around them.
"""

import json

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web import http
from zope.interface import directlyProvides, providedBy

from chatd import errors
from chatd.limits import CapReached, ConnectionCaps, TokenBucket

log = Logger()

MAX_REQUEST_BODY_BYTES = 64 * 1024
# A body over the cap but under this is read and thrown away, so the
# client can be answered 413; a larger one is cut off unanswered.
MAX_DISCARDED_BODY_BYTES = 1024 * 1024


def _peer_key(address):
    """A live connection's identity; L{None} for peers without a port."""
    port = getattr(address, "port", None)
    if port is None:
        return None
    return (address.type, address.host, port)


def _host(address):
    return getattr(address, "host", None) or str(address)


_DECLARATIONS = {}  # (wrapper class, what the transport provides) -> the wrapper's declaration


def provide_like(wrapper, transport):
    """
    Declare that C{wrapper} provides what C{transport} provides, as
    Twisted's C{ProtocolWrapper} and TLS wrapper do on every connection
    (C{directlyProvides(wrapper, providedBy(transport))}), but with zope's
    declaration made once per kind of wrapper and transport and shared, as
    zope shares it itself: made anew, it was 3 % of the CPU of each new
    connection (docs/performance.md).
    """
    key = (type(wrapper), providedBy(transport))
    declaration = _DECLARATIONS.get(key)
    if declaration is None:
        directlyProvides(wrapper, key[1])
        _DECLARATIONS[key] = wrapper.__provides__
    else:
        wrapper.__provides__ = declaration


class _LogBudget:
    """
    At most C{rate} log lines a second (after a burst) for events a client
    can cause at will, so an attack cannot also flood the log; the number of
    lines left out is reported with the next one written.
    """

    def __init__(self, clock, rate=2.0, burst=20):
        self._bucket = TokenBucket(rate, burst, clock)
        self.suppressed = 0

    def allow(self):
        if self._bucket.take():
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self):
        count, self.suppressed = self.suppressed, 0
        return count


class _GuardedConnection(ProtocolWrapper):
    """
    One accepted connection and whether it is a WebSocket yet.

    Its deadline is kept by the guard (L{ConnectionGuard._arm}): set on
    accept and again after each finished HTTP request, and never reset by
    incoming bytes: a client dribbling its headers a byte at a time must not
    keep its slot.
    """

    upgraded = False
    _peer = None  # the peer's address, until the connection is a WebSocket

    def makeConnection(self, transport):
        # ProtocolWrapper's, with the interfaces declared by provide_like.
        provide_like(self, transport)
        self._peer = transport.getPeer()
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(self)
        self.factory.guard._connected(self)

    def getPeer(self):
        """
        ProtocolWrapper's, from the address taken on connect until the
        connection is a WebSocket: a TCP transport makes a new address per
        call, and the guard, the request and the WebSocket's checks each ask
        while the connection is new.  An open WebSocket does not keep it
        (L{ConnectionGuard.upgraded}).
        """
        peer = self._peer
        return peer if peer is not None else self.transport.getPeer()

    def connectionLost(self, reason):
        self.factory.guard._disconnected(self)
        super().connectionLost(reason)


class GuardedFactory(WrappingFactory):
    """The listening factory: the wrapped one, behind a L{ConnectionGuard}."""

    protocol = _GuardedConnection

    def __init__(self, wrapped_factory, guard):
        super().__init__(wrapped_factory)
        self.guard = guard

    def buildProtocol(self, addr):
        """
        Refuse (return L{None}, so the reactor closes the socket at once)
        when the caps on connections in their handshake are reached.
        """
        if not self.guard.admissible(addr):
            return None
        return self.protocol(self, self.wrappedFactory.buildProtocol(addr))


class ConnectionGuard:
    """
    The deadlines and caps of the connections that are not (yet)
    WebSockets, for one listener.

    @ivar pending: L{ConnectionCaps} of the connections that are not
        WebSockets; tests read it.
    @ivar clock: the C{IReactorTime} the deadlines run on.

    The deadlines share one clock call.  Every deadline is C{timeout}
    seconds after it is set, so in the order they are set they are also in
    the order they fall due: L{_deadlines} is that order (a dict keeps its
    order; re-arming moves a connection to the end), and the clock call is
    for its first entry.  Setting, moving and cancelling a deadline is a
    dict operation, where a clock call per connection (TimeoutMixin's) was
    a C{DelayedCall} made, pushed on the reactor's heap and cancelled for
    each connection (docs/performance.md).
    """

    def __init__(self, timeout, max_total, max_per_address, clock, trusted_proxy=lambda host: False):
        """
        @param trusted_proxy: C{host -> bool}: a trusted proxy's
            connections carry many clients, so each counts as its own
            address here (the total cap still applies; the WebSocket side
            counts the forwarded client, see L{chatd.proxies}).
        """
        self.timeout = timeout
        self.pending = ConnectionCaps(max_total, max_per_address)
        self.clock = clock
        self._trusted_proxy = trusted_proxy
        self._by_peer = {}
        self._waiting = {}  # pending connections, oldest first (dicts keep order)
        self._deadlines = {}  # connection -> when it is due, soonest first
        self._wake = None  # the clock call for the first of _deadlines
        self._log_budget = _LogBudget(clock)

    @classmethod
    def from_settings(cls, settings, clock):
        from chatd.proxies import TrustedProxies

        limits = settings.limits
        return cls(
            settings.websocket.handshake_timeout,
            limits.max_connections,
            min(limits.max_connections_per_ip, limits.max_pending_per_ip),
            clock,
            TrustedProxies(settings.server.trusted_proxies).trusts,
        )

    def _cap_key(self, addr):
        """What the per-address cap counts: the host, or the connection from a trusted proxy."""
        host = _host(addr)
        if self._trusted_proxy(host):
            return f"{host} port {getattr(addr, 'port', '')}"
        return host

    def wrap(self, factory):
        """
        @param factory: the listening factory (the TLS factory when TLS is
            on, else the Site).
        @return: a L{GuardedFactory} to listen with.
        """
        return GuardedFactory(factory, self)

    def admissible(self, addr):
        """
        Whether a connection from C{addr} may start its handshake: not when
        its address holds its share already (logged); when every slot is
        taken, the longest waiting connection is aborted to make room.
        """
        try:
            self.pending.check(self._cap_key(addr))
        except CapReached as refused:
            if refused.status == errors.HTTP_UNAVAILABLE and self._evict_oldest():
                return True
            self._note(
                "refused connection from {peer}: {reason} ({count} still in handshake)",
                peer=_host(addr), reason=refused.reason, count=self.pending.count(self._cap_key(addr)),
            )
            return False
        return True

    # --- what the WebSocket side and the requests report ----------------------

    def upgraded(self, address):
        """
        The connection from C{address} opened a WebSocket: no deadline from
        now on (pings and token expiry look after it) and it leaves the
        handshake caps (L{chatd.ws} counts it instead).
        """
        key = _peer_key(address)
        connection = self._by_peer.get(key)
        if connection is None or connection.upgraded:
            return
        connection.upgraded = True
        del connection._peer  # the class's None again: nothing kept per open WebSocket
        self._disarm(connection)
        self._release(connection)
        # Nothing looks an open WebSocket up here again: no entry for its life.
        del self._by_peer[key]

    def request_done(self, address):
        """An HTTP request on the connection from C{address} finished: re-arm."""
        connection = self._by_peer.get(_peer_key(address))
        if connection is not None and not connection.upgraded:
            self._arm(connection)

    def guard_requests(self, request_factory):
        """
        A Site C{requestFactory} that reports finished requests and caps
        request bodies, built on the given one.
        """
        guard = self

        class GuardedRequest(request_factory):
            # chatd.web.ChatChannel reports the requests it answers itself here.
            connection_guard = guard
            _body_bytes = 0
            _too_large = False  # over the cap: the body is thrown away, then 413
            _cut_off = False  # over what is worth reading to answer: aborted

            def gotLength(self, length):
                # The channel-to-request interface (not for resources): Twisted
                # picks the body's storage from the length, a temporary file
                # for unknown (chunked) or large ones.  With the cap, a body
                # always fits in memory, so ask for that.
                if length is not None and length > MAX_REQUEST_BODY_BYTES:
                    self._refuse_body(length)
                super().gotLength(0)

            def handleContentChunk(self, data):
                if self._cut_off:
                    return
                self._body_bytes += len(data)
                if self._body_bytes > MAX_REQUEST_BODY_BYTES:
                    self._refuse_body(self._body_bytes)
                if not self._too_large:
                    super().handleContentChunk(data)

            def process(self):
                if self._cut_off:
                    return
                if self._too_large:
                    self._answer_too_large()
                    return
                super().process()

            def finish(self):
                super().finish()
                guard.request_done(self.getClientAddress())

            def _refuse_body(self, size):
                if not self._too_large:
                    self._too_large = True
                    guard._note(
                        "refused {peer}: request body of {size} bytes (limit {limit})",
                        peer=_host(self.getClientAddress()), size=size, limit=MAX_REQUEST_BODY_BYTES,
                    )
                if size > MAX_DISCARDED_BODY_BYTES and not self._cut_off:
                    # Not worth reading to the end just to say so.
                    self._cut_off = True
                    self.channel.transport.abortConnection()

            def _answer_too_large(self):
                body = json.dumps({
                    "error": errors.TOO_LARGE,
                    "message": f"request bodies are limited to {MAX_REQUEST_BODY_BYTES} bytes",
                }).encode("ascii")
                self.setResponseCode(errors.HTTP_PAYLOAD_TOO_LARGE)
                self.setHeader(b"content-type", b"application/json; charset=utf-8")
                self.setHeader(b"server", b"chatd")
                self.setHeader(b"content-length", b"%d" % len(body))
                self.write(body)
                self.finish()

        GuardedRequest.__name__ = "Guarded" + request_factory.__name__
        return GuardedRequest

    # --- _GuardedConnection's callbacks ----------------------------------------

    def _connected(self, connection):
        peer = connection.getPeer()
        key = _peer_key(peer)
        try:
            self.pending.admit(connection, self._cap_key(peer))
        except CapReached:
            # admissible() checked in this same reactor turn; only a wrapped
            # factory that connects synchronously could get here.
            connection.transport.abortConnection()
            return
        self._waiting[connection] = None
        if key is None:
            # Not an IP listener: nothing can find this connection again to
            # cancel its deadline, so it gets none (docs/security.md).
            return
        self._by_peer[key] = connection
        self._arm(connection)

    def _disconnected(self, connection):
        self._disarm(connection)
        self._release(connection)
        key = _peer_key(connection.getPeer())
        if self._by_peer.get(key) is connection:
            del self._by_peer[key]

    def _expired(self, connection):
        """The deadline passed: abort, TLS alert or not."""
        self._release(connection)
        self._note(
            "dropped {peer}: no WebSocket or HTTP request within {timeout} s",
            peer=_host(connection.getPeer()), timeout=self.timeout,
        )
        connection.transport.abortConnection()

    # --- the deadlines ---------------------------------------------------------

    def _arm(self, connection):
        """C{connection} is due C{timeout} seconds from now (a deadline it had is moved)."""
        deadlines = self._deadlines
        deadlines.pop(connection, None)
        deadlines[connection] = self.clock.seconds() + self.timeout
        if self._wake is None:
            self._wake = self.clock.callLater(self.timeout, self._deadlines_due)

    def _disarm(self, connection):
        """C{connection} has no deadline (any more)."""
        if self._deadlines.pop(connection, None) is not None and not self._deadlines:
            self._wake.cancel()
            self._wake = None

    def _deadlines_due(self):
        """
        The clock call: every connection whose deadline has come is aborted,
        soonest first; then a clock call for the next one, if any.
        """
        self._wake = None
        deadlines = self._deadlines
        now = self.clock.seconds()
        while deadlines:
            connection, due = next(iter(deadlines.items()))
            if due > now:
                self._wake = self.clock.callLater(due - now, self._deadlines_due)
                return
            del deadlines[connection]
            self._expired(connection)

    def _release(self, connection):
        self.pending.release(connection)
        self._waiting.pop(connection, None)

    def _evict_oldest(self):
        """
        Abort the connection that has waited longest in its handshake and
        free its slot now (its connectionLost comes later); False if there
        is none to abort.
        """
        if not self._waiting:
            return False
        oldest = next(iter(self._waiting))
        self._release(oldest)
        self._disarm(oldest)
        self._note(
            "dropped {peer}: longest waiting of {count} connections in handshake, to make room",
            peer=_host(oldest.getPeer()), count=self.pending.max_total,
        )
        oldest.transport.abortConnection()
        return True

    def _note(self, format, **fields):
        """Log an event a client can cause at will, within the log budget."""
        if not self._log_budget.allow():
            return
        suppressed = self._log_budget.take_suppressed()
        if suppressed:
            log.info("{count} connection guard lines were left out", count=suppressed)
        log.info(format, **fields)


class HeaderLimitChannel(http.HTTPChannel):
    """
    twisted.web's HTTP/1.1 channel, answering a request or header line over
    C{MAX_LENGTH} (16 KiB, LineReceiver's limit) with 431 and a JSON body.

    LineReceiver's default C{lineLengthExceeded} calls
    C{transport.loseConnection()} behind the channel's back, with the
    channel still registered as the transport's producer: nothing is
    answered and the connection stays open until the guard's deadline.
    C{HTTPChannel.loseConnection} unregisters first.  (Headers over 16 KiB
    in all, each line shorter, already get twisted.web's 400.)
    """

    def lineLengthExceeded(self, line):
        body = json.dumps({
            "error": "header_too_large",
            "message": f"a request or header line is over {self.MAX_LENGTH} bytes",
        }).encode()
        self.transport.write(
            b"HTTP/1.1 %d Request Header Fields Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (errors.HTTP_HEADER_TOO_LARGE, len(body), body)
        )
        self.loseConnection()
