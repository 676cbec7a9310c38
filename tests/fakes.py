"""
Test doubles shared by the unit tests: connections, a token verifier and a
broker that records and fails on demand.  The process machinery (real
twistd, redis-server, clients) is in tests/support.py.
"""

import json

from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet import defer
from zope.interface import implementer

from chatd.auth import InvalidToken
from chatd.broker.memory import MemoryBroker
from chatd.errors import BrokerUnavailable
from chatd.hub import IConnection
from chatd.observer import OneShotObserverList


@implementer(IConnection)
class FakeConnection:
    """
    A connection that keeps what it was sent, decoded, in order.

    @ivar shared: the C{str} objects given to C{send_shared}, as they were
        (so tests can tell one shared text from equal copies).
    @ivar closes: C{(code, reason)} of each C{close} call.
    """

    def __init__(self, connection_id="i:1"):
        self.connection_id = connection_id
        self.frames = []
        self.shared = []
        self.closes = []
        self.draining = None

    def send_text(self, text):
        self.frames.append(json.loads(text))

    def send_shared(self, text):
        self.shared.append(text)
        self.frames.append(json.loads(text))

    def close(self, code, reason):
        self.closes.append((code, reason))

    def when_drained(self):
        """At once, unless the test made the buffer full (C{fill()})."""
        if self.draining is None:
            return defer.succeed(None)
        return self.draining.when_fired()

    def fill(self):
        """From now on the send buffer is full, until C{drain()}."""
        self.draining = OneShotObserverList()

    def drain(self):
        draining, self.draining = self.draining, None
        draining.fire(None)

    def take(self):
        """The frames received since the last take()."""
        frames, self.frames = self.frames, []
        return frames


class FakeVerifier:
    """Tokens by name: the JWT rules have their own tests (test_auth)."""

    def __init__(self, principals):
        self.principals = principals

    def verify(self, token):
        if token not in self.principals:
            raise InvalidToken("bad signature")
        return self.principals[token]


class RecordingBroker(MemoryBroker):
    """
    The embedded broker, remembering (un)subscriptions; can be made to fail.

    @ivar calls: C{("subscribe" or "unsubscribe", room)}, in order.
    @ivar down: names of methods that fail with L{BrokerUnavailable}.
    @ivar broken: method name -> an exception that method fails with.
    @ivar held: a Deferred C{enter()} answers through, when set (the ENTER
        is published at once; its reply waits for the test).
    """

    def __init__(self, clock, **kwargs):
        kwargs.setdefault("history_size", 10)
        kwargs.setdefault("instance_id", "i")
        super().__init__(clock, **kwargs)
        self.calls = []
        self.down = set()
        self.broken = {}
        self.held = None

    def _maybe_fail(self, name):
        if name in self.broken:
            return defer.fail(self.broken[name])
        if name in self.down:
            return defer.fail(BrokerUnavailable(f"{name}: redis down"))
        return None

    def subscribe(self, room):
        self.calls.append(("subscribe", room))
        return self._maybe_fail("subscribe") or super().subscribe(room)

    def unsubscribe(self, room):
        self.calls.append(("unsubscribe", room))
        return super().unsubscribe(room)

    def enter(self, room, member, since=None, ref=None):
        failed = self._maybe_fail("enter")
        if failed:
            return failed
        d = super().enter(room, member, since, ref)
        if self.held is None:
            return d
        entered = []
        d.addCallback(entered.append)
        held, self.held = self.held, None
        return held.addCallback(lambda _: entered[0])

    def talk(self, room, member, text, cid=None, ref=None):
        return self._maybe_fail("talk") or super().talk(room, member, text, cid, ref)

    def quit(self, room, member, ref=None):
        return self._maybe_fail("quit") or super().quit(room, member, ref)


class MemoryClient(WebSocketClientProtocol):
    """
    An Autobahn client for in-memory connections (create_memory_agent):
    records what it receives, decoded, and the close code.
    """

    def __init__(self):
        super().__init__()
        self.received = []
        self.closed = None

    def onMessage(self, payload, isBinary):
        self.received.append(json.loads(payload))

    def onClose(self, wasClean, code, reason):
        self.closed = code


class Pumps:
    """An in-memory agent's IOPumps, flushed when the test says (not on a real reactor)."""

    def __init__(self):
        self.pumps = []

    def add(self, pump):
        self.pumps.append(pump)

    def flush(self):
        for pump in self.pumps:
            pump.flush(advanceClock=False)
