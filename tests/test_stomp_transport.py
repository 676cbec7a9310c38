# -*- test-case-name: tests.test_stomp_transport -*-
"""
chatd.stomp.transport: which upgrades speak STOMP, the SockJS resource's
routes, and the wire between a protocol and a STOMP session (SockJS's o, h,
a[...] and c[...], client arrays, surrogate pairs split across messages,
frames prepared once per event) on a Clock with a stand-in protocol; and the
real ChatServerProtocol in process (Autobahn's memory agent, as in
tests/test_ws.py): subprotocol choice, connect_auth, the 1001 drain.
"""

import json
import types

import pytest
import txaio
from autobahn.twisted.websocket import WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from chatd import config, errors
from chatd.auth import Principal
from chatd.hub import Hub
from chatd.stomp import frames, transport
from chatd.stomp.frames import Frame, FrameParser
from chatd.stomp.transport import Choice, SharedFrames, SockJSResource, StompWire
from tests.fakes import FakeVerifier, RecordingBroker
from tests.support import mint_token
from tests.test_ws import ORIGIN, World, clocked  # noqa: F401 (clocked: a fixture)

STOMP = config.defaults().stomp
ALICE = Principal(sub="alice", name="Alice", exp=10**10)


@pytest.mark.parametrize(
    "path,offered,choice",
    [
        ("/ws", ["chatd.v1"], None),
        ("/ws", ["v12.stomp", "chatd.v1"], None),  # chatd.v1 wins when offered
        ("/ws", [], None),
        ("/ws", ["v10.stomp", "v12.stomp", "v11.stomp"], Choice("v12.stomp", False)),
        ("/ws", ["v11.stomp"], Choice("v11.stomp", False)),
        ("/ws-stomp/websocket", [], Choice(None, False)),
        ("/ws-stomp/websocket", ["v12.stomp", "v11.stomp"], Choice("v12.stomp", False)),
        ("/ws-stomp/123/abcdefgh/websocket", [], Choice(None, True)),
    ],
)
def test_choose(path, offered, choice):
    """chatd.v1 on /ws unless only STOMP is offered; every WebSocket under sockjs_path is STOMP."""
    assert transport.choose(path, offered, STOMP) == choice


def test_choose_when_disabled():
    """[stomp] enabled = off: nobody speaks STOMP."""
    off = config.defaults(stomp__enabled=False).stomp
    assert transport.choose("/ws", ["v12.stomp"], off) is None


def test_sockjs_message_limit():
    """A SockJS message may be six times the frame cap (every unit escaped), plus the brackets."""
    assert transport.sockjs_message_limit(65536) == 6 * 65536 + 16


# --- the resource --------------------------------------------------------------


def child(resource, path):
    """The resource twisted.web would render for C{path} below C{resource}."""
    segments = [s.encode() for s in path.split("/")]
    request = DummyRequest(segments[1:])
    return resource.getChild(segments[0], request)


@pytest.mark.parametrize(
    "path,which",
    [
        ("info", "info"),
        ("", "greeting"),
        ("websocket", "ws"),
        ("123/abcdefgh/websocket", "ws"),
        ("123/abcdefgh/xhr", "404"),
        ("123/abcdefgh/xhr_streaming", "404"),
        ("123/abcdefgh/eventsource", "404"),
        ("iframe.html", "404"),
        ("123/abc\xe9/websocket", "404"),
    ],
)
def test_sockjs_resource_routes(path, which):
    """/info, the greeting and the two WebSocket URLs; everything else 404."""
    ws, not_found = object(), object()
    resource = SockJSResource(ws, not_found)
    found = child(resource, path)
    expected = {"ws": ws, "404": not_found}.get(which)
    if expected is not None:
        assert found is expected
    else:
        assert type(found).__name__ == {"info": "_Info", "greeting": "_Greeting"}[which]


def test_info_body():
    """/info answers the SockJS info JSON, never cached."""
    request = DummyRequest([b"info"])
    body = json.loads(child(SockJSResource(None, None), "info").render_GET(request))
    assert body["websocket"] is True and body["cookie_needed"] is False and body["origins"] == ["*:*"]
    assert request.responseHeaders.getRawHeaders(b"cache-control")[0].startswith(b"no-store")


# --- the wire --------------------------------------------------------------------


class FakeProtocol:
    """What StompWire uses of ChatServerProtocol: sendMessage, prepared messages, close, state."""

    STATE_OPEN = 3
    STATE_CLOSED = 4

    def __init__(self, factory):
        self.factory = factory
        self.state = self.STATE_OPEN
        self.sent = []
        self.prepared_sent = []
        self.closes = []
        self.connection_id = "i:1"
        self.counted = 0
        self.maxMessagePayloadSize = self.maxFramePayloadSize = 65536

    def sendMessage(self, payload, isBinary=False):
        self.sent.append(payload)

    def sendPreparedMessage(self, prepared):
        self.prepared_sent.append(prepared)
        self.sent.append(prepared.payload)

    def count_sent(self):
        self.counted += 1

    def close(self, code, reason):
        """As ChatServerProtocol.close: the wire says c[...] first, once."""
        if self.state == self.STATE_OPEN:
            self.wire.closing(code, reason)
            self.closes.append((code, reason))
            self.state = self.STATE_CLOSED

    def when_drained(self):
        return defer.succeed(None)


def make(in_sockjs=True, **overrides):
    clock = Clock()
    clock.advance(1000)
    settings = config.defaults(**overrides)
    broker = RecordingBroker(clock)
    factory = types.SimpleNamespace(
        hub=Hub(broker), verifier=FakeVerifier({}), settings=settings, clock=clock,
        stomp_shared=SharedFrames(lambda payload: types.SimpleNamespace(payload=payload)),
    )
    protocol = FakeProtocol(factory)
    wire = protocol.wire = StompWire(protocol, in_sockjs)
    wire.open(ALICE)
    return clock, protocol, wire


def sockjs_frames(protocol):
    """The STOMP frames inside the SockJS a[...] messages sent, in order; other messages as text."""
    parser = FrameParser(1 << 20)
    out = []
    for payload in protocol.sent:
        text = payload.decode()
        if text.startswith("a"):
            for data in json.loads(text[1:]):
                out.extend(parser.feed(data.encode()))
        else:
            out.append(text)
    protocol.sent.clear()
    return out


def client(*frames_):
    """A SockJS client message carrying the frames."""
    return json.dumps([frames.encode(f).decode() for f in frames_]).encode()


def test_sockjs_open_connect_and_heartbeat():
    """o on open; CONNECTED inside a[...]; h every 25 s."""
    clock, protocol, wire = make()
    assert protocol.sent == [b"o"]
    protocol.sent.clear()
    wire.received(client(Frame("CONNECT", (("accept-version", "1.1,1.0"), ("heart-beat", "0,0")))), False)
    [connected] = sockjs_frames(protocol)
    assert connected.command == "CONNECTED" and connected.get("version") == "1.1"
    clock.advance(25)
    assert protocol.sent == [b"h"]


def test_sockjs_close_says_c_first():
    """An ERROR, then c[code,"reason"], then the close."""
    _, protocol, wire = make()
    protocol.sent.clear()
    wire.received(client(Frame("SEND", (("destination", "/x"),))), False)
    got = sockjs_frames(protocol)
    assert got[0].command == "ERROR" and "the first frame must be CONNECT" in got[0].body.decode()
    assert got[1] == 'c[1000,"the first frame must be CONNECT, not SEND"]'
    assert protocol.closes == [(1000, "the first frame must be CONNECT, not SEND")]


@pytest.mark.parametrize("payload,binary", [(b"not json", False), (b'[1]', False), (b'["x"]', True)])
def test_sockjs_refuses_what_is_not_an_array_of_strings(payload, binary):
    """A SockJS client message that is not a JSON array of strings (or is binary) closes 1003."""
    _, protocol, wire = make()
    wire.received(payload, binary)
    assert protocol.closes[0][0] == errors.CLOSE_UNSUPPORTED_DATA


def test_sockjs_rejoins_a_surrogate_pair_split_across_messages():
    """stomp.js may cut an emoji in two at 16 KiB: the halves are joined before decoding."""
    _, protocol, wire = make()
    wire.received(client(Frame("CONNECT", (("accept-version", "1.1"),))), False)
    wire.received(client(Frame("SUBSCRIBE", (("destination", "/topic/a"), ("id", "0")))), False)
    protocol.sent.clear()
    text = frames.encode(Frame("SEND", (("destination", "/app/chat/a"), ("receipt", "r")), "\U0001F600".encode())).decode()
    cut = text.index("\U0001F600")
    units = text.encode("utf-16-le")
    first = units[: 2 * cut + 2].decode("utf-16-le", "surrogatepass")  # ends with the high surrogate
    second = units[2 * cut + 2:].decode("utf-16-le", "surrogatepass")
    wire.received(json.dumps([first]).encode(), False)
    wire.received(json.dumps([second]).encode(), False)
    got = sockjs_frames(protocol)
    assert [f.command for f in got] == ["MESSAGE", "RECEIPT"]
    assert json.loads(got[0].body)["message"] == "\U0001F600"


def test_sockjs_connection_takes_escaped_messages():
    """A SockJS connection's WebSocket message cap is the SockJS one."""
    _, protocol, _ = make(limits__max_message_bytes=1000)
    assert protocol.maxMessagePayloadSize == protocol.maxFramePayloadSize == 6016


def test_plain_wire_passes_bytes_through():
    """Without SockJS, messages are STOMP bytes both ways (text or binary)."""
    _, protocol, wire = make(in_sockjs=False)
    assert protocol.sent == []
    wire.received(frames.encode(Frame("CONNECT", (("accept-version", "1.2"),))), True)
    [data] = protocol.sent
    assert data.startswith(b"CONNECTED\nversion:1.2\n")


def test_shared_frames_prepared_once_per_event():
    """Connections alike get the same prepared message for one event; plain and SockJS apart."""
    shared = SharedFrames(lambda payload: object())
    data = b"MESSAGE\n\n\0"
    plain = shared.prepared(data, False)
    assert shared.prepared(data, False) is plain
    in_sockjs = shared.prepared(data, True)
    assert in_sockjs is not plain and shared.prepared(data, True) is in_sockjs
    equal_copy = bytes(bytearray(data))
    assert equal_copy == data and shared.prepared(equal_copy, False) is not plain  # by identity


# --- the real protocol, in process (Autobahn's memory agent, as tests/test_ws.py) --------


class RawClient(WebSocketClientProtocol):
    """Keeps every message as bytes, and how it closed."""

    def __init__(self):
        super().__init__()
        self.received = []
        self.closed = None

    def onMessage(self, payload, isBinary):
        self.received.append(payload)

    def onClose(self, wasClean, code, reason):
        self.closed = code


def open_raw(world, path, protocols, query=None):
    """A RawClient at C{path} offering C{protocols}, once its handshake is over."""
    if query is None:
        query = "ticket=" + world.ticket()
    made = []

    def client():
        made.append(RawClient())
        return made[-1]

    options = {"protocols": protocols, "origin": ORIGIN}
    world.agent.open(f"ws://localhost:8080{path}?{query}", options, protocol_class=client)
    world.pumps.flush()
    [client] = made
    return client


def stomp_world(**overrides):
    world = World(**overrides)
    txaio.config.loop = world.reactor
    return world


CONNECT = frames.encode(Frame("CONNECT", (("accept-version", "1.2"), ("heart-beat", "0,0"))))


def test_ws_speaks_stomp_when_only_stomp_is_offered(clocked):  # noqa: F811
    """On /ws, v11.stomp and v12.stomp offered (no chatd.v1): v12.stomp, then STOMP frames."""
    world = stomp_world()
    client = open_raw(world, "/ws", ["v11.stomp", "v12.stomp"])
    assert client.websocket_protocol_in_use == "v12.stomp"
    assert client.received == []  # no WELCOME: STOMP waits for CONNECT
    client.sendMessage(CONNECT)
    world.pumps.flush()
    [connected] = client.received
    assert connected.startswith(b"CONNECTED\nversion:1.2\n")


def test_ws_prefers_chatd_v1(clocked):  # noqa: F811
    """chatd.v1 offered next to STOMP: chatd.v1 and its WELCOME."""
    world = stomp_world()
    client = open_raw(world, "/ws", ["v12.stomp", "chatd.v1"])
    assert client.websocket_protocol_in_use == "chatd.v1"
    assert json.loads(client.received[0])["type"] == "WELCOME"


def test_stomp_off_leaves_ws_to_chatd_v1(clocked):  # noqa: F811
    """[stomp] enabled = off: a STOMP-only offer gets no subprotocol and chatd.v1's WELCOME."""
    world = stomp_world(stomp__enabled=False)
    client = open_raw(world, "/ws", ["v12.stomp"])
    assert client.websocket_protocol_in_use is None
    assert json.loads(client.received[0])["type"] == "WELCOME"


def test_connect_auth_upgrade_without_ticket(clocked):  # noqa: F811
    """connect_auth: STOMP opens without a ticket and CONNECT's JWT names the user; chatd.v1 still needs one."""
    world = stomp_world(stomp__connect_auth=True)
    token = mint_token(world.settings.jwt_key, "dora")
    client = open_raw(world, "/ws", ["v12.stomp"], query="")
    assert client.state == client.STATE_OPEN
    client.sendMessage(frames.encode(Frame("CONNECT", (("accept-version", "1.2"), ("passcode", token)))))
    world.pumps.flush()
    assert b"user-name:dora" in client.received[0]
    client.sendClose(1000)
    world.pumps.flush()
    # Closed and logged (the session line names the user CONNECT gave, not a ticket's).
    assert client.closed == 1000 and world.factory.connections == set()
    refused = open_raw(world, "/ws", ["chatd.v1"], query="")
    assert refused.state == refused.STATE_CLOSED
    assert int(refused.http_status_line.split()[1]) == errors.HTTP_UNAUTHORIZED


def test_server_api_disconnect_finds_a_connect_auth_user(clocked):  # noqa: F811
    """A connect_auth STOMP connection is found by the user CONNECT named and closed with 4003."""
    from chatd.api_backend import ControlDispatcher
    from chatd.broker.interfaces import DISCONNECT, Control
    from chatd.service import user_connections

    world = stomp_world(stomp__connect_auth=True)
    token = mint_token(world.settings.jwt_key, "dora")
    client = open_raw(world, "/ws", ["v12.stomp"], query="")
    client.sendMessage(frames.encode(Frame("CONNECT", (("accept-version", "1.2"), ("passcode", token)))))
    world.pumps.flush()
    other = open_raw(world, "/ws", ["chatd.v1"])  # alice, by ticket
    connections_of = user_connections(world.factory)
    assert len(connections_of("dora")) == 1 and len(connections_of("alice")) == 1
    ControlDispatcher(connections_of, kick=None)(Control(DISCONNECT, "dora", reason="banned"))
    world.pumps.flush()
    assert client.closed == errors.CLOSE_DISCONNECTED and other.closed is None


def test_no_ticket_is_401_for_stomp_by_default(clocked):  # noqa: F811
    """Without connect_auth, a STOMP upgrade without a ticket is 401, like /ws."""
    world = stomp_world()
    client = open_raw(world, "/ws", ["v12.stomp"], query="")
    assert client.state == client.STATE_CLOSED
    assert int(client.http_status_line.split()[1]) == errors.HTTP_UNAUTHORIZED


def test_shutdown_close_is_1001_with_sockjs_c_first(clocked):  # noqa: F811
    """The 1001 drain reaches STOMP connections too; over SockJS c[1001,...] comes first."""
    world = stomp_world()
    client = open_raw(world, "/ws-stomp/000/abcdefgh/websocket", [])
    assert client.received == [b"o"]
    world.factory.close_all(errors.CLOSE_GOING_AWAY, "server shutting down")
    world.pumps.flush()
    assert client.received[-1] == b'c[1001,"server shutting down"]'
    assert client.closed == errors.CLOSE_GOING_AWAY

