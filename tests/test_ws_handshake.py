# -*- test-case-name: tests.test_ws_handshake -*-
"""
chatd's own opening handshake (L{chatd.ws._GuardedMixin.processHandshake})
against Autobahn's: for generated requests, accepted and refused, common
and unusual, in any chunks, with frames behind the head, both write the
same bytes, log the same lines and leave the connection, the factory, the
broker and the timers in the same state.  In process, on StringTransports
and a MemoryReactorClock, with the real ChatServerFactory, hub and
embedded broker.
"""

import base64
import dataclasses
import gc
import hashlib
import json
import os
import time
import types

import txaio
from autobahn.websocket import protocol as autobahn_protocol
from autobahn.websocket.protocol import TrafficStats
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from chatd import config, timers, ws
from chatd.auth import Principal, TokenVerifier
from chatd.broker.memory import MemoryBroker
from chatd.hub import Hub
from tests import rawws

SECRET = b"s" * 32
ORIGIN = "https://chat.example"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
NOW = 1_800_000_000


class AutobahnHandshake(ws.ChatServerProtocol):
    """
    /ws with Autobahn's own opening handshake for every request (and
    chatd's hold of what comes while onConnect's answer is due).
    """

    def _common_request(self, text):
        return None


# Whether chatd took each request itself (True) or left it to Autobahn.
TAKEN = []


class Lean(ws.ChatServerProtocol):
    """/ws as chatd serves it, noting in L{TAKEN} which path each request took."""

    def _common_request(self, text):
        request = super()._common_request(text)
        TAKEN.append(request is not None)
        return request


class HeldBroker(MemoryBroker):
    """An embedded broker whose redemptions wait until L{release} (as Redis's do)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held = []

    def redeem_ticket(self, ticket):
        d = defer.Deferred()
        self.held.append((d, super().redeem_ticket(ticket)))
        return d

    def release(self):
        held, self.held = self.held, []
        for d, redeemed in held:
            redeemed.chainDeferred(d)


TICKETS = ("good", "used", "expired")


class Transport(StringTransport):
    """
    A StringTransport that, as TCP's and TLS's do, lets a producer be
    unregistered when none is (a connection refused twice, by Autobahn for a
    second head behind the first and then by onConnect, drops it twice).
    """

    def unregisterProducer(self):
        if self.producer is not None:
            super().unregisterProducer()


class World:
    """A ChatServerFactory serving one protocol class, its broker holding L{TICKETS}."""

    def __init__(self, protocol, compression=False, origins=(ORIGIN,), ping=0, connect_auth=False, held=False):
        settings = dataclasses.replace(config.defaults(
            server__allowed_origins=origins, websocket__ping_interval=ping,
            websocket__compression=compression, stomp__connect_auth=connect_auth,
        ), jwt_key=SECRET)
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.broker = (HeldBroker if held else MemoryBroker)(self.reactor, instance_id="i1")
        self.factory = ws.ChatServerFactory(
            settings, self.broker, Hub(self.broker), TokenVerifier.from_settings(settings), None, self.reactor,
        )
        self.factory.protocol = protocol
        for ticket in TICKETS:
            exp = NOW if ticket == "expired" else NOW + 3600
            self.broker.issue_ticket(ticket, Principal(sub="alice", name="Alice", exp=exp), 30)
        MemoryBroker.redeem_ticket(self.broker, "used")

    def serve(self, chunks):
        """
        One connection that receives C{chunks}, then, at the clock's next
        turns, held redemptions, 11 s (past the handshake timeout), and a
        ping interval more.

        @return: what could be seen after each stage (L{observe}).
        """
        logged = []
        globalLogPublisher.addObserver(logged.append)
        saved = txaio.config.loop, autobahn_protocol.time, autobahn_protocol.os
        txaio.config.loop = self.reactor
        # An auto-ping's payload (the wall clock, random bytes) the same in every world.
        autobahn_protocol.time = types.SimpleNamespace(**{**vars(time), "time_ns": lambda: NOW * 10**9})
        autobahn_protocol.os = types.SimpleNamespace(**{**vars(os), "urandom": bytes})
        try:
            address = IPv4Address("TCP", "203.0.113.5", 40000)
            protocol = self.factory.buildProtocol(address)
            transport = Transport(peerAddress=address)
            protocol.makeConnection(transport)
            transport.registerProducer(object(), True)  # as the HTTP channel had; the guard replaces it
            seen = []
            for chunk in chunks:
                protocol.dataReceived(chunk)
            seen.append(self.observe(protocol, transport, logged))
            if isinstance(self.broker, HeldBroker):
                self.broker.release()
            self.reactor.advance(0)
            seen.append(self.observe(protocol, transport, logged))
            for step in (11, 6):
                self.reactor.advance(step)
                seen.append(self.observe(protocol, transport, logged))
            # A callback that raised left its failure in a Deferred held in a
            # cycle (its traceback's frames): logged when collected, now.
            gc.collect()
            seen.append(self.observe(protocol, transport, logged))
        finally:
            txaio.config.loop, autobahn_protocol.time, autobahn_protocol.os = saved
            globalLogPublisher.removeObserver(logged.append)
        return seen

    def observe(self, protocol, transport, logged):
        """What a client, the log, and the rest of the server can tell of the connection."""
        timer = self.factory._batched_timer
        return dict(
            written=transport.value(),
            disconnecting=transport.disconnecting,
            # is_open and is_closed are made when first read (ws._LazyFuture):
            # read here as a client of Autobahn's would read them.
            state=_plain({
                **{k: v for k, v in vars(protocol).items() if k != "_is_open_fired"},
                "is_open": protocol.is_open, "is_closed": protocol.is_closed,
            }),
            # Autobahn's debug lines (off in chatd) are left out of chatd's path.
            log=[
                (formatEvent(e), e["log_failure"].type.__name__ if e.get("log_failure") else None)
                for e in logged if e.get("log_level", LogLevel.info) > LogLevel.debug
            ],
            connections=len(self.factory.connections),
            caps=(len(self.factory.caps._holders), dict(self.factory.caps._per_address)),
            rejected=dict(self.factory.metrics.handshakes_rejected),
            tickets=sorted(self.broker._tickets._tickets),
            timers=[
                (due, [call._func.__name__ for call in calls]) for due, calls in sorted(timer._seconds.items())
            ],
            delayed=sorted((c.getTime(), getattr(c.func, "__name__", "?")) for c in self.reactor.getDelayedCalls()),
        )


def _plain(value):
    """C{value} as something two connections' can be compared by (objects by their kind)."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, Principal)):
        return value
    if isinstance(value, ws.ChatServerProtocol):
        return "the connection"
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_plain(v) for v in value])
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in ("transport", "factory")}
    if isinstance(value, defer.Deferred):
        return ("Deferred", value.called, _plain(value.result) if value.called else None)
    if isinstance(value, TrafficStats):
        return vars(value)
    if isinstance(value, timers._Call):
        return ("timer", value._func.__name__, value._calls is not None)
    return type(value).__name__


def frame(opcode, payload, key=b"\x11\x22\x33\x44"):
    """A masked client frame of one of the small sizes."""
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + key + rawws.mask(payload, key)


# Each part of a request: the values common clients send (chatd's path
# takes most of them, Autobahn's the rest), then unusual ones.  A header's
# value None leaves it out; a list repeats it.
PARTS = {
    "line": (["GET {} HTTP/1.1"], ["GET  {} HTTP/1.1", "GET {} HTTP/1.0", "POST {} HTTP/1.1", "get {} HTTP/1.1",
                                    "GET {} HTTP/1.1 ", "GET {}"]),
    "path": (["/ws", "/ws", "/ws-stomp/123/abcd/websocket", "/ws-stomp/websocket", "/echo", "/w%73", "/ws/"],
             ["//ws", "/ws;x", "http://chat.example/ws"]),
    "query": (["?ticket=good", "?ticket=good", "?ticket=used", "?ticket=expired", "?ticket=unknown", "", "?",
               "?ticket=", "?ticket=good&ticket=good", "?ticket=good&x=%41+b", "?x=1&ticket=good"],
              ["?ticket=good#frag", "?ticket=good#", "?ticket=good;x=1"]),
    "Host": (["chat.example", "chat.example:8443", "[::1]:8443", "[::1]"],
             ["chat.example:x", "a: b", None, ["chat.example", "chat.example"]]),
    "Upgrade": (["websocket", "WebSocket", "h2c, websocket", ["h2c", "websocket"]], ["foo", None]),
    "Connection": (["Upgrade", "keep-alive, Upgrade", ["keep-alive", "upgrade"]], ["close", None]),
    "Sec-WebSocket-Version": (["13", " 13\t"], ["8", "12", "+13", "013", "x", None, ["13", "13"]]),
    "Sec-WebSocket-Key": ([KEY, "  " + KEY], [
        KEY[:-2], KEY[:-1] + "!", KEY[:20] + "*" + KEY[21:], KEY + "A", "\xa0" + KEY, None, [KEY, KEY],
    ]),
    "Sec-WebSocket-Protocol": ([None, "chatd.v1", "v12.stomp", "chatd.v1, v12.stomp", "foo", "", " chatd.v1 ",
                                ["foo", "chatd.v1"]], ["chatd.v1, chatd.v1"]),
    "Origin": ([None, ORIGIN, "https://evil.example", "null", "file://", "HTTPS://CHAT.EXAMPLE:443"],
               ["https://", "https://x:99999", "https://[::1", [ORIGIN, ORIGIN]]),
    "Sec-WebSocket-Extensions": ([None, None, "permessage-deflate; client_max_window_bits",
                                  "permessage-deflate; server_max_window_bits=99", "x-foo"],
                                 [["permessage-deflate", "x-foo"]]),
    "X-Forwarded-For": ([None, "198.51.100.7"], []),
    "User-Agent": ([None, "test/1.0", "ua\twith tab"], []),
}
EXTRA = ([("X-Foo", "bar"), ("X-Obs-Text", "caf\xe9"), ("X-Empty", ""), ("X-Trailing", "v \t"), ("x-lower", "y")],
         [("X-Control", "a\x01b"), ("X-Bad Name", "x"), (" X-Folded", "z")])
AFTER = {
    "enter": frame(1, json.dumps({"type": "ENTER", "room": "lobby", "ref": "e1"}).encode()),
    "ping": frame(9, b"hi"),
    "close": frame(8, b"\x03\xe8"),
    "binary": frame(2, b"\x00"),
    "head again": b"\r\n\r\nGET / HTTP/1.1\r\n\r\n",
}


@st.composite
def requests(draw):
    """
    The bytes of an opening handshake request, then frames: common values
    for most parts, unusual ones for a few.
    """
    unusual = draw(st.sets(st.sampled_from(sorted(PARTS) + ["extra"]), max_size=2))

    def part(name):
        common, odd = PARTS[name]
        return draw(st.sampled_from(odd if name in unusual and odd else common))

    line = part("line").format(part("path") + part("query"))
    headers = []
    for name in list(PARTS)[3:]:
        value = part(name)
        if value is None:
            continue
        case = draw(st.sampled_from([str, str, str.lower, str.upper]))
        headers += [f"{case(name)}: {v}" for v in (value if isinstance(value, list) else [value])]
    headers += [f"{n}: {v}" for n, v in draw(st.lists(st.sampled_from(EXTRA[0]), max_size=2))]
    if "extra" in unusual:
        headers.append("%s: %s" % draw(st.sampled_from(EXTRA[1])))
    headers = draw(st.permutations(headers))
    head = "\r\n".join([line, *headers]).encode("latin-1") + b"\r\n\r\n"
    return head + b"".join(AFTER[k] for k in draw(st.lists(st.sampled_from(sorted(AFTER)), max_size=3)))


def differences(ours, theirs):
    """Where two L{World.serve} results differ: C{(stage, what, ours, theirs)}."""
    found = []
    for stage, (mine, other) in enumerate(zip(ours, theirs)):
        for what in mine.keys() | other.keys():
            if what == "state":
                for name in mine[what].keys() | other[what].keys():
                    if mine[what].get(name, "(absent)") != other[what].get(name, "(absent)"):
                        found.append((stage, name, mine[what].get(name, "(absent)"), other[what].get(name, "(absent)")))
            elif mine.get(what) != other.get(what):
                found.append((stage, what, mine.get(what), other.get(what)))
    return found


def chunked(data, cuts):
    bounds = sorted({min(cut, len(data)) for cut in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def both(data, cuts=(), **world):
    """What chatd's and Autobahn's handshakes each left of one connection receiving C{data}."""
    del TAKEN[:]
    ours = World(Lean, **world).serve(chunked(data, cuts))
    taken = list(TAKEN)
    theirs = World(AutobahnHandshake, **world).serve(chunked(data, cuts))
    return ours, theirs, taken


@given(
    data=requests(),
    cuts=st.lists(st.integers(min_value=0, max_value=700), max_size=3),
    compression=st.booleans(),
    origins=st.sampled_from([(ORIGIN,), ("*",)]),
    ping=st.sampled_from([0, 5]),
    connect_auth=st.booleans(),
    held=st.booleans(),
)
@hypothesis_settings(
    max_examples=400, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_chatd_answers_every_request_as_autobahn_does(
    data, cuts, compression, origins, ping, connect_auth, held, logged_failures,
):
    """
    Any request, in any chunks, with frames behind it, under any of the
    options that change the handshake: chatd's handshake writes byte for
    byte what Autobahn's writes (the 101 or the refusal, WELCOME and the
    answers to the frames, pongs and closes), logs the same lines, and
    leaves every attribute of the connection, the caps, the metrics, the
    tickets and the timers as Autobahn's does, before and after its
    timers ran.

    What comes while onConnect's answer is due (a Redis broker's) waits for
    the open on both paths (test_what_comes_while_the_ticket_is_redeemed_waits_for_the_open).
    """
    ours, theirs, taken = both(
        data, cuts, compression=compression, origins=origins, ping=ping, connect_auth=connect_auth, held=held,
    )
    assert differences(ours, theirs) == []
    answer = theirs[-1]["written"][9:12].decode("latin-1") or "none"
    event(f"{'chatd' if True in taken else 'Autobahn'} answered {answer}")


BROWSER = (
    "GET /ws?ticket=good HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\nPragma: no-cache\r\n"
    "Cache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/131.0.0.0\r\n"
    "Upgrade: websocket\r\nOrigin: https://chat.example\r\nSec-WebSocket-Version: 13\r\n"
    "Accept-Encoding: gzip, deflate, br, zstd\r\nAccept-Language: en-GB,en;q=0.9\r\n"
    f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    "Sec-WebSocket-Protocol: chatd.v1\r\n\r\n"
).encode("latin-1")
PLAIN = (
    "GET /ws?ticket=good HTTP/1.1\r\nHost: chat.example:8443\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chatd.v1\r\n\r\n"
).encode("latin-1")


def test_a_browsers_and_a_plain_clients_requests_are_chatds():
    """
    Chrome's request (Origin, extensions offered: compression on or off)
    and a plain client's (the benchmark's) take chatd's path and open as
    they do through Autobahn's: the same 101, WELCOME, and the answer to
    an ENTER sent right behind the head.
    """
    enter = AFTER["enter"]
    for request, compression in ((BROWSER, False), (BROWSER, True), (PLAIN, False)):
        ours, theirs, taken = both(request + enter, compression=compression)
        assert taken == [True]
        assert differences(ours, theirs) == []
        written = ours[0]["written"]
        accept = base64.b64encode(hashlib.sha1(KEY.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        assert written.startswith(b"HTTP/1.1 101 Switching Protocols\r\nServer: chatd\r\n")
        assert b"Sec-WebSocket-Protocol: chatd.v1\r\nSec-WebSocket-Accept: " + accept + b"\r\n" in written
        assert (b"Sec-WebSocket-Extensions: permessage-deflate" in written) == compression
        if not compression:  # else the events are deflated
            assert b'"WELCOME"' in written and b'"ENTER"' in written


def test_refusals_are_autobahns_refusals():
    """A used ticket (401) and an Origin not allowed (403) on chatd's path: Autobahn's answer, word for word."""
    for request in (PLAIN.replace(b"good", b"used"), BROWSER.replace(b"https://chat", b"https://evil")):
        ours, theirs, taken = both(request)
        assert taken == [True]
        assert differences(ours, theirs) == []
        assert ours[0]["written"].split(b"\r\n")[0] in (b"HTTP/1.1 401 invalid ticket", b"HTTP/1.1 403 origin not allowed")
        assert ours[0]["disconnecting"]


def test_unusual_requests_are_autobahns():
    """Another version, a repeated Host, a fragment, an absolute target: Autobahn parses and answers them."""
    for old, new in (
        (b"Version: 13", b"Version: 8"),
        (b"Host: chat.example:8443", b"Host: a\r\nHost: b"),
        (b"good HTTP", b"good#x HTTP"),
        (b"GET /ws", b"GET http://chat.example/ws"),
        (b"Upgrade: websocket", b"Upgrade: websocket\r\nX-Ctl: \x01"),
    ):
        ours, theirs, taken = both(PLAIN.replace(old, new))
        assert True not in taken, new
        assert differences(ours, theirs) == []


def test_what_comes_while_the_ticket_is_redeemed_waits_for_the_open():
    """
    Bytes read while a Redis broker is still redeeming the ticket wait, and
    reading stops meanwhile: a blank line in them is not parsed as a second
    request.  (Autobahn's processHandshake parsed it, refused it with a 400
    and still opened the connection when the redemption came, then failed
    dropping it twice, AlreadyCalledError unhandled.)  Once open, they are
    frames: here not valid ones, so the connection is closed with 1002.
    """
    data = PLAIN + b"\r\n\r\nGET / HTTP/1.1\r\n\r\n" + frame(1, b"x")
    for world in (Lean, AutobahnHandshake):
        seen = World(world, held=True).serve(chunked(data, [len(PLAIN)]))
        while_held, opened = seen[0], seen[1]
        assert while_held["written"] == b"" and not while_held["disconnecting"], world
        assert opened["written"].startswith(b"HTTP/1.1 101 Switching Protocols\r\n"), world
        assert b" 400 " not in opened["written"], world
        # A close frame: 1002, Autobahn's reason.
        assert b"\x88!\x03\xeaunmasked client-to-server frame" in opened["written"], world
        assert all(failure is None for _, failure in seen[-1]["log"]), world


def test_reading_stops_while_the_ticket_is_redeemed():
    """
    What the client sends while its ticket is redeemed is read no further
    (the transport is paused, so a client cannot fill memory before its
    upgrade is decided) and reading resumes once it is.
    """
    world = World(Lean, held=True)
    protocol = world.factory.buildProtocol(IPv4Address("TCP", "203.0.113.5", 40000))
    transport = Transport(peerAddress=IPv4Address("TCP", "203.0.113.5", 40000))
    protocol.makeConnection(transport)
    protocol.dataReceived(PLAIN)
    assert transport.producerState == "producing"
    protocol.dataReceived(frame(1, b"hi"))
    assert transport.producerState == "paused"
    world.broker.release()
    assert transport.producerState == "producing"
    assert transport.value().startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert "_deciding" not in vars(protocol) and "_held_for_decision" not in vars(protocol)


@given(query=st.one_of(
    st.text(alphabet="ab=&%+;#? \t\xe9\x00", max_size=20),
    st.text(max_size=30),
    st.lists(st.sampled_from(["ticket=good", "ticket=", "ticket", "=x", "", "x=1", "a=b=c", "t=%41", "t=a+b"]))
    .map("&".join),
))
@hypothesis_settings(max_examples=500, deadline=None)
def test_query_is_parsed_as_parse_qs_parses_it(query):
    """
    chatd's split of an upgrade's query (L{ws._query_params}) gives what
    Autobahn's C{parse_qs} gives, names, values, order and repeats, for
    queries with and without anything to unquote.
    """
    from urllib.parse import parse_qs

    ours = ws._query_params(query)
    assert ours == parse_qs(query)
    assert [(k, v) for k, v in ours.items()] == list(parse_qs(query).items())
