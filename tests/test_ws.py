# -*- test-case-name: tests.test_ws -*-
"""
chatd.ws in process: a real Autobahn client (C{create_memory_agent}) talks
to L{chatd.ws.ChatServerProtocol} over in-memory transports, with the real
hub and the embedded broker, on a C{MemoryReactorClock} that also runs
Autobahn's timers (C{txaio.config.loop}).  Handshake refusals, the send
budget and close codes; tests/test_flow.py and tests/test_abuse.py show the
same over TLS on a real twistd.
"""

import dataclasses
import gc
import json
import random
import struct

import pytest
import txaio
from autobahn.twisted.testing import create_memory_agent
from autobahn.twisted.websocket import WebSocketServerProtocol
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher

from chatd import config, errors, ws
from chatd.auth import Principal, TokenVerifier
from chatd.broker.memory import MemoryBroker
from chatd.errors import BrokerUnavailable
from chatd.hub import Hub
from tests import rawws
from tests.fakes import MemoryClient, Pumps

SECRET = b"s" * 32
ORIGIN = "https://chat.example"




class World:
    """A ChatServerFactory on the embedded broker, and a way to connect to it."""

    def __init__(self, **overrides):
        overrides.setdefault("server__allowed_origins", (ORIGIN,))
        overrides.setdefault("websocket__ping_interval", 0)
        self.settings = dataclasses.replace(config.defaults(**overrides), jwt_key=SECRET)
        self.reactor = MemoryReactorClock()
        self.broker = self.make_broker()
        self.factory = ws.ChatServerFactory(
            self.settings, self.broker, Hub(self.broker), TokenVerifier.from_settings(self.settings),
            None, self.reactor,
        )
        self.pumps = Pumps()
        self.servers = []
        self.agent = create_memory_agent(self.reactor, self.pumps, self._server)

    def make_broker(self):
        return MemoryBroker(self.reactor, instance_id="i1")

    def _server(self):
        server = self.factory.buildProtocol(None)
        self.servers.append(server)
        return server

    def ticket(self, sub="alice", exp=None):
        ticket = f"t-{sub}-{len(self.servers)}"
        exp = exp if exp is not None else int(self.reactor.seconds()) + 3600
        self.broker.issue_ticket(ticket, Principal(sub=sub, name=sub.title(), exp=exp), 30)
        return ticket

    def connect(self, query=None, origin=ORIGIN, sub="alice", client_class=None):
        """
        @return: the client once its handshake is over: open, or refused
            (Autobahn's agent never fires for a refused upgrade, so the
            client is what tells).
        """
        if query is None:
            query = "ticket=" + self.ticket(sub)
        options = {"protocols": ["chatd.v1"]}
        if origin is not None:
            options["origin"] = origin
        made = []

        def client():
            made.append((client_class or MemoryClient)())
            return made[-1]

        self.agent.open(f"ws://localhost:8080/ws?{query}", options, protocol_class=client)
        self.pumps.flush()
        [client] = made
        assert client.state in (client.STATE_OPEN, client.STATE_CLOSED), "the handshake did not finish"
        return client

    def refusal(self, **kwargs):
        """The HTTP status a refused handshake was answered with (as the client read it)."""
        client = self.connect(**kwargs)
        assert client.state == client.STATE_CLOSED
        return int(client.http_status_line.split()[1])

    def send(self, client, frame):
        client.sendMessage(json.dumps(frame).encode())
        self.pumps.flush()


@pytest.fixture
def clocked():
    """Autobahn's (txaio's) timers on the test's reactor, for the test's length."""
    saved = txaio.config.loop
    yield
    txaio.config.loop = saved


@pytest.fixture
def world(clocked):
    world = World()
    txaio.config.loop = world.reactor
    return world


def make_world(**overrides):
    world = World(**overrides)
    txaio.config.loop = world.reactor
    return world


def test_open_welcomes_with_the_subprotocol(world):
    """A valid ticket and an allowed Origin open the socket: chatd.v1 and WELCOME."""
    client = world.connect()
    assert client.state == client.STATE_OPEN
    assert client.websocket_protocol_in_use == "chatd.v1"
    assert client.received[0]["type"] == "WELCOME"
    assert world.factory.connections == {world.servers[-1]}


@pytest.mark.parametrize("query", ["", "ticket=", "ticket=a&ticket=b", "ticket=unknown"])
def test_no_or_bad_ticket_is_401(world, query):
    """No ticket, an empty one, two, or one the broker does not know: 401."""
    assert world.refusal(query=query) == errors.HTTP_UNAUTHORIZED
    assert world.factory.connections == set()


def test_ticket_is_single_use(world):
    """A ticket opens one connection; the second use is 401."""
    ticket = world.ticket()
    assert world.connect(query="ticket=" + ticket).state == MemoryClient.STATE_OPEN
    assert world.refusal(query="ticket=" + ticket) == errors.HTTP_UNAUTHORIZED


def test_expired_token_behind_ticket_is_401(world):
    """A ticket whose token has expired by the upgrade is 401."""
    ticket = world.ticket(exp=int(world.reactor.seconds()))
    assert world.refusal(query="ticket=" + ticket) == errors.HTTP_UNAUTHORIZED


@pytest.mark.parametrize("origin", ["https://evil.example", "http://chat.example", "null", "file://"])
def test_origin_not_allowed_is_403(world, origin):
    """
    An Origin not allowed is 403, "null" (sandboxed iframes, file: pages)
    included: it is well-formed, just not allowed (before: Autobahn
    answered "null" with 400 itself).
    """
    ticket = world.ticket()
    assert world.refusal(query="ticket=" + ticket, origin=origin) == errors.HTTP_FORBIDDEN
    # Refused before the ticket was spent.
    assert world.broker.redeem_ticket(ticket).result is not None


def test_null_origin_allowed_by_star(clocked):
    """With allowed_origins = *, even Origin: null opens."""
    world = make_world(server__allowed_origins=("*",))
    assert world.connect(origin="null").state == MemoryClient.STATE_OPEN


def test_no_origin_is_not_held_to_it(world):
    """Non-browser clients send no Origin and are let in."""
    assert world.connect(origin=None).state == MemoryClient.STATE_OPEN


def test_per_address_cap_is_429_and_keeps_the_ticket(clocked):
    """Over max_connections_per_ip: 429, and the refused client's ticket is not spent."""
    world = make_world(limits__max_connections_per_ip=1)
    assert world.connect().state == MemoryClient.STATE_OPEN
    ticket = world.ticket("bob")
    assert world.refusal(query="ticket=" + ticket) == errors.HTTP_TOO_MANY_REQUESTS
    assert world.broker.redeem_ticket(ticket).result is not None


def test_total_cap_is_503(clocked):
    """With max_connections open, the next is 503; a slot freed lets one in again."""
    world = make_world(limits__max_connections=1)
    first = world.connect()
    assert world.refusal() == errors.HTTP_UNAVAILABLE
    first.sendClose()
    world.pumps.flush()
    assert world.factory.connections == set()
    assert world.connect().state == MemoryClient.STATE_OPEN


class _UnavailableBroker(MemoryBroker):
    def redeem_ticket(self, ticket):
        return defer.fail(BrokerUnavailable("down"))


def test_broker_unavailable_is_503(clocked):
    """A broker that cannot redeem tickets: 503, and the slot is given back."""
    world = make_world()
    world.make_broker = None
    broker = _UnavailableBroker(world.reactor, instance_id="i1")
    world.broker = broker
    world.factory = ws.ChatServerFactory(
        world.settings, broker, Hub(broker), TokenVerifier.from_settings(world.settings), None, world.reactor
    )
    assert world.refusal(query="ticket=x") == errors.HTTP_UNAVAILABLE
    assert world.factory.connections == set()


def test_binary_frame_closes_1003(world):
    """A binary frame closes the connection with 1003."""
    client = world.connect()
    client.sendMessage(b"\x00\x01", isBinary=True)
    world.pumps.flush()
    assert client.closed == errors.CLOSE_UNSUPPORTED_DATA


def test_message_over_the_limit_closes_1009(clocked):
    """A message over max_message_bytes closes the connection with 1009."""
    world = make_world(limits__max_message_bytes=128)
    client = world.connect()
    world.send(client, {"type": "TALK", "room": "lobby", "message": "x" * 200})
    assert client.closed == errors.CLOSE_MESSAGE_TOO_BIG


def test_token_expiry_closes_4001(world):
    """When the token's exp passes without a fresh AUTH, the connection closes with 4001."""
    client = world.connect(query="ticket=" + world.ticket(exp=int(world.reactor.seconds()) + 5))
    world.reactor.advance(6)
    world.pumps.flush()
    assert client.closed == errors.CLOSE_TOKEN_EXPIRED
    assert world.factory.connections == set()


def test_close_all_is_1001_and_when_empty_fires(world):
    """close_all(1001) closes every client; when_empty fires once the last has gone."""
    clients = [world.connect(sub=name) for name in ("alice", "bob")]
    empty = world.factory.when_empty()
    world.factory.close_all(errors.CLOSE_GOING_AWAY, "server shutting down")
    assert not empty.called
    world.pumps.flush()
    assert [c.closed for c in clients] == [errors.CLOSE_GOING_AWAY] * 2
    assert empty.called and world.factory.connections == set()
    assert world.factory.when_empty().called  # nothing open: at once


def test_when_empty_waits_again_after_a_new_connection(world):
    """Once emptied, a later connection makes when_empty wait for that one too."""
    first = world.connect()
    first.sendClose()
    world.pumps.flush()
    second = world.connect(sub="bob")
    waiting = world.factory.when_empty()
    assert not waiting.called
    second.sendClose()
    world.pumps.flush()
    assert waiting.called


def test_slow_consumer_closes_4008(clocked):
    """
    A client whose transport is full (the transport paused our producer)
    and that stays behind by more than max_send_buffer_bytes is closed with
    4008, and leaves its rooms at once.
    """
    world = make_world(limits__max_send_buffer_bytes=4096)
    alice, bob = world.connect(sub="alice"), world.connect(sub="bob")
    for client in (alice, bob):
        world.send(client, {"type": "ENTER", "room": "lobby"})
    slow = world.servers[-1]
    slow.transport.producer.pauseProducing()  # what TCP does once its buffer is full
    for i in range(3):
        world.send(alice, {"type": "TALK", "room": "lobby", "message": "y" * 2000})
    world.reactor.advance(0)
    assert world.factory.hub.local_users("lobby") == 1
    world.pumps.flush()
    assert bob.closed == errors.CLOSE_SLOW_CONSUMER
    assert alice.closed is None
    assert [m["type"] for m in alice.received].count("QUIT") == 1


def test_shared_event_is_framed_once(world):
    """The factory keeps the frame of the last text it framed, and frames a new text anew."""
    text = json.dumps({"type": "TALK"})
    first = world.factory.frame(text)
    assert world.factory.frame(text) is first
    other = world.factory.frame(json.dumps({"type": "QUIT"}))
    assert other is not first and other.payload != first.payload


def test_members_get_one_shared_frame(world):
    """A TALK fanned out to several members is prepared once, and every member gets it."""
    prepared = []
    original = world.factory.prepareMessage

    def counting(payload, *args, **kwargs):
        prepared.append(payload)
        return original(payload, *args, **kwargs)

    world.factory.prepareMessage = counting
    clients = [world.connect(sub=name) for name in ("alice", "bob", "carol")]
    for client in clients:
        world.send(client, {"type": "ENTER", "room": "lobby"})
    prepared.clear()
    world.send(clients[0], {"type": "TALK", "room": "lobby", "message": "hi", "ref": "r1"})
    assert len(prepared) == 1
    for client in clients:
        assert client.received[-1]["type"] == "TALK" and client.received[-1]["message"] == "hi"


# --- fragments (issue 8, item 8) -----------------------------------------------


def fragments(count, piece=b"x"):
    """A text message's first frame and C{count - 1} continuations, never finished."""
    first = rawws.frame(rawws.OP_TEXT, piece, fin=False)
    return first + b"".join(rawws.frame(rawws.OP_CONT, piece, fin=False) for _ in range(count - 1))


def test_many_tiny_fragments_close_1009(clocked):
    """
    Each fragment is charged FRAGMENT_COST bytes on top of its payload:
    a message of many one-byte fragments is closed with 1009 long before its
    payload reaches max_message_bytes (before: 60000 fragments were held,
    3.4 MB for 420 KB sent).
    """
    world = make_world(limits__max_message_bytes=4096)
    client = world.connect()
    # n one-byte fragments hold n + (n - 1) * FRAGMENT_COST: 64 fit in 4096, 65 do not.
    client.transport.write(fragments(64))
    world.pumps.flush()
    assert client.closed is None
    client.transport.write(rawws.frame(rawws.OP_CONT, b"x", fin=False))
    world.pumps.flush()
    assert client.closed == errors.CLOSE_MESSAGE_TOO_BIG


def test_autobahn_still_has_the_private_size_hook():
    """
    chatd.ws fails an over-size message through Autobahn's private
    _max_message_size_exceeded(msg_size, max_msg_size, reason), the path
    Autobahn's own size checks take (close 1009 and failedByMe, so nothing
    more of the message is kept); no public call does both.  An Autobahn
    that renames or reshapes it fails here, not on a client's message.
    """
    import inspect

    hook = getattr(WebSocketServerProtocol, "_max_message_size_exceeded", None)
    assert callable(hook), "Autobahn no longer has _max_message_size_exceeded: see ChatServerProtocol.onMessageFrameBegin"
    assert list(inspect.signature(hook).parameters) == ["self", "msg_size", "max_msg_size", "reason"]


def test_one_frame_of_exactly_the_limit_is_accepted(clocked):
    """A message in one frame may be exactly max_message_bytes (no fragment is charged)."""
    world = make_world(limits__max_message_bytes=4096)
    client = world.connect()
    text = json.dumps({"type": "QUIT", "room": "lobby", "ref": "q", "pad": ""})
    text = text[:-2] + "x" * (4096 - len(text)) + '"}'
    assert len(text) == 4096
    client.sendMessage(text.encode())
    world.pumps.flush()
    assert client.closed is None
    assert client.received[-1]["ref"] == "q"


def test_a_few_fragments_are_one_message(world):
    """A message in a handful of fragments is joined and answered like any other."""
    client = world.connect()
    text = json.dumps({"type": "ENTER", "room": "lobby", "ref": "e1"}).encode()
    pieces = [text[i:i + 5] for i in range(0, len(text), 5)]
    data = rawws.frame(rawws.OP_TEXT, pieces[0], fin=False)
    data += b"".join(rawws.frame(rawws.OP_CONT, p, fin=False) for p in pieces[1:-1])
    data += rawws.frame(rawws.OP_CONT, pieces[-1], fin=True)
    client.transport.write(data)
    world.pumps.flush()
    assert client.closed is None
    assert client.received[-1]["type"] == "ENTER" and client.received[-1]["ref"] == "e1"


def raw_client(server, sub):
    """A hand-driven WebSocket to a real twistd, open (WELCOME read)."""
    raw = rawws.RawWebSocket(server.port)
    status, head = raw.upgrade("/ws?ticket=" + server.ticket(sub))
    assert status == 101, head
    assert raw.recv_json()["type"] == "WELCOME"
    return raw


def test_many_fragments_on_a_real_twistd(start_chatd):
    """Over TLS on a real twistd: a message of one-byte fragments is cut with 1009 after about a thousand."""
    server = start_chatd()
    raw = raw_client(server, "mallory")
    try:
        raw.send_raw(fragments(2000))
        assert raw.close_code() == errors.CLOSE_MESSAGE_TOO_BIG
    finally:
        raw.close()
    assert "Traceback" not in server.log_text()


# --- refusals in the log (issue 8, item 11) -------------------------------------


@pytest.fixture
def logged():
    """Every log event of the server side during the test, formatted (the in-memory client logs too)."""
    lines = []

    def observer(event):
        if "Client" not in event.get("log_namespace", ""):
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


class _BrokenBroker(MemoryBroker):
    """A broker whose redemption fails as no broker should, or grants what is not a Principal."""

    def __init__(self, *args, outcome, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcome = outcome

    def redeem_ticket(self, ticket):
        if self.outcome == "fails":
            return defer.fail(RuntimeError("broker bug"))
        return defer.succeed("not a grant")


@pytest.mark.parametrize("outcome", ["fails", "grants nonsense"])
def test_an_unexpected_error_deciding_is_500_logged_once(clocked, logged_failures, outcome):
    """
    An error nobody planned for while the ticket is redeemed (the broker's
    Deferred fails with a bug) or its grant checked (a grant that is not a
    Principal): 500 with "internal error", the error logged once with its
    traceback, the slot given back, and nothing left unhandled.
    """
    logged_failures.expect("error in onConnect")
    world = make_world()
    broker = _BrokenBroker(world.reactor, instance_id="i1", outcome=outcome)
    world.broker = broker
    world.factory = ws.ChatServerFactory(
        world.settings, broker, Hub(broker), TokenVerifier.from_settings(world.settings), None, world.reactor
    )
    client = world.connect(query="ticket=x")
    assert client.state == client.STATE_CLOSED
    assert client.http_status_line.split(None, 1)[1] == "500 internal error"
    assert world.factory.connections == set() and not any(world.factory.metrics.handshakes_rejected.values())
    gc.collect()  # an unhandled error in a Deferred is logged when it is collected
    failures = [e for e in logged_failures.events if e.get("log_failure") is not None]
    assert [formatEvent(e) for e in failures] == ["error in onConnect for /ws"]
    assert failures[0]["log_failure"].type is (RuntimeError if outcome == "fails" else AttributeError)


@pytest.mark.parametrize("access_log", [True, False])
def test_an_accepted_upgrade_is_an_access_log_line(clocked, logged, access_log):
    """
    [server] access_log governs the line of an accepted upgrade, as it does
    the line of an HTTP request (docs/configuration.md); the line of the
    ended session is written either way.
    """
    world = make_world(server__access_log=access_log)
    client = world.connect(sub="bob")
    assert client.state == client.STATE_OPEN
    opened = [line for line in logged if " connected as " in line]
    assert opened == (["websocket 127.0.0.1 Bob connected as i1:1"] if access_log else [])
    client.sendClose(1000)
    world.pumps.flush()
    assert [line for line in logged if " ended after " in line and "i1:1 of Bob" in line]


def test_a_refusal_is_one_escaped_line(world, logged):
    """
    A refused upgrade logs one line, and nothing the client sent reaches it
    raw: Autobahn's own refusal of an Origin with no host used to log the
    header as sent (U+0085 and U+009B end or forge a line on some terminals).
    """
    forged = "\u0085\u009b2J2026-01-01 [chatd.ws#info] FORGED"
    assert world.refusal(origin="x" + forged) == 400
    assert len(logged) == 1 and "refused 400: malformed upgrade" in logged[0], logged
    assert "\u0085" not in logged[0] and "\u009b" not in logged[0]
    for kwargs in ({"query": "ticket=nope"}, {"origin": "https://evil.example"}):
        logged.clear()
        world.refusal(**kwargs)
        assert len(logged) == 1 and "refused 40" in logged[0], logged


def test_repeated_refusals_are_rate_limited(world, logged):
    """
    The same refusal over and over logs a burst, then the budget's rate;
    the number left out comes with the next line of that kind.  Another
    kind of refusal has its own budget, so a flood does not hide it.
    """
    for _ in range(50):
        assert world.refusal(query="ticket=nope") == errors.HTTP_UNAUTHORIZED
    assert len([line for line in logged if "refused 401" in line]) == ws.REFUSAL_LOG_BURST
    assert world.refusal(origin="https://evil.example") == errors.HTTP_FORBIDDEN
    assert "refused 403" in logged[-1]
    world.reactor.advance(1 / ws.REFUSAL_LOG_RATE)
    logged.clear()
    assert world.refusal(query="ticket=nope") == errors.HTTP_UNAUTHORIZED
    left_out = 50 - ws.REFUSAL_LOG_BURST
    assert logged[0].startswith(f"{left_out} websocket refusals were not logged (401"), logged
    assert "refused 401" in logged[1]


# --- Server header (issue 8, item 13) -------------------------------------------


def test_upgrade_answer_names_chatd_only(world):
    """The 101 answer's Server header is "chatd", without Autobahn's name or version."""
    client = world.connect()
    head = client.http_response_data.decode("latin-1")
    assert "Server: chatd\r\n" in head
    assert "autobahn" not in head.lower() and "twisted" not in head.lower()


def test_writes_are_counted_like_autobahns(world):
    """
    The write path that skips Autobahn's sendData still counts the octets
    Autobahn counts (trafficStats) and writes the frames in order.
    """
    alice, bob = world.connect(sub="alice"), world.connect(sub="bob")
    for client in (alice, bob):
        world.send(client, {"type": "ENTER", "room": "lobby"})
    server = world.servers[-1]
    before = server.trafficStats.outgoingOctetsWireLevel
    for i in range(3):
        world.send(alice, {"type": "TALK", "room": "lobby", "message": f"m{i}"})
    talks = [m["message"] for m in bob.received if m["type"] == "TALK"]
    assert talks == ["m0", "m1", "m2"]
    # Each text under 126 bytes: a 2-byte header, then the JSON as sent.
    assert server.trafficStats.outgoingOctetsWireLevel - before == sum(
        2 + len(json.dumps(m, separators=(",", ":"))) for m in bob.received[-3:]
    )


def _autobahn_send_text(protocol, text):
    """send_text as it was, through Autobahn's sendMessage: the reference for L{ws.ChatServerProtocol.send_text}."""
    if protocol.state == protocol.STATE_OPEN:
        WebSocketServerProtocol.sendMessage(protocol, text.encode("utf-8"))
        protocol._sent += 1


# Texts of the lengths where a frame's header changes (125/126, 65535/65536
# bytes), and any others, ASCII and not.
SENT_TEXTS = st.one_of(
    st.text(max_size=300),
    st.sampled_from([0, 1, 124, 125, 126, 127, 65535, 65536, 70000]).map(lambda n: "x" * n),
    st.sampled_from([62, 63, 64]).map(lambda n: "\xe9" * n),
)


@given(
    texts=st.lists(SENT_TEXTS, min_size=1, max_size=3),
    compression=st.booleans(),
    options=st.fixed_dictionaries({
        "autoFragmentSize": st.sampled_from([0, 0, 50, 200]),
        "maxMessagePayloadSize": st.sampled_from([0, 100, 65536]),
        "logFrames": st.sampled_from([False, False, True]),
        "maskServerFrames": st.sampled_from([False, False, True]),
        "trackTimings": st.sampled_from([False, False, True]),
    }),
    closed=st.booleans(),
)
@hypothesis_settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_send_text_writes_and_counts_as_autobahn_does(texts, compression, options, closed):
    """
    send_text, which frames the common text itself, writes the same bytes
    as Autobahn's sendMessage and counts the same (trafficStats, the
    frames sent), for texts of every header size, compressed or not,
    fragmented, over the message limit (Autobahn's refusal), with frames
    logged, masked (the same mask on both: random seeded alike) or timed,
    and on a connection no longer open.
    """
    saved = txaio.config.loop
    try:
        world = make_world(websocket__compression=compression)
        seen = []
        for send in (ws.ChatServerProtocol.send_text, _autobahn_send_text):
            world.connect(client_class=DeflateClient if compression else None)
            server = world.servers[-1]
            for name, value in options.items():
                setattr(server, name, value)
            if options["trackTimings"]:
                server.setTrackTimings(True)
            if closed:
                server.state = server.STATE_CLOSING
            written = []
            server.transport.write = written.append
            outcomes = []
            for text in texts:
                random.seed(len(text))
                try:
                    send(server, text)
                except Exception as e:
                    outcomes.append(type(e).__name__)
                else:
                    outcomes.append(None)
            seen.append((b"".join(written), outcomes, vars(server.trafficStats), server._sent))
        assert seen[0] == seen[1]
    finally:
        txaio.config.loop = saved


class DeflateClient(MemoryClient):
    """A MemoryClient that offers permessage-deflate."""

    def startHandshake(self):
        from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateResponseAccept

        self.perMessageCompressionOffers = [PerMessageDeflateOffer()]
        self.perMessageCompressionAccept = PerMessageDeflateResponseAccept
        super().startHandshake()


def test_compressed_members_get_the_shared_event(clocked):
    """
    With compression on, a member that took permessage-deflate gets the
    shared event compressed (not the prepared uncompressed frame), and one
    that did not gets it plain.
    """
    world = make_world(websocket__compression=True)
    squeezed = world.connect(sub="carol", client_class=DeflateClient)
    plain, talker = world.connect(sub="bob"), world.connect(sub="alice")
    assert world.servers[0]._perMessageCompress is not None
    assert world.servers[1]._perMessageCompress is None
    for client in (squeezed, plain, talker):
        world.send(client, {"type": "ENTER", "room": "lobby"})
    world.send(talker, {"type": "TALK", "room": "lobby", "message": "hi " * 50})
    world.pumps.flush()  # the talker's pump runs last: once more for what it made the others get
    for client in (squeezed, plain):
        assert client.received[-1]["type"] == "TALK" and client.received[-1]["message"] == "hi " * 50


# --- the receive fast path (_GuardedMixin._text_frames) --------------------------------------


FAST_LIMIT = 512  # max_message_bytes of the echo servers below
HANDSHAKE = (
    b"GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class AutobahnOnly(ws.EchoServerProtocol):
    """/echo with the fast path off: Autobahn parses every frame."""

    def _text_frames(self, data):
        return data


class CountingEcho(ws.EchoServerProtocol):
    """/echo that counts the frames Autobahn itself parsed."""

    parsed = 0

    def processData(self):
        self.parsed += 1
        return super().processData()


def open_echo(protocol_class):
    """
    An open /echo protocol (limits: FAST_LIMIT bytes) on a StringTransport,
    its handshake answer cleared.
    """
    reactor = MemoryReactorClock()
    txaio.config.loop = reactor
    settings = config.defaults(websocket__ping_interval=0, limits__max_message_bytes=FAST_LIMIT)
    factory = ws.EchoServerFactory(settings, None, reactor)
    factory.protocol = protocol_class
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    transport.registerProducer(object(), True)  # as the HTTP channel had; the guard replaces it
    protocol.dataReceived(HANDSHAKE)
    assert protocol.state == protocol.STATE_OPEN
    transport.clear()
    return protocol, transport


def client_frame(opcode, payload, key, fin=True, masked=True, rsv=0, width=None):
    """
    One client frame with mask C{key}; C{width} (7, 16 or 64) forces the
    length encoding, minimal or not.
    """
    n = len(payload)
    width = width or (7 if n < 126 else 16 if n < 65536 else 64)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    bit = 0x80 if masked else 0
    if width == 7:
        head += bytes([bit | n])
    elif width == 16:
        head += bytes([bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    return head + key + rawws.mask(payload, key)


def _replay_on_each(stream, cuts, protocol_classes, observe):
    """
    Feed C{stream}, cut at C{cuts}, to an open echo connection of each
    class in turn: for each, what it wrote and C{observe(protocol)}.
    """
    bounds = sorted({min(cut, len(stream)) for cut in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(bounds, bounds[1:])]
    saved = txaio.config.loop
    try:
        results = []
        for protocol_class in protocol_classes:
            protocol, transport = open_echo(protocol_class)
            for chunk in chunks:
                protocol.dataReceived(chunk)
            results.append((transport.value(), observe(protocol)))
    finally:
        txaio.config.loop = saved
    return results


def _frames(draw_kind, text, key):
    """The bytes of one frame (or fragmented message) of kind C{draw_kind}."""
    data = text.encode("utf-8")
    if draw_kind == "text":
        return client_frame(rawws.OP_TEXT, data, key)
    if draw_kind == "long text":  # a 16-bit length, maybe over the limit
        return client_frame(rawws.OP_TEXT, (data or b"x") * (1 + 600 // max(1, len(data))), key)
    if draw_kind == "limit":
        return client_frame(rawws.OP_TEXT, (data + b"y" * FAST_LIMIT)[:FAST_LIMIT], key)
    if draw_kind == "bad utf-8":
        return client_frame(rawws.OP_TEXT, data + b"\xff", key)
    if draw_kind == "cut utf-8":
        return client_frame(rawws.OP_TEXT, data + b"\xc3", key)
    if draw_kind == "surrogate":
        return client_frame(rawws.OP_TEXT, data + b"\xed\xa0\x80", key)
    if draw_kind == "empty":
        return client_frame(rawws.OP_TEXT, b"", key)
    if draw_kind == "binary":
        return client_frame(rawws.OP_BINARY, data, key)
    if draw_kind == "ping":
        return client_frame(rawws.OP_PING, data[:100], key)
    if draw_kind == "fragments":
        half = len(data) // 2
        return (client_frame(rawws.OP_TEXT, data[:half], key, fin=False)
                + client_frame(rawws.OP_CONT, data[half:], key))
    if draw_kind == "unmasked":
        return client_frame(rawws.OP_TEXT, data, key, masked=False)
    if draw_kind == "rsv":
        return client_frame(rawws.OP_TEXT, data, key, rsv=4)
    if draw_kind == "16-bit small":  # not minimally encoded
        return client_frame(rawws.OP_TEXT, data, key, width=16)
    if draw_kind == "64-bit small":
        return client_frame(rawws.OP_TEXT, data, key, width=64)
    if draw_kind == "close":
        return client_frame(rawws.OP_CLOSE, struct.pack("!H", 1000), key)
    raise AssertionError(draw_kind)


FRAME_KINDS = [
    "text", "text", "text", "long text", "limit", "bad utf-8", "cut utf-8", "surrogate", "empty",
    "binary", "ping", "fragments", "unmasked", "rsv", "16-bit small", "64-bit small", "close",
]


@given(
    frames=st.lists(
        st.tuples(st.sampled_from(FRAME_KINDS), st.text(max_size=40), st.binary(min_size=4, max_size=4)),
        min_size=1, max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=4),
)
@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fast_path_answers_as_autobahn_does(frames, cuts):
    """
    Any stream of frames, good and bad, in any chunks: the fast path writes
    byte for byte what Autobahn alone writes (the echoes in order, pongs,
    close frames with their codes: 1002, 1007, 1009) and ends in the same
    state.
    """
    stream = b"".join(_frames(kind, text, key) for kind, text, key in frames)
    results = _replay_on_each(
        stream, cuts, (ws.EchoServerProtocol, AutobahnOnly),
        lambda protocol: (protocol.state, protocol.data, protocol.inside_message),
    )
    assert results[0] == results[1]


def test_fast_path_takes_whole_text_frames(clocked):
    """
    Complete small text frames, several in one read, never reach Autobahn's
    frame parser; each is echoed, in order; a frame cut in two is Autobahn's
    until it is complete, and the next whole frame is the fast path's again.
    """
    protocol, transport = open_echo(CountingEcho)
    key = b"\x01\x02\x03\x04"
    protocol.dataReceived(b"".join(client_frame(rawws.OP_TEXT, b"m%d" % i, key) for i in range(3)))
    long = "é".encode("utf-8") * 100
    protocol.dataReceived(client_frame(rawws.OP_TEXT, long, key))
    assert protocol.parsed == 0
    cut = client_frame(rawws.OP_TEXT, b"half", key)
    protocol.dataReceived(cut[:5])
    protocol.dataReceived(cut[5:])
    assert protocol.parsed > 0
    parsed = protocol.parsed
    protocol.dataReceived(client_frame(rawws.OP_TEXT, b"again", key))
    assert protocol.parsed == parsed
    frames = transport.value()
    expected = b"".join(
        bytes([0x81, len(p)]) + p for p in (b"m0", b"m1", b"m2")
    ) + b"\x81\x7e" + struct.pack("!H", len(long)) + long + b"\x81\x04half\x81\x05again"
    assert frames == expected


def test_fast_path_bad_utf8_closes_1007(clocked):
    """Invalid UTF-8 in a frame the fast path would take is still closed 1007, by Autobahn."""
    protocol, transport = open_echo(CountingEcho)
    key = b"\x09\x08\x07\x06"
    protocol.dataReceived(client_frame(rawws.OP_TEXT, b"ok", key) + client_frame(rawws.OP_TEXT, b"\xed\xa0\x80", key))
    out = transport.value()
    assert out.startswith(b"\x81\x02ok\x88")
    assert struct.unpack("!H", out[6:8])[0] == errors.CLOSE_INVALID_PAYLOAD
    assert protocol.state != protocol.STATE_OPEN


# --- an idle connection's attributes (docs/performance.md) --------------------


class _Fragmenting(MemoryClient):
    """A client that sends its text messages in two fragments (Autobahn's receive path)."""

    def send_fragmented(self, frame):
        data = json.dumps(frame).encode()
        self.beginMessage(isBinary=False)
        self.sendMessageFrame(data[:5])
        self.sendMessageFrame(data[5:])
        self.endMessage()


def test_idle_connection_keeps_no_attribute_at_rest(clocked):
    """
    An open connection's attribute dict holds no attribute at its starting
    value, nor the shared ones (events, extensions, the UTF-8 validator);
    after ping/pong cycles and a message through Autobahn's path it is
    compacted again, with the ping sequence and the count of messages in
    the only additions; what was dropped still reads as before.
    """
    world = World(websocket__ping_interval=5, websocket__ping_timeout=3)
    client = world.connect(client_class=_Fragmenting)
    [server] = world.servers
    opened = set(server.__dict__)
    assert not [name for name, value in vars(server).items() if ws.AT_REST.get(name, object()) is value]
    assert not opened & {"_valid_events", "_results", "utf8validator", "websocket_extensions_in_use"}
    assert server.websocket_extensions_in_use == () and server.data == b"" and server.current_frame is None
    client.send_fragmented({"type": "ENTER", "room": "lobby", "ref": "e1"})
    world.pumps.flush()
    assert client.received[-1]["type"] == "ENTER" and client.received[-1]["ref"] == "e1"  # through Autobahn's path
    for _ in range(2):
        world.reactor.advance(5)
        world.pumps.flush()
    assert server.state == server.STATE_OPEN
    assert set(server.__dict__) - opened == {"autoPingPendingSeq", "_received"}
    assert server.autoPingPending is None and server.autoPingTimeoutCall is None
    client.send_fragmented({"type": "TALK", "room": "lobby", "message": "still here", "ref": "t1"})
    world.pumps.flush()
    assert client.received[-1]["type"] == "TALK" and client.received[-1]["message"] == "still here"


def test_a_listener_added_after_the_open_hears_each_message(world, logged_failures):
    """
    Autobahn's event API still works on an open (compacted) connection: a
    listener added with C{on("message")} is called with each message that
    takes Autobahn's path, and nothing fails.  (Before, the open connection
    shared a read-only event table, and the first message failed writing
    its result into it: TypeError, unhandled.)
    """
    client = world.connect()
    [server] = world.servers
    heard = []
    server.on("message", lambda payload, is_binary: heard.append((payload, is_binary)))
    world.send(client, {"type": "ENTER", "room": "lobby", "ref": "e1"})
    assert heard == [(json.dumps({"type": "ENTER", "room": "lobby", "ref": "e1"}).encode(), False)]
    assert client.received[-1]["type"] == "ENTER" and client.received[-1]["ref"] == "e1"
    other = world.connect(sub="bob")
    world.send(other, {"type": "ENTER", "room": "lobby", "ref": "e2"})
    assert len(heard) == 1 and type(world.servers[1]._results) is not dict  # the others still share


def test_connection_starts_as_autobahn_starts_it():
    """
    chatd's connectionMade sets only what a connection has of its own; every
    attribute Autobahn's _connectionMade sets reads the same (a value of
    the same type, and equal when it is a plain value) on a new connection.
    """
    from autobahn.websocket.protocol import WebSocketProtocol
    from twisted.internet.task import Clock

    factory = ws.EchoServerFactory(config.defaults(), None, Clock())
    ours = factory.buildProtocol(None)
    ours.makeConnection(StringTransport())
    theirs = factory.buildProtocol(None)
    before = set(vars(theirs))
    WebSocketProtocol._connectionMade(theirs)
    set_by_autobahn = {name: value for name, value in vars(theirs).items() if name not in before}
    assert len(set_by_autobahn) > 25
    for name, value in set_by_autobahn.items():
        mine = getattr(ours, name)
        if name == "send_queue":
            assert mine == [] and hasattr(mine, "popleft")
        elif value is None or isinstance(value, (bool, int, bytes)):
            assert mine == value and type(mine) is type(value), name
        else:
            assert type(mine) is type(value), name
    assert len(vars(ours)) <= 15


def test_send_queue_is_shared_until_a_send_queues(monkeypatch):
    """
    A connection has no send queue of its own (all share one empty queue)
    until a chopped or synchronous send queues: then it gets its own, its
    chunks go out in order, and the shared queue stays empty.
    """
    from twisted.internet.task import Clock

    later = []
    monkeypatch.setattr(txaio, "call_later", lambda delay, func, *args: later.append(func))
    factory = ws.EchoServerFactory(config.defaults(), None, Clock())
    one, two = factory.buildProtocol(None), factory.buildProtocol(None)
    transports = StringTransport(), StringTransport()
    one.makeConnection(transports[0])
    two.makeConnection(transports[1])
    assert one.send_queue is two.send_queue and "send_queue" not in vars(one) and one.send_queue == []
    one.sendData(b"abcdefg", chopsize=3)
    while later:
        later.pop(0)()
    assert transports[0].value().endswith(b"abcdefg") and not transports[1].value().endswith(b"abcdefg")
    assert one.send_queue is not two.send_queue and two.send_queue == [] and one.send_queue == []
    two.sendData(b"xyz")
    assert transports[1].value().endswith(b"xyz") and "send_queue" not in vars(two)


def test_is_open_and_is_closed_read_as_autobahns(world):
    """
    Autobahn's is_open and is_closed Deferreds are made when first read:
    an open connection holds neither unless asked; is_open read after the
    open is fired with None, is_closed fires with the connection when it
    closes, and each is the same Deferred read again.
    """
    client = world.connect()
    server = world.servers[-1]
    assert "is_open" not in vars(server) and "is_closed" not in vars(server)
    assert not any(isinstance(o, defer.Deferred) for o in gc.get_referents(vars(server)))
    heard = []
    server.is_open.addCallback(heard.append)
    assert heard == [None] and server.is_open is server.is_open
    closed = server.is_closed
    assert not closed.called
    client.sendClose()
    world.pumps.flush()
    assert server.state == server.STATE_CLOSED
    assert closed.called and closed.result is server and server.is_closed is closed


def test_is_open_read_before_the_open_fires_at_the_open(world):
    """A connection whose is_open was read during its opening handshake fires it with None at the open."""
    heard = []

    def server():
        protocol = world.factory.buildProtocol(None)
        protocol.is_open.addCallback(heard.append)
        world.servers.append(protocol)
        return protocol

    world.agent = create_memory_agent(world.reactor, world.pumps, server)
    world.connect()
    assert heard == [None] and world.servers[-1].is_open.called


class Uncompacted(AutobahnOnly):
    """
    /echo as Autobahn alone keeps it: its own _connectionMade (every
    attribute set per connection) and no compaction, on open or after a
    pong; no fast path either.
    """

    def connectionMade(self):
        self._transport_details = None
        self.peer = "memory"
        WebSocketServerProtocol._connectionMade(self)  # every attribute, set per connection
        self.send_queue = ws._SendQueue()

    def _compact(self):
        pass


def _compacting_frames(kind, text, key):
    """L{_frames}, and pongs: alone, inside a fragmented message, and after one."""
    data = text.encode("utf-8")
    if kind == "pong":
        return client_frame(rawws.OP_PONG, data[:100], key)
    if kind == "pong inside fragments":
        half = len(data) // 2
        return (client_frame(rawws.OP_TEXT, data[:half], key, fin=False)
                + client_frame(rawws.OP_PONG, b"p", key)
                + client_frame(rawws.OP_CONT, data[half:], key))
    if kind == "pong, then a fragment":
        return client_frame(rawws.OP_PONG, b"", key) + client_frame(rawws.OP_TEXT, data, key, fin=False)
    return _frames(kind, text, key)


@given(
    frames=st.lists(
        st.tuples(
            st.sampled_from(FRAME_KINDS + ["pong", "pong", "pong inside fragments", "pong, then a fragment"]),
            st.text(max_size=40), st.binary(min_size=4, max_size=4),
        ),
        min_size=1, max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=4),
)
@hypothesis_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_compaction_answers_as_uncompacted_autobahn_does(frames, cuts):
    """
    Any stream of frames with pongs among them (each pong compacts the
    dict again), in any chunks: chatd's connection (its own connectionMade,
    compacted on open and after each pong) writes byte for byte what
    Autobahn's uncompacted connection writes (echoes, pongs, close codes)
    and ends in the same state, for every attribute Autobahn reads.
    """
    stream = b"".join(_compacting_frames(kind, text, key) for kind, text, key in frames)
    results = _replay_on_each(
        stream, cuts, (ws.EchoServerProtocol, Uncompacted),
        lambda protocol: (
            protocol.state, protocol.data, protocol.inside_message,
            protocol.wasClean, protocol.localCloseCode, protocol.remoteCloseCode,
            protocol.closedByMe, protocol.failedByMe, protocol.droppedByMe,
            protocol.websocket_extensions_in_use == [] or protocol.websocket_extensions_in_use == (),
        ),
    )
    assert results[0] == results[1]
