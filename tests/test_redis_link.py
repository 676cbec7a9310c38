"""
The Redis link and the broker's wiring on a memory reactor: no Redis
process, no sockets.  A hand-written Redis (L{FakeRedis}, like Synapse's
FakeRedisPubSubServer in tests/replication/_base.py) takes the connection
attempts off C{MemoryReactorClock.tcpClients}, reads the RESP commands the
link writes to a C{StringTransport} and answers them by hand, so each test
decides exactly what Redis says and when.

What a real redis-server does (restarts, SIGSTOP, AUTH) is drilled in
tests/test_broker_redis.py; here: the handshake's order, timeouts that drop
the connection, the reconnect backoff, re-subscribing after a reconnect,
and the keepalive PING.
"""

import pytest
from twisted.internet import defer, error
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from chatd.broker import redis_link
from chatd.broker.redis import RedisBroker
from chatd.broker.redis_link import CommandProtocol, LinkFactory, RedisLink, SubscriberProtocol
from chatd.errors import BrokerUnavailable

TIMEOUT = 2.0


def parse_commands(data):
    """The RESP arrays of bulk strings in C{data}, as lists of str."""
    commands = []
    lines = data.split(b"\r\n")
    i = 0
    while i < len(lines) - 1:
        assert lines[i].startswith(b"*"), lines[i]
        count = int(lines[i][1:])
        args = []
        i += 1
        for _ in range(count):
            assert lines[i].startswith(b"$"), lines[i]
            args.append(lines[i + 1].decode())
            i += 2
        commands.append(args)
    return commands


def bulk(*items):
    """A RESP array of bulk strings (what a pub/sub message or SUBSCRIBE reply looks like)."""
    out = b"*%d\r\n" % len(items)
    for item in items:
        if isinstance(item, int):
            out += b":%d\r\n" % item
        else:
            data = item.encode()
            out += b"$%d\r\n%s\r\n" % (len(data), data)
    return out


class FakeConnection:
    """One accepted connection: what the client wrote, and a way to answer."""

    def __init__(self, protocol, transport):
        self.protocol = protocol
        self.transport = transport

    @property
    def client(self):
        """The link's protocol (under the endpoint's wrapper)."""
        protocol = getattr(self.protocol, "_wrappedProtocol", self.protocol)
        return getattr(protocol, "_protocol", protocol)  # ClientService's proxy

    def commands(self):
        """What the client sent since the last look."""
        sent = parse_commands(self.transport.value())
        self.transport.clear()
        return sent

    def reply(self, data):
        self.protocol.dataReceived(data)

    @property
    def aborted(self):
        return self.transport.disconnecting

    def lose(self):
        """The connection ends (as the reactor reports a lost TCP connection)."""
        self.transport.disconnecting = True
        self.protocol.connectionLost(Failure(error.ConnectionDone()))


class FakeRedis:
    """Accepts the connection attempts a memory reactor recorded."""

    def __init__(self, reactor):
        self.reactor = reactor
        self._taken = 0

    @property
    def attempts(self):
        return len(self.reactor.tcpClients)

    def accept(self):
        """Complete the oldest connection attempt not yet accepted."""
        assert self._taken < self.attempts, "no connection attempt to accept"
        factory = self.reactor.tcpClients[self._taken][2]
        self._taken += 1
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return FakeConnection(protocol, transport)


def handshake(conn, expect=(["PING"],)):
    """Answer the handshake: +OK to each command but PING, +PONG to that."""
    for command in expect:
        assert conn.commands() == [list(command)]
        conn.reply(b"+PONG\r\n" if command[0] == "PING" else b"+OK\r\n")


def make_link(reactor, protocol_class=CommandProtocol, **options):
    options.setdefault("timeout", TIMEOUT)
    link = RedisLink("commands", protocol_class, TCP4ClientEndpoint(reactor, "127.0.0.1", 6379),
                     reactor, **options)
    link.service.startService()
    return link


def fired(d):
    results = []
    d.addBoth(results.append)
    return results


def test_handshake_auth_select_ping_then_ready():
    """
    AUTH (with the ACL user), SELECT, PING, each after the previous answer,
    then the owner's on_ready; the link is usable only after all of them.
    """
    reactor = MemoryReactorClock()
    gate = defer.Deferred()
    seen = []

    def on_ready(link, protocol):
        seen.append(protocol)
        return gate

    link = make_link(reactor, password="pw", username="bot", db=3, on_ready=on_ready)
    ready = fired(link.when_ready())
    conn = FakeRedis(reactor).accept()
    assert conn.commands() == [["AUTH", "bot", "pw"]]
    assert link.protocol is None
    conn.reply(b"+OK\r\n")
    assert conn.commands() == [["SELECT", "3"]]
    conn.reply(b"+OK\r\n")
    assert conn.commands() == [["PING"]]
    conn.reply(b"+PONG\r\n")
    assert seen == [conn.client] and link.protocol is None and ready == []
    gate.callback(None)
    assert link.protocol is conn.client and ready == [None]
    assert fired(link.when_ready()) == [None]


def test_refused_auth_is_retried_with_growing_delays(logged_failures):
    """
    A Redis that accepts TCP and refuses AUTH: the connection is dropped
    and retried with exponential backoff (failed handshakes count although
    TCP connected), capped at RECONNECT_MAX_DELAY; never given up.
    """
    logged_failures.expect("refused AUTH: WRONGPASS")
    reactor = MemoryReactorClock()
    redis = FakeRedis(reactor)
    link = make_link(reactor, password="wrong")
    delays = []
    for _ in range(9):
        conn = redis.accept()
        assert conn.commands() == [["AUTH", "wrong"]]
        conn.reply(b"-WRONGPASS invalid username-password pair\r\n")
        assert conn.aborted and link.protocol is None
        conn.lose()
        attempts, waited = redis.attempts, 0.0
        for _ in range(1000):  # bounded: 10 s in 10 ms steps
            if redis.attempts > attempts:
                break
            reactor.advance(0.01)
            waited += 0.01
        assert redis.attempts == attempts + 1, "no retry within 10 s"
        delays.append(waited)
    base = redis_link.RECONNECT_INITIAL_DELAY
    for n, delay in enumerate(delays):
        expected = min(base * 2 ** n, redis_link.RECONNECT_MAX_DELAY)
        assert expected - 0.011 <= delay <= expected + 0.2 * base + 0.011, (n, delays)


def test_call_timeout_drops_the_connection_and_fails_unavailable():
    """
    A call Redis does not answer within the timeout fails with
    BrokerUnavailable and drops the connection (later replies could be
    matched to the wrong calls); calls then fail at once until the link
    reconnected, which it does by itself.
    """
    reactor = MemoryReactorClock()
    redis = FakeRedis(reactor)
    link = make_link(reactor)
    conn = redis.accept()
    handshake(conn)
    result = fired(link.command("GET", "k"))
    assert conn.commands() == [["GET", "k"]]
    reactor.advance(TIMEOUT - 0.01)
    assert result == [] and link.protocol is conn.client
    reactor.advance(0.02)
    assert isinstance(result[0].value, BrokerUnavailable)
    assert conn.aborted and link.protocol is None
    assert fired(link.when_ready()) == []
    assert isinstance(fired(link.command("GET", "k"))[0].value, BrokerUnavailable)
    conn.lose()
    reactor.advance(redis_link.RECONNECT_INITIAL_DELAY * 1.2 + 0.01)
    again = redis.accept()
    handshake(again)
    assert link.protocol is again.client


def test_handshake_timeout_drops_and_retries():
    """A PING unanswered during the handshake: dropped, not usable, retried."""
    reactor = MemoryReactorClock()
    redis = FakeRedis(reactor)
    link = make_link(reactor)
    conn = redis.accept()
    assert conn.commands() == [["PING"]]
    reactor.advance(TIMEOUT + 0.01)
    assert conn.aborted and link.protocol is None
    conn.lose()
    reactor.advance(redis_link.RECONNECT_INITIAL_DELAY * 1.2 + 0.01)
    handshake(redis.accept())
    assert link.protocol is not None


def test_keepalive_notices_a_silent_redis():
    """
    With no call in flight, the keepalive PING notices a Redis that stopped
    answering within keepalive + timeout, so /healthz can say so.
    """
    reactor = MemoryReactorClock()
    link = make_link(reactor, keepalive=0.5)
    conn = FakeRedis(reactor).accept()
    handshake(conn)
    reactor.advance(0.5)
    assert conn.commands() == [["PING"]]
    conn.reply(b"+PONG\r\n")
    reactor.advance(0.5)
    assert conn.commands() == [["PING"]]  # ...never answered
    reactor.advance(TIMEOUT + 0.01)
    assert link.protocol is None and conn.aborted


def test_stopping_the_service_closes_and_does_not_reconnect():
    """stopService closes the connection; no retry is scheduled afterwards."""
    reactor = MemoryReactorClock()
    redis = FakeRedis(reactor)
    link = make_link(reactor, keepalive=0.5)
    conn = redis.accept()
    handshake(conn)
    stopped = fired(link.service.stopService())
    assert conn.transport.disconnecting
    conn.lose()
    assert stopped == [None] and link.protocol is None
    reactor.advance(60)
    assert redis.attempts == 1


def _subscriber_fed(chunks):
    class _Link:
        def __init__(self):
            self.messages = []

        def connection_made(self, protocol):
            pass

        def connection_lost(self, protocol, why):
            pass

        def messages_received(self, messages):
            self.bursts.append(list(messages))
            self.messages.extend(messages)

    link = _Link()
    link.bursts = []
    protocol = LinkFactory(link, SubscriberProtocol, MemoryReactorClock()).buildProtocol(None)
    protocol.makeConnection(StringTransport())
    for chunk in chunks:
        protocol.dataReceived(chunk)
    _subscriber_fed.bursts = link.bursts
    return link.messages


def test_a_burst_is_parsed_in_one_turn():
    """
    Every pub/sub message in the buffer is handled within one dataReceived
    (txredisapi alone defers the rest of the buffer to the next reactor
    turn after each bulk string); any split of the bytes gives the same.
    """
    def publish(n):
        payload = f"1-{n} 1 1 " + '{"type":"TALK","message":"' + "é" * (n % 7) + '"}'
        data = payload.encode()
        return b"*3\r\n$7\r\nmessage\r\n$20\r\nchatd:0:events:lobby\r\n$%d\r\n%s\r\n" % (len(data), data)

    stream = b"".join(publish(n) for n in range(200))
    expected = [("chatd:0:events:lobby", publish(n).split(b"\r\n")[-2].decode()) for n in range(200)]
    assert _subscriber_fed([stream]) == expected
    assert _subscriber_fed([stream[i:i + 1] for i in range(len(stream))]) == expected
    assert _subscriber_fed([stream[i:i + 97] for i in range(0, len(stream), 97)]) == expected


def _published(n, channel="chatd:0:events:lobby"):
    return bulk("message", channel, f"1-{n} 1 1 {{}}")


def test_a_reads_messages_are_handed_on_as_one_burst():
    """
    The messages parsed from one read reach the link together, in order;
    a message cut by the read's end comes with the next read's.
    """
    stream = b"".join(_published(n) for n in range(5))
    cut = len(b"".join(_published(n) for n in range(3))) + 10
    assert _subscriber_fed([stream]) == [("chatd:0:events:lobby", f"1-{n} 1 1 {{}}") for n in range(5)]
    assert [len(burst) for burst in _subscriber_fed.bursts] == [5]
    _subscriber_fed([stream[:cut], stream[cut:]])
    assert [[m.split()[0] for _, m in burst] for burst in _subscriber_fed.bursts] == [
        ["1-0", "1-1", "1-2"], ["1-3", "1-4"],
    ]


def test_a_reply_between_messages_comes_after_those_read_before_it():
    """
    A SUBSCRIBE's answer read between messages: the messages before it are
    handed on before the answer's Deferred fires, the rest after it.
    """
    seen = []

    class _Link:
        def connection_made(self, protocol):
            pass

        def connection_lost(self, protocol, why):
            pass

        def messages_received(self, messages):
            seen.append([m.split()[0] for _, m in messages])

    protocol = LinkFactory(_Link(), SubscriberProtocol, MemoryReactorClock()).buildProtocol(None)
    protocol.makeConnection(StringTransport())
    protocol.subscribe("chatd:0:events:ops").addCallback(lambda _: seen.append("subscribed"))
    protocol.dataReceived(
        _published(1) + _published(2) + bulk("subscribe", "chatd:0:events:ops", 2) + _published(3)
    )
    assert seen == [["1-1", "1-2"], "subscribed", ["1-3"]]


# --- the broker's wiring ------------------------------------------------------------


CONTROL = "chatd:0:control"


@pytest.fixture
def memory_broker():
    """A RedisBroker on a memory reactor, both links through their handshake."""
    reactor = MemoryReactorClock()
    redis = FakeRedis(reactor)
    broker = RedisBroker(reactor, "127.0.0.1", 6379, timeout=TIMEOUT, presence_ttl=30.0,
                         instance_id="abc")
    deliveries = []
    broker.set_feed(deliveries.append)
    broker.startService()
    commands = redis.accept()
    handshake(commands)
    subscriber = redis.accept()
    handshake(subscriber)
    assert not broker.is_available()  # not before the control channel is subscribed
    assert subscriber.commands() == [["SUBSCRIBE", CONTROL]]
    subscriber.reply(bulk("subscribe", CONTROL, 1))
    assert broker.is_available()
    return reactor, redis, broker, commands, subscriber, deliveries


def test_subscribes_again_after_a_reconnect(memory_broker):
    """
    The subscriber connection is lost: the broker is unavailable until the
    new connection has subscribed again to every wanted room (and not to a
    room left meanwhile); then events flow to the feed again.
    """
    reactor, redis, broker, commands, subscriber, deliveries = memory_broker
    channel = "chatd:0:events:{}".format
    for room in ("lobby", "ops"):
        d = fired(broker.subscribe(room))
        assert subscriber.commands() == [["SUBSCRIBE", channel(room)]]
        subscriber.reply(bulk("subscribe", channel(room), 1))
        assert d == [None]
    subscriber.lose()
    assert not broker.is_available()
    fired(broker.unsubscribe("ops"))  # left while disconnected: nothing to send
    reactor.advance(redis_link.RECONNECT_INITIAL_DELAY * 1.2 + 0.01)
    again = redis.accept()
    handshake(again)
    assert again.commands() == [["SUBSCRIBE", CONTROL]]
    again.reply(bulk("subscribe", CONTROL, 2))
    assert again.commands() == [["SUBSCRIBE", channel("lobby")]]
    assert not broker.is_available()
    again.reply(bulk("subscribe", channel("lobby"), 1))
    assert broker.is_available()
    again.reply(bulk("message", channel("lobby"),
                     '1-5 1 7 {"type":"TALK","room":"lobby","sender":"A","message":"hi"}'))
    again.reply(bulk("message", channel("ops"),
                     '1-6 1 7 {"type":"TALK","room":"ops","sender":"A","message":"no"}'))
    assert [d.event.message for d in deliveries] == ["hi"]


def test_a_burst_goes_to_the_feed_together_and_control_in_its_place(memory_broker):
    """
    The events of one read go to the feed's burst target as one list, in
    order (a lone event to the plain feed); a control command read among
    them is carried out in its place; a room not subscribed is left out.
    """
    reactor, redis, broker, commands, subscriber, deliveries = memory_broker
    bursts, controls = [], []
    broker.set_feed(deliveries.append, lambda burst: bursts.append([d.event.message for d in burst]))
    broker.set_control(lambda control: controls.append((control.op, control.sub, len(bursts))))
    _subscribed(broker, subscriber)

    def talk(n, room="lobby"):
        return bulk("message", f"chatd:0:events:{room}",
                    f'1-{n} 1 7 {{"type":"TALK","room":"{room}","sender":"A","message":"m{n}"}}')

    kick = bulk("message", CONTROL, '{"op":"KICK","sub":"bob","room":"lobby"}')
    subscriber.reply(talk(1) + talk(2) + talk(3, "ops") + kick + talk(4) + talk(5) + talk(6))
    assert bursts == [["m1", "m2"], ["m4", "m5", "m6"]]
    assert controls == [("KICK", "bob", 1)]
    subscriber.reply(talk(7))
    assert [d.event.message for d in deliveries] == ["m7"] and len(bursts) == 2


def _talk_envelope(commands):
    """The TALK envelope of the TALK script call among C{commands}."""
    for command in commands:
        if command[0] in ("EVAL", "EVALSHA"):
            for arg in command[3 + int(command[2]):]:
                if arg.startswith('{"type":"TALK"'):
                    return arg
    raise AssertionError(f"no TALK call in {commands}")


def _member():
    from chatd.broker.interfaces import Member

    return Member("abc:1", "alice", "Alice")


def _subscribed(broker, subscriber, room="lobby"):
    d = fired(broker.subscribe(room))
    subscriber.commands()
    subscriber.reply(bulk("subscribe", f"chatd:0:events:{room}", 1))
    assert d == [None]


def test_talk_timed_out_then_published_is_not_a_second_answer(memory_broker):
    """
    A TALK whose call timed out was answered `unavailable`; when Redis runs
    it after all and its event comes through the feed, it goes out as a
    room event without the sender's ref, not as a second answer.
    """
    reactor, redis, broker, commands, subscriber, deliveries = memory_broker
    _subscribed(broker, subscriber)
    answer = fired(broker.talk("lobby", _member(), "hi", cid="c1", ref="r1"))
    envelope = _talk_envelope(commands.commands())
    reactor.advance(TIMEOUT + 0.01)
    assert isinstance(answer[0].value, BrokerUnavailable)
    subscriber.reply(bulk("message", "chatd:0:events:lobby", "1-7 1 5 " + envelope))
    assert [(d.event.message, d.origin, d.ref) for d in deliveries] == [("hi", "abc:1", None)]


def test_talk_published_before_its_reply_is_answered_once(memory_broker):
    """
    The feed brings a TALK's event before the script's reply: that is the
    answer (the sender's ref on it); a timeout of the call afterwards is
    not a second one.
    """
    reactor, redis, broker, commands, subscriber, deliveries = memory_broker
    _subscribed(broker, subscriber)
    answer = fired(broker.talk("lobby", _member(), "hi", cid="c1", ref="r1"))
    envelope = _talk_envelope(commands.commands())
    subscriber.reply(bulk("message", "chatd:0:events:lobby", "1-7 1 5 " + envelope))
    assert [(d.event.message, d.ref) for d in deliveries] == [("hi", "r1")]
    assert answer[0].event.id == "1-7" and answer[0].duplicate is False
    reactor.advance(TIMEOUT + 0.01)
    assert len(answer) == 1 and len(deliveries) == 1


def test_a_reaped_member_still_here_is_put_back_not_told_to_leave(memory_broker):
    """
    The feed brings a reaping QUIT (another instance took this one for
    dead) for a member this instance still has: the QUIT is not delivered
    here, and the member is put back at once with REASSERT (which
    publishes an ENTER).  A reaping QUIT for a member that left is
    delivered as any QUIT.
    """
    from chatd.broker import redis_scripts as scripts

    reactor, redis, broker, commands, subscriber, deliveries = memory_broker
    _subscribed(broker, subscriber)
    alice = _member()
    entering = fired(broker.enter("lobby", alice))
    commands.commands()
    commands.reply(bulk("1-1 1 5 " + scripts.enter_envelope("lobby", alice)))
    assert entering and entering[0].event.type == "ENTER"
    reaped = "1-2 0 6 " + scripts.member_envelope("lobby", alice)
    subscriber.reply(bulk("message", "chatd:0:events:lobby", reaped))
    assert [d.event.type for d in deliveries] == []
    sent = [c for c in commands.commands() if c[0] in ("EVAL", "EVALSHA")]
    assert len(sent) == 1 and sent[0][3 + int(sent[0][2]):][2] == "abc:1"  # REASSERT of alice
    bob = alice.__class__("abc:2", "bob", "Bob")
    gone = "1-3 1 7 " + scripts.member_envelope("lobby", bob)
    subscriber.reply(bulk("message", "chatd:0:events:lobby", gone))
    assert [(d.event.type, d.event.sender) for d in deliveries] == [("QUIT", "Bob")]
