# -*- test-case-name: tests.test_stomp_session -*-
"""
chatd.stomp.session on a Clock, a real Hub and the embedded broker: STOMP
clients and chatd.v1 sessions share rooms, ids and order; every refusal is
an ERROR frame (with receipt-id when asked) and then a close; heart-beats,
the CONNECT deadline, expiry, the rate limit.
"""

import gc
import json

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer

from chatd import config, errors
from chatd.auth import Principal
from chatd.hub import Hub
from chatd.session import Expiries, Session
from chatd.stomp import frames
from chatd.stomp.frames import Frame, FrameParser
from chatd.stomp.session import EventFrames, IStompConnection, StompSession
from tests.fakes import FakeConnection, FakeVerifier, RecordingBroker

START = 1000.0
EXP = 2000
ALICE = Principal(sub="alice", name="Alice", exp=EXP)
BOB = Principal(sub="bob", name="Bob", exp=EXP)
CAROL = Principal(sub="carol", name="Carol", exp=EXP, rooms=frozenset({"lobby"}))


@implementer(IStompConnection)
class FakeStompConnection:
    """Keeps the frames it was sent, parsed back, and the raw bytes objects."""

    framing = "plain"

    def __init__(self, connection_id):
        self.connection_id = connection_id
        self.raw = []
        self.frames = []
        self.closes = []
        self._parser = FrameParser(1 << 20)

    def send_frame(self, data):
        self.raw.append(data)
        self.frames.extend(self._parser.feed(data))

    send_shared_frame = send_frame

    def when_drained(self):
        return defer.succeed(None)

    def close(self, code, reason):
        self.closes.append((code, reason))

    def take(self):
        """The frames received since the last take()."""
        got, self.frames = self.frames, []
        return got


class World:
    """One hub on one clock, and the connections made on it."""

    def __init__(self, tokens=None, **overrides):
        self.clock = Clock()
        self.clock.advance(START)
        self.settings = config.defaults(**overrides)
        self.broker = RecordingBroker(self.clock)
        self.hub = Hub(self.broker)
        self.verifier = FakeVerifier(tokens or {})
        self.event_frames = EventFrames()
        self._ids = iter(range(1, 1000))

    def stomp(self, principal=ALICE, connect=True, expiries=None, **headers):
        """A STOMP session, CONNECTed unless told otherwise."""
        connection = FakeStompConnection(f"i:{next(self._ids)}")
        session = StompSession(
            connection, principal, self.hub, self.verifier, self.settings, self.clock, self.event_frames,
            expiries=expiries,
        )
        session.open()
        if connect:
            headers.setdefault("accept-version", "1.2")
            send(session, "CONNECT", **headers)
            [connected] = connection.take()
            assert connected.command == "CONNECTED"
        return connection, session

    def json(self, principal=BOB):
        """A chatd.v1 session on the same hub."""
        connection = FakeConnection(f"i:{next(self._ids)}")
        session = Session(principal, connection, self.hub, self.verifier, self.settings.limits, self.clock)
        session.open()
        connection.take()
        return connection, session


def send(session, command, body=b"", **headers):
    """One frame from the client (header names: _ for -)."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    frame = Frame(command, tuple((k.replace("_", "-"), v) for k, v in headers.items()), body)
    session.received(frames.encode(frame))


def body(frame):
    return json.loads(frame.body)


def assert_error(connection, code, why, receipt=None, close=1000):
    """The last frames are one ERROR naming C{why}, and the connection was closed once."""
    got = connection.take()
    assert [f.command for f in got][-1:] == ["ERROR"], got
    error = got[-1]
    assert error.get("message") == code
    assert why in error.body.decode(), error.body
    assert error.get("receipt-id") == receipt
    assert len(connection.closes) == 1 and connection.closes[0][0] == close
    return got[:-1]


# --- CONNECT -------------------------------------------------------------------


def test_connected_headers():
    """CONNECTED: highest version offered, chatd's heart-beat offer, server, user-name."""
    world = World()
    connection, session = world.stomp(connect=False)
    send(session, "CONNECT", accept_version="1.0,1.1", heart_beat="0,0", host="ignored")
    [connected] = connection.take()
    assert connected.command == "CONNECTED"
    assert connected.get("version") == "1.1"
    assert connected.get("heart-beat") == "10000,10000"
    assert connected.get("server").startswith("chatd/")
    assert connected.get("user-name") == "Alice"
    assert connection.closes == []


def test_stomp_frame_connects_as_10_without_accept_version():
    """STOMP works like CONNECT; no accept-version means 1.0."""
    connection, session = World().stomp(connect=False)
    send(session, "STOMP")
    assert connection.take()[0].get("version") == "1.0"


def test_version_mismatch():
    """No version in common: ERROR listing ours, then close."""
    connection, session = World().stomp(connect=False)
    send(session, "CONNECT", accept_version="2.0")
    assert_error(connection, "bad_request", "supported STOMP versions are 1.0,1.1,1.2")


def test_first_frame_must_be_connect():
    """Anything before CONNECT: ERROR, close."""
    connection, session = World().stomp(connect=False)
    send(session, "SUBSCRIBE", destination="/topic/lobby", id="0", receipt="r")
    assert_error(connection, "bad_request", "the first frame must be CONNECT, not SUBSCRIBE", receipt="r")


def test_no_connect_in_time():
    """No CONNECT within [websocket] handshake_timeout: ERROR and close."""
    world = World()
    connection, session = world.stomp(connect=False)
    world.clock.advance(world.settings.websocket.handshake_timeout)
    assert_error(connection, "bad_request", "no CONNECT in time")


def test_connect_cancels_the_deadline():
    """A CONNECT in time keeps the connection past the deadline."""
    world = World()
    connection, _ = world.stomp()
    world.clock.advance(world.settings.websocket.handshake_timeout * 2)
    assert connection.closes == []


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer good"}, {"passcode": "good", "login": "x"}, {"token": "good"}],
)
def test_connect_auth_takes_the_jwt_from_connect(headers):
    """Without a ticket (connect_auth), CONNECT's JWT names the user."""
    world = World(tokens={"good": BOB})
    connection, session = world.stomp(principal=None, connect=False)
    send(session, "CONNECT", accept_version="1.2", **headers)
    [connected] = connection.take()
    assert connected.command == "CONNECTED" and connected.get("user-name") == "Bob"


@pytest.mark.parametrize(
    "headers,why",
    [({}, "CONNECT needs Authorization: Bearer <JWT>"), ({"passcode": "forged"}, "bad signature")],
)
def test_connect_auth_refusals(headers, why):
    """Without a ticket, a CONNECT with no or a bad JWT: ERROR unauthorized, close."""
    world = World(tokens={"good": BOB})
    connection, session = world.stomp(principal=None, connect=False)
    send(session, "CONNECT", **headers)
    assert_error(connection, "unauthorized", why)


def test_connect_auth_deadline_says_unauthorized():
    """Without a ticket, no CONNECT in time is unauthorized."""
    world = World()
    connection, _ = world.stomp(principal=None, connect=False)
    world.clock.advance(world.settings.websocket.handshake_timeout)
    assert_error(connection, "unauthorized", "no CONNECT with a valid JWT")


# --- rooms ---------------------------------------------------------------------


def test_stomp_and_json_clients_share_a_room():
    """A STOMP and a chatd.v1 client in one room see each other's events, same ids, same order."""
    world = World()
    stomp, s = world.stomp()
    send(s, "SUBSCRIBE", destination="/sub/chat/room/lobby", id="sub-0")
    [enter] = stomp.take()
    assert enter.command == "MESSAGE"
    assert enter.get("destination") == "/sub/chat/room/lobby" and enter.get("subscription") == "sub-0"
    assert enter.get("content-type") == "application/json"
    assert body(enter) == {
        "type": "ENTER", "roomId": "lobby", "sender": "Alice", "message": "Alice entered",
        "userCount": 1, "id": enter.get("message-id"), "ts": body(enter)["ts"],
    }
    js, j = world.json()
    j.received(json.dumps({"type": "ENTER", "room": "lobby"}))
    j.received(json.dumps({"type": "TALK", "room": "lobby", "message": "hi from json"}))
    send(s, "SEND", {"type": "TALK", "roomId": "lobby", "message": "hi from stomp"}, destination="/pub/chat/message")
    seen_by_stomp = [body(f) for f in stomp.take()]
    seen_by_json = [f for f in js.take()]
    assert [(e["type"], e["sender"], e["userCount"]) for e in seen_by_stomp] == [
        ("ENTER", "Bob", 2), ("TALK", "Bob", 2), ("TALK", "Alice", 2),
    ]
    assert [e["id"] for e in seen_by_stomp] == [e["id"] for e in seen_by_json]
    assert seen_by_json[-1]["message"] == "hi from stomp"


def test_subscribe_then_send_in_one_message():
    """SUBSCRIBE, an ENTER body and a TALK sent at once are handled in order (the SEND waits for the ENTER)."""
    world = World()
    connection, session = world.stomp()
    data = b"".join(
        frames.encode(f)
        for f in (
            Frame("SUBSCRIBE", (("destination", "/topic/lobby"), ("id", "0"))),
            Frame("SEND", (("destination", "/pub/chat/message"),), b'{"type":"ENTER","roomId":"lobby"}'),
            Frame("SEND", (("destination", "/app/chat/lobby"), ("receipt", "t1")), b"hello"),
        )
    )
    held = world.broker.held = defer.Deferred()
    session.received(data)
    assert connection.take() == []  # the ENTER is in flight; the SENDs wait
    held.callback(None)
    got = connection.take()
    assert [(f.command, f.get("receipt-id")) for f in got] == [("MESSAGE", None), ("MESSAGE", None), ("RECEIPT", "t1")]
    assert [body(f)["type"] for f in got[:2]] == ["ENTER", "TALK"]


def test_receipts():
    """receipt on SUBSCRIBE, SEND (after the TALK is accepted) and UNSUBSCRIBE gets RECEIPT."""
    world = World()
    connection, session = world.stomp()
    send(session, "SUBSCRIBE", destination="/topic/a", id="0", receipt="s")
    assert [f.command for f in connection.take()] == ["MESSAGE", "RECEIPT"]
    send(session, "SEND", b"x", destination="/app/chat/a", receipt="t")
    got = connection.take()
    assert [f.command for f in got] == ["MESSAGE", "RECEIPT"] and got[1].get("receipt-id") == "t"
    send(session, "UNSUBSCRIBE", id="0", receipt="u")
    assert [(f.command, f.get("receipt-id")) for f in connection.take()] == [("RECEIPT", "u")]


def test_unsubscribe_quits():
    """UNSUBSCRIBE is QUIT: others see it; nothing more reaches that subscription."""
    world = World()
    a, sa = world.stomp()
    b, sb = world.stomp(BOB)
    send(sa, "SUBSCRIBE", destination="/topic/a", id="0")
    send(sb, "SUBSCRIBE", destination="/topic/a", id="0")
    send(sa, "UNSUBSCRIBE", id="0")
    a.take()
    assert [(body(f)["type"], body(f)["sender"], body(f)["userCount"]) for f in b.take()] == [
        ("ENTER", "Bob", 2), ("QUIT", "Alice", 1),
    ]
    send(sb, "SEND", b"still here?", destination="/app/chat/a")
    assert a.take() == []


def test_since_replays_then_marks():
    """SUBSCRIBE with since: the missed TALKs, then the REPLAY marker, then live."""
    world = World()
    a, sa = world.stomp()
    send(sa, "SUBSCRIBE", destination="/topic/a", id="0")
    since = a.take()[0].get("message-id")
    send(sa, "SEND", b"one", destination="/app/chat/a")
    send(sa, "SEND", b"two", destination="/app/chat/a")
    b, sb = world.stomp(BOB)
    send(sb, "SUBSCRIBE", destination="/topic/a", id="x", since=since)
    got = [body(f) for f in b.take()]
    assert [(e["type"], e.get("message")) for e in got] == [
        ("TALK", "one"), ("TALK", "two"), ("REPLAY", None), ("ENTER", "Bob entered"),
    ]
    assert got[2] == {"type": "REPLAY", "roomId": "a", "count": 2, "complete": True}


def test_disconnect():
    """DISCONNECT quits every room, answers its receipt, and closes normally."""
    world = World()
    a, sa = world.stomp()
    b, sb = world.stomp(BOB)
    for room in ("r1", "r2"):
        send(sa, "SUBSCRIBE", destination="/topic/" + room, id=room)
    send(sb, "SUBSCRIBE", destination="/topic/r1", id="0")
    a.take(), b.take()
    send(sa, "DISCONNECT", receipt="bye")
    assert [(f.command, f.get("receipt-id")) for f in a.take()] == [("RECEIPT", "bye")]
    assert a.closes == [(1000, "disconnected")]
    assert [body(f)["type"] for f in b.take()] == ["QUIT"]
    assert world.hub.rooms_of(a.connection_id) == frozenset()
    assert sa.closed().called


def test_closed_quits_every_room():
    """The WebSocket closing quits the rooms; a close before CONNECT is fine too."""
    world = World()
    a, sa = world.stomp()
    send(sa, "SUBSCRIBE", destination="/topic/r1", id="0")
    d = sa.closed()
    assert d.called and world.hub.rooms_of(a.connection_id) == frozenset()
    _, early = world.stomp(connect=False)
    assert early.closed().called


def test_one_frame_for_every_subscriber_alike():
    """Subscribers with the same destination and id get the very same bytes for an event."""
    world = World()
    conns = [world.stomp(p) for p in (ALICE, BOB)]
    for _, s in conns:
        send(s, "SUBSCRIBE", destination="/topic/a", id="sub-0")
    js, j = world.json(CAROL)
    j.received(json.dumps({"type": "ENTER", "room": "lobby"}))
    for c, _ in conns:
        c.raw.clear()
    j.received(json.dumps({"type": "QUIT", "room": "lobby"}))
    jc, jj = world.json(Principal(sub="dan", name="Dan", exp=EXP))
    jj.received(json.dumps({"type": "ENTER", "room": "a"}))
    (a, _), (b, _) = conns
    assert a.raw[-1] is b.raw[-1]
    assert body(a.take()[-1])["sender"] == "Dan"


def test_a_shared_frame_reaches_only_its_room():
    """
    A member whose one subscription's frame of an event is already made
    gets it at once; a member handed an event of a room it has no
    subscription for (a seat not yet gone after UNSUBSCRIBE) gets nothing,
    though the frames of both rooms are alike but for the destination.
    """
    world = World()
    a, sa = world.stomp(ALICE)
    b, sb = world.stomp(BOB)
    send(sa, "SUBSCRIBE", destination="/topic/a", id="sub-0")
    send(sb, "SUBSCRIBE", destination="/topic/b", id="sub-0")
    _, talker = world.json(Principal(sub="dan", name="Dan", exp=EXP))
    talker.received(json.dumps({"type": "ENTER", "room": "a"}))
    [message] = a.take()[-1:]
    assert message.get("destination") == "/topic/a" and body(message)["sender"] == "Dan"
    text = world.event_frames.text  # the event the hub shared: room a
    b.take()
    sb._side.send_shared(text)  # as the hub would, for a seat in room a
    assert b.raw[-1:] != [a.raw[-1]] and b.take() == []
    sa._side.send_shared(text)  # the same event again: the same bytes object
    assert a.raw[-1] is a.raw[-2]


def test_a_closing_member_gets_no_shared_frame():
    """
    After its ERROR, a member whose seat is still in the room (the WebSocket
    not yet gone) gets none of the frames the others alike get.
    """
    world = World()
    a, sa = subscribed(world, ALICE)
    b, sb = subscribed(world, BOB)
    send(sb, "ACK", id="1")  # refused: ERROR, close
    assert [f.command for f in b.take()] == ["ERROR"] and len(b.closes) == 1
    _, talker = world.json(Principal(sub="dan", name="Dan", exp=EXP))
    talker.received(json.dumps({"type": "ENTER", "room": "lobby"}))
    talker.received(json.dumps({"type": "TALK", "room": "lobby", "message": "hi"}))
    assert [body(f)["type"] for f in a.take()[-2:]] == ["ENTER", "TALK"]
    assert b.take() == []


def test_slots_go_with_their_subscriptions():
    """A subscription's slot is shared while subscribed and let go once nobody holds its key."""
    world = World()
    a, sa = world.stomp(ALICE)
    b, sb = world.stomp(BOB)
    for session in (sa, sb):
        send(session, "SUBSCRIBE", destination="/topic/lobby", id="mine")
    key = ("/topic/lobby", b"mine", "1.2", "plain")  # EventFrames.key: the id as the frame carries it
    assert sa._slots["lobby"] is sb._slots["lobby"] is world.event_frames.slot(key)
    for session in (sa, sb):
        send(session, "UNSUBSCRIBE", id="mine")
    c, sc = world.stomp(CAROL)
    send(sc, "SUBSCRIBE", destination="/topic/lobby", id="sub-0")
    _, talker = world.json()
    talker.received(json.dumps({"type": "ENTER", "room": "lobby"}))  # the next event lets the last one's frames go
    assert body(c.take()[-1])["sender"] == "Bob"
    gc.collect()
    assert key not in world.event_frames._slots


def test_frames_per_subscription_id_and_version():
    """
    In one room, each subscription id and version gets a MESSAGE of its own
    (escaped as its version says), subscribers alike share one, and a new
    subscription's id is used from its first event on.
    """
    world = World()
    people = [Principal(sub=name, name=name.title(), exp=EXP) for name in ("ann", "ben", "cy", "di", "ed")]
    a, sa = world.stomp(people[0])
    b, sb = world.stomp(people[1])
    c, sc = world.stomp(people[2])
    d, sd = world.stomp(people[3], accept_version="1.1")
    e, se = world.stomp(people[4], accept_version="1.0")
    for session, sub_id in ((sa, "sub-0"), (sb, "sub-0"), (sc, "x:y"), (sd, "sub-0")):
        send(session, "SUBSCRIBE", destination="/topic/a", id=sub_id)
    send(se, "SUBSCRIBE", destination="/topic/a")  # 1.0: no id, the destination names it
    _, talker = world.json()
    talker.received(json.dumps({"type": "ENTER", "room": "a"}))
    for connection in (a, b, c, d, e):
        connection.raw.clear()
    talker.received(json.dumps({"type": "TALK", "room": "a", "message": "hi"}))
    assert a.raw[-1] is b.raw[-1]
    assert len({id(connection.raw[-1]) for connection in (a, c, d, e)}) == 4
    for connection, version, sub_id in (
        (a, "1.2", "sub-0"), (c, "1.2", "x:y"), (d, "1.1", "sub-0"), (e, "1.0", "/topic/a"),
    ):
        [message] = FrameParser(1 << 20, version).feed(connection.raw[-1])
        assert message.get("subscription") == sub_id and body(message)["message"] == "hi"
    assert b"\nsubscription:x\\cy\n" in c.raw[-1]
    send(sa, "UNSUBSCRIBE", id="sub-0")
    send(sa, "SUBSCRIBE", destination="/topic/a", id="again")
    talker.received(json.dumps({"type": "TALK", "room": "a", "message": "and again"}))
    [message] = FrameParser(1 << 20).feed(a.raw[-1])
    assert message.get("subscription") == "again" and body(message)["message"] == "and again"
    assert b.raw[-1] is not a.raw[-1] and b"subscription:sub-0\n" in b.raw[-1]


# --- SEND ----------------------------------------------------------------------


def test_send_with_jwt_header_renews():
    """A SEND carrying a valid JWT is accepted (it renews the token)."""
    world = World(tokens={"fresh": Principal(sub="alice", name="A2", exp=EXP + 500)})
    connection, session = world.stomp()
    send(session, "SUBSCRIBE", destination="/topic/a", id="0")
    send(session, "SEND", b"hi", destination="/app/chat/a", Authorization="Bearer fresh", receipt="r")
    assert [f.command for f in connection.take()] == ["MESSAGE", "MESSAGE", "RECEIPT"]
    world.clock.advance(EXP - START + 1)
    assert connection.closes == []  # the old exp passed; the new one holds


def test_auth_destination():
    """SEND /app/auth with a valid JWT: RECEIPT; the expiry moves."""
    world = World(tokens={"fresh": Principal(sub="alice", name="Alice", exp=EXP + 500)})
    connection, session = world.stomp()
    send(session, "SEND", destination="/app/auth", Authorization="Bearer fresh", receipt="a")
    assert [(f.command, f.get("receipt-id")) for f in connection.take()] == [("RECEIPT", "a")]
    world.clock.advance(EXP - START + 1)
    assert connection.closes == []
    world.clock.advance(500)
    assert_error(connection, "unauthorized", "token expired", close=errors.CLOSE_TOKEN_EXPIRED)


def test_expiry_is_error_then_4001():
    """The token's exp passing: ERROR unauthorized, then close 4001."""
    world = World()
    connection, _ = world.stomp()
    world.clock.advance(EXP - START)
    assert_error(connection, "unauthorized", "token expired", close=errors.CLOSE_TOKEN_EXPIRED)


def test_sessions_on_the_factorys_expiries_share_its_clock_call():
    """
    STOMP sessions given the factory's Expiries (as chatd.stomp.transport
    gives them) put their token expiry on it, as chatd.v1 sessions do: one
    clock call for three sessions of one exp, where sessions of their own
    make three; each is closed 4001 when it passes.
    """
    calls = {}
    for shared in (False, True):
        world = World()
        expiries = Expiries(world.clock) if shared else None
        connections = [world.stomp(expiries=expiries)[0] for _ in range(3)]
        calls[shared] = len(world.clock.getDelayedCalls())
        world.clock.advance(EXP - START)
        for connection in connections:
            assert_error(connection, "unauthorized", "token expired", close=errors.CLOSE_TOKEN_EXPIRED)
    assert calls[False] - calls[True] == 2


# --- refusals --------------------------------------------------------------------


def subscribed(world, principal=ALICE):
    connection, session = world.stomp(principal)
    send(session, "SUBSCRIBE", destination="/topic/lobby", id="0")
    connection.take()
    return connection, session


@pytest.mark.parametrize(
    "command,body,headers,code,why",
    [
        ("SUBSCRIBE", b"", {"destination": "/topic/lobby", "id": "1"}, "bad_request", "already subscribed to lobby as '0'"),
        ("SUBSCRIBE", b"", {"destination": "/topic/other", "id": "0"}, "bad_request", "subscription id '0' is in use"),
        ("SUBSCRIBE", b"", {"id": "1"}, "bad_request", "SUBSCRIBE needs a destination"),
        ("SUBSCRIBE", b"", {"destination": "/topic/secret", "id": "1"}, "forbidden", "your token does not allow secret"),
        ("UNSUBSCRIBE", b"", {"id": "9"}, "not_member", "no subscription '9'"),
        ("SEND", b"x", {"destination": "/app/chat/elsewhere"}, "not_member", "subscribe to elsewhere before sending"),
        ("SEND", b"x", {"destination": "/topic/lobby"}, "forbidden", "is a topic"),
        ("SEND", b"x", {}, "bad_request", "SEND needs a destination"),
        ("SEND", b"x", {"destination": "/app/chat/lobby", "Authorization": "Bearer forged"}, "unauthorized", "bad signature"),
        ("SEND", b"", {"destination": "/app/auth", "passcode": "forged"}, "unauthorized", "bad signature"),
        ("ACK", b"", {"id": "1"}, "bad_request", "ACK is not supported"),
        ("BEGIN", b"", {"transaction": "t"}, "bad_request", "BEGIN is not supported"),
        ("MESSAGE", b"", {}, "bad_request", "MESSAGE is a server frame"),
        ("CONNECT", b"", {}, "bad_request", "already connected"),
    ],
)
def test_refusals(command, body, headers, code, why):
    """Each bad frame: ERROR naming the problem with the receipt-id, then close; nothing half-done."""
    world = World()
    connection, session = subscribed(world, CAROL)
    send(session, command, body, receipt="r", **headers)
    assert_error(connection, code, why, receipt="r")
    assert world.hub.rooms_of(connection.connection_id) <= {"lobby"}


def test_malformed_frame():
    """A frame that cannot be read: ERROR bad_request, close; the frames before it were handled."""
    world = World()
    connection, session = world.stomp()
    session.received(b"SUBSCRIBE\ndestination:/topic/a\nid:0\n\n\0NONSENSE\n\n\0")
    before = assert_error(connection, "bad_request", "unknown command 'NONSENSE'")
    assert [body(f)["type"] for f in before] == ["ENTER"]


def test_frame_too_large_is_1009():
    """A frame over [limits] max_message_bytes, even split over messages: ERROR too_large, close 1009."""
    world = World(limits__max_message_bytes=1000)
    connection, session = world.stomp()
    session.received(b"SEND\ndestination:/app/chat/a\n\n" + b"x" * 600)
    assert connection.closes == []
    session.received(b"x" * 600)
    assert_error(connection, "too_large", "at most 1000 bytes", close=errors.CLOSE_MESSAGE_TOO_BIG)


def test_rate_limit_is_error_then_1008():
    """Frames beyond the burst: ERROR rate_limited, close 1008; the ones within were handled."""
    world = World(limits__burst=3, limits__rate=1.0)
    connection, session = world.stomp()  # CONNECT took one token
    one = frames.encode(Frame("SEND", (("destination", "/pub/chat/message"), ("receipt", "r")),
                              b'{"type":"ENTER","roomId":"a"}'))
    session.received(one * 4)
    before = assert_error(connection, "rate_limited", "slow down", close=errors.CLOSE_POLICY_VIOLATION)
    assert [f.command for f in before] == ["RECEIPT", "RECEIPT"]


def test_broker_unavailable_is_error_unavailable():
    """A TALK the broker cannot take: ERROR unavailable (chatd.v1's table), close."""
    world = World()
    connection, session = subscribed(world)
    world.broker.down.add("talk")
    send(session, "SEND", b"x", destination="/app/chat/lobby", receipt="t")
    assert_error(connection, "unavailable", "chat is unavailable", receipt="t")


def test_nothing_after_the_error():
    """After ERROR and close, later frames and events are not answered."""
    world = World()
    connection, session = subscribed(world)
    send(session, "ACK", id="1")
    connection.take()
    send(session, "SEND", b"x", destination="/app/chat/lobby", receipt="late")
    js, j = world.json()
    j.received(json.dumps({"type": "ENTER", "room": "lobby"}))
    assert connection.take() == [] and len(connection.closes) == 1


# --- heart-beats -----------------------------------------------------------------


def test_server_heart_beats():
    """With heart-beat 0,15000 chatd sends an EOL every 15 s, whatever else it sent."""
    world = World()
    connection, session = world.stomp(heart_beat="0,15000")
    connection.raw.clear()
    world.clock.advance(15)
    assert connection.raw == [b"\n"]
    world.clock.advance(14)
    send(session, "SUBSCRIBE", destination="/topic/a", id="0")
    connection.raw.clear()
    world.clock.advance(1)
    assert connection.raw == [b"\n"]


def test_silent_client_is_closed_after_twice_its_interval():
    """heart-beat 5000,0: the client must send every 10 s (chatd's floor); silent for 20 s, it is closed."""
    world = World()
    connection, session = world.stomp(heart_beat="5000,0")
    world.clock.advance(15)
    session.received(b"\n")  # a heart-beat keeps it
    world.clock.advance(19)
    assert connection.closes == []
    world.clock.advance(1)
    assert connection.closes == [(1000, "no heart-beat")]


def test_no_heart_beats_when_none_asked():
    """heart-beat 0,0: no EOLs sent, no silence closes."""
    world = World()
    connection, _ = world.stomp(heart_beat="0,0")
    connection.raw.clear()
    world.clock.advance(EXP - START - 1)
    assert connection.raw == [] and connection.closes == []
