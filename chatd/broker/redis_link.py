# -*- test-case-name: tests.test_redis_link,tests.test_broker_redis -*-
"""
One Redis connection kept open: L{RedisLink}, its factory and protocols.

Each connection is a txredisapi protocol (L{txredisapi.RedisProtocol},
L{txredisapi.SubscriberProtocol}) kept open by Twisted's C{ClientService}
rather than by txredisapi's own factory, on purpose:

  - txredisapi's C{connectionMade} calls C{factory.stopTrying()} when AUTH
    or SELECT fails or times out, so a Redis that is merely slow to answer
    a reconnect (SIGSTOP, a long fork) would end reconnection for good.
    Here the handshake is ours, and a failed one only drops the connection
    and backs off.
  - txredisapi's connection handler queues calls while it is disconnected,
    with no timeout at all.  Here a call without a usable connection fails
    at once with L{BrokerUnavailable}, and every call has the [redis]
    timeout: a call that is not answered in time fails and drops the
    connection, so a stopped Redis shows as unavailable, not as hangs.
  - C{convertNumbers} is off (ids and epochs stay strings), and the
    reactor is the injected one, also for txredisapi's own C{callLater}.
  - Nothing connects before C{startService}.

The link knows nothing of rooms: what to do once connected (subscribe
again, register the instance) is the C{on_ready} callback of whoever owns
the link (L{chatd.broker.redis.RedisBroker}).
"""

import random

import txredisapi
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from chatd.errors import BrokerUnavailable
from chatd.logs import printable
from chatd.observer import OneShotObserverList

log = Logger()

RECONNECT_INITIAL_DELAY = 0.1  # seconds before the first retry; doubled per failure...
RECONNECT_MAX_DELAY = 5.0  # ...up to this, plus up to 20% jitter
RECONNECT_FACTOR = 2.0


def _jitter():
    return random.uniform(0.0, 0.2 * RECONNECT_INITIAL_DELAY)


class _LinkProtocolMixin:
    """
    Reports connection and loss to the link; never asks txredisapi to stop
    trying.  Also parses all the data at hand in one reactor turn.
    """

    _rest = None

    def setLineMode(self, extra=b""):
        # txredisapi's LineReceiver pauses the transport after every bulk
        # string and hands the rest of the buffer to callLater(0): one
        # reactor turn per bulk, so a burst of pub/sub messages would be
        # fanned out one message per turn, each flushed to every WebSocket
        # on its own.  Keep the rest for dataReceived's loop instead.
        self.line_mode = 1
        if extra:
            self._rest = extra

    def dataReceived(self, data, unpause=False):
        """LineReceiver API: parse every complete reply in C{data} now."""
        while data:
            super().dataReceived(data)
            data, self._rest = self._rest, None

    def connectionMade(self):
        """Protocol API: the link runs the handshake, not txredisapi."""
        # Commands are small and pipelined (each TALK is one EVALSHA while
        # others await their replies): without TCP_NODELAY, Nagle holds
        # each behind the previous one's acknowledgement.  Redis sets it on
        # its side; redis-py and hiredis set it on theirs.  Not on UNIX
        # sockets, which have no such option.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        # password and dbid are None, so txredisapi's connectionMade only
        # marks the protocol usable.
        super().connectionMade()
        self.factory.link.connection_made(self)

    def connectionLost(self, why):
        """Protocol API: txredisapi fails the pending calls; the link forgets us."""
        super().connectionLost(why)
        self.factory.link.connection_lost(self, why)


class CommandProtocol(_LinkProtocolMixin, txredisapi.RedisProtocol):
    """Commands and scripts."""


class SubscriberProtocol(_LinkProtocolMixin, txredisapi.SubscriberProtocol):
    """
    SUBSCRIBE and the messages it brings (a subscribed connection can do
    nothing else).  The messages parsed from one read are handed on
    together, as one burst, at the end of the read (or before any other
    reply, so a SUBSCRIBE's answer still comes after the messages read
    before it).
    """

    _burst = None  # the messages of the read being parsed

    def dataReceived(self, data, unpause=False):
        """LineReceiver API: parse every complete reply in C{data}, then hand on its messages."""
        if self._burst is not None:  # not expected: a read inside a read
            return super().dataReceived(data, unpause)
        self._burst = []
        try:
            super().dataReceived(data, unpause)
        finally:
            self._hand_on()
            self._burst = None

    def _hand_on(self):
        burst = self._burst
        if burst:
            self._burst = []
            self.factory.link.messages_received(burst)

    def replyReceived(self, reply):
        """BaseRedisProtocol API: messages join the burst; anything else comes after it."""
        if (
            self._burst is not None and isinstance(reply, list) and len(reply) >= 3
            and reply[-3] in ("message", b"message")
        ):
            self._burst.append((reply[-2], reply[-1]))
            return
        self._hand_on()
        super().replyReceived(reply)

    def messageReceived(self, pattern, channel, message):
        """SubscriberProtocol API (a message outside a read's burst)."""
        self.factory.link.messages_received([(channel, message)])


class LinkFactory(protocol.Factory):
    """
    Builds txredisapi protocols without txredisapi's factory: its options
    go to C{__init__} (as its C{RedisFactory} passes them), the clock is
    the injected one, and the link is reachable as C{factory.link}.
    """

    noisy = False

    def __init__(self, link, protocol_class, clock):
        self.link = link
        self.protocol_class = protocol_class
        self.clock = clock

    def buildProtocol(self, addr):
        """Factory API"""
        built = self.protocol_class(
            charset="utf-8", errors="strict", replyTimeout=None,
            password=None, dbid=None, convertNumbers=False,
        )
        built.factory = self
        built.callLater = self.clock.callLater  # not the global reactor's
        return built


class RedisLink:
    """
    One Redis connection, kept open with backoff, usable only once its
    handshake (AUTH, SELECT, PING, then C{on_ready}) went through.

    C{protocol} is the usable protocol or L{None}; callers never wait for a
    connection: without one they fail at once.  C{service} is the
    C{ClientService} to attach to a parent service.
    """

    def __init__(self, name, protocol_class, endpoint, clock, timeout,
                 password=None, username=None, db=0, on_ready=None, on_message=None,
                 keepalive=None):
        """
        @param name: for log lines ("commands", "subscriber").
        @param protocol_class: L{CommandProtocol} or L{SubscriberProtocol}.
        @param endpoint: a client endpoint to Redis.
        @param timeout: seconds any call (the handshake's too) may take.
        @param on_ready: C{on_ready(link, protocol)} returning a Deferred or
            awaitable, run at the end of each handshake: the link is usable
            only once it succeeded.
        @param on_message: C{on_message(messages)} for pub/sub: the
            C{(channel, message)} pairs read together, in order.
        @param keepalive: seconds between PINGs while the link is usable, so
            that a silent or frozen Redis is noticed (the PING times out and
            drops the connection) even when nothing else is asked of it;
            L{None} for none.
        """
        self.name = name
        self.protocol = None
        self._clock = clock
        self._timeout = timeout
        self._password = password
        self._username = username
        self._db = db
        self._on_ready = on_ready
        self._on_message = on_message
        self._failed_handshakes = 0
        self._keepalive = keepalive
        self._pinger = None
        self._ready = OneShotObserverList()
        self._backoff = backoffPolicy(
            initialDelay=RECONNECT_INITIAL_DELAY / RECONNECT_FACTOR,
            maxDelay=RECONNECT_MAX_DELAY, factor=RECONNECT_FACTOR, jitter=_jitter,
        )
        self.service = ClientService(
            endpoint, LinkFactory(self, protocol_class, clock),
            retryPolicy=self._retry_delay, clock=clock,
        )

    def _retry_delay(self, attempt):
        # ClientService forgets failures once TCP connects; a connection
        # whose handshake fails still counts, or a Redis that accepts and
        # then refuses would be retried in a tight loop.
        return self._backoff(max(attempt, self._failed_handshakes))

    def when_ready(self):
        """A Deferred that fires (with nothing) once the link is usable."""
        return self._ready.when_fired()

    def call(self, what, issue, protocol=None):
        """
        Run C{issue(protocol)} (a txredisapi call returning a Deferred) with
        the timeout.

        @param what: the command's name, for log lines.
        @param protocol: the connection to use (the handshake's, before it
            is usable); the usable one by default.
        @raise BrokerUnavailable: (in the Deferred) with no usable
            connection, on a timeout (which also drops the connection: its
            replies can no longer be matched to calls), on an error reply
            and on a lost connection.
        """
        if protocol is None:
            protocol = self.protocol
        if protocol is None:
            return defer.fail(BrokerUnavailable(f"redis ({self.name}) is not connected"))
        d = defer.maybeDeferred(issue, protocol)
        d.addTimeout(self._timeout, self._clock)
        d.addErrback(self._failed, protocol, what)
        return d

    def command(self, *args):
        """L{call} of one command, C{args[0]} its name."""
        return self.call(args[0], lambda p: p.execute_command(*args))

    def _failed(self, failure, protocol, what):
        if failure.check(defer.TimeoutError):
            log.warn(
                "redis ({link}) did not answer {command} within {timeout}s; dropping the connection",
                link=self.name, command=what, timeout=self._timeout,
            )
            self.drop(protocol)
            raise BrokerUnavailable(f"redis ({self.name}) timed out") from None
        if failure.check(txredisapi.ResponseError):
            log.error(
                "redis ({link}) refused {command}: {why}",
                link=self.name, command=what, why=printable(failure.getErrorMessage()),
            )
            raise BrokerUnavailable(f"redis ({self.name}) refused {what}") from None
        if failure.check(txredisapi.ConnectionError, txredisapi.InvalidResponse):
            raise BrokerUnavailable(f"redis ({self.name}) connection lost") from None
        return failure

    # --- what the protocol reports ------------------------------------------

    def connection_made(self, protocol):
        """A TCP connection is up: run the handshake on it."""
        d = defer.ensureDeferred(self._handshake(protocol))
        d.addErrback(self._handshake_failed, protocol)

    async def _handshake(self, protocol):
        if self._password is not None:
            args = ("AUTH", self._username, self._password) if self._username else ("AUTH", self._password)
            await self.call("AUTH", lambda p: p.execute_command(*args), protocol)
        if self._db:
            await self.call("SELECT", lambda p: p.execute_command("SELECT", self._db), protocol)
        await self.call("PING", lambda p: p.execute_command("PING"), protocol)
        if self._on_ready is not None:
            await self._on_ready(self, protocol)
        if not protocol.connected:
            raise BrokerUnavailable("lost during the handshake")
        self.protocol = protocol
        self._failed_handshakes = 0
        log.info("redis ({link}) connected to {peer}", link=self.name, peer=_peer(protocol))
        if self._keepalive is not None:
            self._pinger = task.LoopingCall(self._ping, protocol)
            self._pinger.clock = self._clock
            self._pinger.start(self._keepalive, now=False)
        self._ready.fire_if_not_fired(None)

    def _ping(self, protocol):
        d = self.call("PING", lambda p: p.execute_command("PING"), protocol)
        return d.addErrback(lambda f: f.trap(BrokerUnavailable))  # the link logged it

    def _handshake_failed(self, failure, protocol):
        self._failed_handshakes += 1
        if not failure.check(BrokerUnavailable):
            log.failure("redis ({link}) handshake failed", failure, link=self.name)
        elif self._failed_handshakes == 1:
            log.warn(
                "redis ({link}) handshake failed: {why}; retrying",
                link=self.name, why=failure.getErrorMessage(),
            )
        if protocol.connected:
            self.drop(protocol)

    def _unusable(self, protocol):
        if protocol is self.protocol:
            self.protocol = None
            self._ready.reset()
            if self._pinger is not None:
                if self._pinger.running:
                    self._pinger.stop()
                self._pinger = None
            return True
        return False

    def drop(self, protocol):
        """Abort C{protocol}'s connection; unusable from now on, not from when the reactor reports it."""
        self._unusable(protocol)
        if protocol.transport is not None:
            protocol.transport.abortConnection()

    def connection_lost(self, protocol, why):
        """The TCP connection is gone; C{ClientService} reconnects."""
        if not self._unusable(protocol):
            return
        if not self.service.running:
            log.info("redis ({link}) connection closed", link=self.name)
            return
        log.warn("redis ({link}) connection lost ({why}); reconnecting", link=self.name,
                 why=why.getErrorMessage().rstrip("."))

    def messages_received(self, messages):
        """
        Pub/sub messages read together, C{[(channel, message), ...]} in
        order, for C{on_message}.
        """
        if self._on_message is not None:
            self._on_message(messages)


def _peer(protocol):
    peer = protocol.transport.getPeer() if protocol.transport is not None else None
    return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
