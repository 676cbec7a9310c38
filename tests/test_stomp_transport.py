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

    def send_prepared(self, prepared):
        if self.state == self.STATE_OPEN:
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


def shared_event(message="hi", sender="Dan"):
    """A chatd.v1 TALK text as the hub shares it."""
    return json.dumps({"type": "TALK", "room": "a", "id": "7-0", "sender": sender, "message": message,
                       "userCount": 2, "ts": 1})


def test_shared_frames_prepared_once_per_event():
    """Connections alike get the same prepared message for one event; plain and SockJS apart."""
    prepared = []
    shared = SharedFrames(lambda payload: prepared.append(payload) or types.SimpleNamespace(payload=payload))
    subscription = types.SimpleNamespace(destination="/topic/a", id="sub-0")
    plain_key = shared.events.key(subscription, frames.V12, transport.PLAIN)
    sockjs_key = shared.events.key(subscription, frames.V12, transport.SOCKJS)
    text = shared_event()
    plain = shared.events.frame(text, plain_key)
    assert shared.events.frame(text, plain_key) is plain
    in_sockjs = shared.events.frame(text, sockjs_key)
    assert shared.events.frame(text, sockjs_key) is in_sockjs and in_sockjs is not plain
    assert len(prepared) == 2
    assert json.loads(in_sockjs.payload[1:]) == [plain.payload.decode()]  # a["<the frame>"]
    [message] = FrameParser(1 << 20).feed(plain.payload)
    assert message.get("subscription") == "sub-0" and json.loads(message.body)["message"] == "hi"
    equal_copy = shared_event()
    assert equal_copy == text and shared.events.frame(equal_copy, plain_key) is not plain  # by identity
    assert len(prepared) == 3


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


def open_raw(world, path, protocols, query=None, client_class=None):
    """A RawClient (or C{client_class}) at C{path} offering C{protocols}, once its handshake is over."""
    if query is None:
        query = "ticket=" + world.ticket()
    made = []

    def client():
        made.append((client_class or RawClient)())
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


def test_stomp_sessions_expire_on_the_factorys_expiries(clocked):  # noqa: F811
    """
    A STOMP connection's session puts its token expiry on the factory's
    Expiries, which chatd.v1 sessions share: two STOMP connections whose
    tokens expire together add one entry there, with both sessions.
    """
    world = stomp_world()
    clients = [open_raw(world, "/ws", ["v12.stomp"]) for _ in range(2)]
    for client in clients:
        client.sendMessage(CONNECT)
    world.pumps.flush()
    assert all(client.received[0].startswith(b"CONNECTED\n") for client in clients)
    [(sessions, _)] = world.factory.expiries._due.values()
    assert len(sessions) == 2


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



# --- the fan-out to STOMP members, on the real protocol ---------------------------------


SUBSCRIBE = frames.encode(Frame("SUBSCRIBE", (("destination", "/topic/lobby"), ("id", "sub-0"), ("receipt", "in"))))


def stomp_member(world, path="/ws", subscribe=SUBSCRIBE, client_class=None):
    """A STOMP client CONNECTed and subscribed to /topic/lobby (plain, or SockJS under /ws-stomp)."""
    in_sockjs = path.startswith("/ws-stomp")
    member = open_raw(world, path, [] if in_sockjs else ["v12.stomp"],
                      query="ticket=" + world.ticket(f"m{len(world.servers)}"), client_class=client_class)
    for data in (CONNECT, subscribe):
        member.sendMessage(json.dumps([data.decode()]).encode() if in_sockjs else data)
        world.pumps.flush()
    assert b"receipt-id:in" in member.received[-1], member.received
    member.received.clear()
    return member


def messages_to(member):
    """The MESSAGE frames a plain or SockJS STOMP member got."""
    out = []
    for payload in member.received:
        if payload.startswith(b"a["):
            out.extend(FrameParser(1 << 20).feed(json.loads(payload[1:])[0].encode()))
        elif payload.startswith(b"MESSAGE"):
            out.extend(FrameParser(1 << 20).feed(payload))
    return out


def test_stomp_members_get_one_prepared_frame_per_framing_and_id(clocked):  # noqa: F811
    """
    A TALK fanned out to STOMP members is prepared once per framing and
    subscription id (two plain members as sub-0 share one, SockJS and an id
    of its own one each); every member gets it, counted as sent.
    """
    world = stomp_world()
    prepared = []
    shared = world.factory.stomp_shared
    original = shared._prepare
    shared._prepare = lambda payload: prepared.append(payload) or original(payload)
    plain = [stomp_member(world), stomp_member(world)]
    in_sockjs = stomp_member(world, "/ws-stomp/000/abcdefgh/websocket")
    own = stomp_member(world, subscribe=SUBSCRIBE.replace(b"id:sub-0", b"id:mine"))
    talker = world.connect(sub="talker")
    world.send(talker, {"type": "ENTER", "room": "lobby"})
    world.pumps.flush()  # the talker's pump runs last: once more for what it made the others get
    members = plain + [in_sockjs, own]
    for member in members:
        member.received.clear()
    sent_before = world.factory.sent_by_open()
    prepared.clear()
    world.send(talker, {"type": "TALK", "room": "lobby", "message": "hi", "ref": "r1"})
    world.pumps.flush()
    assert len(prepared) == 3
    assert prepared[0] == plain[0].received[-1] and prepared[1].startswith(b'a["MESSAGE\\n')
    for member, sub_id in zip(members, ["sub-0", "sub-0", "sub-0", "mine"]):
        [message] = messages_to(member)
        assert message.get("subscription") == sub_id and json.loads(message.body)["message"] == "hi"
    assert world.factory.sent_by_open() - sent_before == len(members) + 1  # and the talker's own


def test_stomp_slow_consumer_closes_4008(clocked):  # noqa: F811
    """A STOMP member that stops reading is closed with 4008 and leaves the room, as a chatd.v1 one."""
    world = stomp_world(limits__max_send_buffer_bytes=4096)
    member = stomp_member(world)
    talker = world.connect(sub="talker")
    world.send(talker, {"type": "ENTER", "room": "lobby"})
    world.servers[0].transport.producer.pauseProducing()  # what TCP does once its buffer is full
    for _ in range(3):
        world.send(talker, {"type": "TALK", "room": "lobby", "message": "y" * 2000})
    world.reactor.advance(0)
    assert world.factory.hub.local_users("lobby") == 1
    world.pumps.flush()
    assert member.closed == errors.CLOSE_SLOW_CONSUMER and talker.closed is None
    assert [m["type"] for m in talker.received].count("QUIT") == 1


class DeflateRawClient(RawClient):
    """A RawClient that offers permessage-deflate."""

    def startHandshake(self):
        from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponseAccept

        self.perMessageCompressionOffers = [PerMessageDeflateOffer()]
        self.perMessageCompressionAccept = PerMessageDeflateResponseAccept
        super().startHandshake()


def test_compressed_stomp_member_gets_the_shared_frame(clocked):  # noqa: F811
    """A STOMP member that took permessage-deflate gets the shared MESSAGE compressed; one that did not, plain."""
    world = stomp_world(websocket__compression=True)
    squeezed = stomp_member(world, client_class=DeflateRawClient)
    plain = stomp_member(world)
    assert world.servers[0]._perMessageCompress is not None and world.servers[1]._perMessageCompress is None
    talker = world.connect(sub="talker")
    world.send(talker, {"type": "ENTER", "room": "lobby"})
    world.pumps.flush()
    squeezed.received.clear()
    plain.received.clear()
    servers = world.servers[:2]
    before = [server.trafficStats.outgoingOctetsWireLevel for server in servers]
    world.send(talker, {"type": "TALK", "room": "lobby", "message": "hi " * 50})
    world.pumps.flush()
    for member in (squeezed, plain):
        [message] = messages_to(member)
        assert json.loads(message.body)["message"] == "hi " * 50
    assert squeezed.received == plain.received
    on_wire = [server.trafficStats.outgoingOctetsWireLevel - was for server, was in zip(servers, before)]
    assert 0 < on_wire[0] < on_wire[1] / 2  # compressed
