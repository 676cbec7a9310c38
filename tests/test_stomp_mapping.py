# -*- test-case-name: tests.test_stomp_mapping -*-
"""
chatd.stomp.mapping: STOMP destinations and Spring-style bodies become the
room commands chatd.v1 has, refused where chatd.v1 would refuse them (same
codes), and room events become the MESSAGE body the seed clients read.
"""

import json

import pytest

from chatd import config, errors, messages
from chatd.errors import ProtocolError
from chatd.stomp import mapping
from chatd.stomp.frames import Frame
from chatd.stomp.mapping import Presence, Subscribe, Subscriptions

ROUTES = mapping.Routes.from_settings(config.defaults().stomp)
MAX_TALK = 50


def frame(command, body=b"", **headers):
    """A frame; header names use _ for -."""
    return Frame(command, tuple((k.replace("_", "-"), v) for k, v in headers.items()), body)


def sent(destination, body, **headers):
    """What SEND to C{destination} with C{body} (a dict is sent as JSON) maps to."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode("utf-8")
    return mapping.send(frame("SEND", body, destination=destination, **headers), ROUTES, MAX_TALK)


def refused(call, *args):
    """The ProtocolError C{call(*args)} raises."""
    with pytest.raises(ProtocolError) as info:
        call(*args)
    return info.value


# --- SUBSCRIBE / UNSUBSCRIBE -------------------------------------------------


@pytest.mark.parametrize("prefix", ["/sub/chat/room/", "/topic/"])
def test_subscribe_to_a_room_topic(prefix):
    """SUBSCRIBE to <prefix><room> under every subscribe prefix is ENTER of room."""
    got = mapping.subscribe(frame("SUBSCRIBE", id="sub-0", destination=prefix + "lobby"), ROUTES)
    assert got == Subscribe("sub-0", prefix + "lobby", "lobby", None)


def test_subscribe_with_since():
    """A since header is ENTER with since, checked like chatd.v1's."""
    got = mapping.subscribe(frame("SUBSCRIBE", id="1", destination="/topic/a", since="12-3"), ROUTES)
    assert got.since == "12-3"
    assert mapping.subscribe(frame("SUBSCRIBE", id="1", destination="/topic/a", since=""), ROUTES).since is None


def test_subscribe_10_without_id_uses_the_destination():
    """STOMP 1.0 makes the id optional: the destination is the subscription then."""
    got = mapping.subscribe(frame("SUBSCRIBE", destination="/topic/a"), ROUTES)
    assert got.id == "/topic/a"


def test_subscribe_ack_auto_is_fine():
    """ack:auto (what every chat client sends, or nothing) is accepted."""
    assert mapping.subscribe(frame("SUBSCRIBE", id="1", destination="/topic/a", ack="auto"), ROUTES).room == "a"


@pytest.mark.parametrize(
    "headers,code,why",
    [
        ({}, errors.BAD_REQUEST, "SUBSCRIBE needs a destination header"),
        ({"destination": ""}, errors.BAD_REQUEST, "needs a destination"),
        ({"destination": "/queue/a"}, errors.BAD_REQUEST, "no such topic '/queue/a': subscribe to one of /sub/chat/room/ROOM /topic/ROOM"),
        ({"destination": "/topic/"}, errors.BAD_REQUEST, "names no room"),
        ({"destination": "/topic/a/b"}, errors.BAD_REQUEST, "names no room"),
        ({"destination": "/topic/" + "a" * 65}, errors.BAD_REQUEST, "1-64 of"),
        ({"destination": "/topic/a", "since": "yesterday"}, errors.BAD_REQUEST, "since must be an event id"),
        ({"destination": "/topic/a", "ack": "client"}, errors.BAD_REQUEST, "ack:'client' is not supported"),
        ({"destination": "/topic/a", "ack": "client-individual"}, errors.BAD_REQUEST, "not supported"),
    ],
)
def test_subscribe_refusals(headers, code, why):
    """Each bad SUBSCRIBE names its problem."""
    error = refused(mapping.subscribe, frame("SUBSCRIBE", id="1", **headers), ROUTES)
    assert (error.code, why in error.message) == (code, True), error.message


def test_unsubscribe():
    """UNSUBSCRIBE names the subscription by id (1.0: or by destination)."""
    assert mapping.unsubscribe(frame("UNSUBSCRIBE", id="sub-0")) == "sub-0"
    assert mapping.unsubscribe(frame("UNSUBSCRIBE", destination="/topic/a")) == "/topic/a"
    assert "needs an id" in refused(mapping.unsubscribe, frame("UNSUBSCRIBE")).message


# --- SEND --------------------------------------------------------------------


def test_send_talk_as_spring_clients_do():
    """The seed clients' ChatMessage to send_destination is TALK; sender in the body is ignored."""
    got = sent("/pub/chat/message", {"type": "TALK", "roomId": "r1", "sender": "mallory", "message": "hi"})
    assert got == messages.Talk(room="r1", message="hi")


def test_send_talk_with_cid_in_body_or_header():
    """cid comes from the body, else from a cid header, as in chatd.v1."""
    body = {"type": "TALK", "roomId": "r1", "message": "hi"}
    assert sent("/pub/chat/message", dict(body, cid="c1"), cid="c2").cid == "c1"
    assert sent("/pub/chat/message", body, cid="c2").cid == "c2"


def test_send_numeric_room_id():
    """A JPA-style numeric roomId is the room of that name."""
    assert sent("/pub/chat/message", {"type": "TALK", "roomId": 42, "message": "x"}).room == "42"


@pytest.mark.parametrize("kind", ["ENTER", "QUIT"])
def test_send_enter_or_quit_does_nothing_more(kind):
    """ENTER/QUIT bodies (sent around SUBSCRIBE/UNSUBSCRIBE) are accepted as presence no-ops."""
    got = sent("/pub/chat/message", {"type": kind, "roomId": "r1", "sender": "ann", "message": ""})
    assert got == Presence(kind, "r1")


@pytest.mark.parametrize("prefix", ["/app/chat/", "/pub/chat/room/"])
def test_send_to_app_prefix(prefix):
    """SEND to <app prefix><room> with {"message": M} or plain text is TALK in room."""
    assert sent(prefix + "lobby", {"message": "hello"}) == messages.Talk(room="lobby", message="hello")
    assert sent(prefix + "lobby", "plain words") == messages.Talk(room="lobby", message="plain words")
    assert sent(prefix + "lobby", "42", cid="c") == messages.Talk(room="lobby", message="42", cid="c")
    assert sent(prefix + "lobby", {"type": "ENTER"}) == Presence("ENTER", "lobby")


def test_send_auth():
    """SEND to /app/auth is AUTH with the frame's JWT, whichever header carries it."""
    assert sent("/app/auth", "", Authorization="Bearer abc.def.ghi") == messages.Auth(token="abc.def.ghi")
    assert sent("/app/auth", "", passcode="abc.def.ghi") == messages.Auth(token="abc.def.ghi")


@pytest.mark.parametrize(
    "destination,body,headers,code,why",
    [
        (None, "x", {}, errors.BAD_REQUEST, "SEND needs a destination header"),
        ("/topic/lobby", "x", {}, errors.FORBIDDEN, "'/topic/lobby' is a topic"),
        ("/sub/chat/room/a", "x", {}, errors.FORBIDDEN, "is a topic"),
        ("/queue/x", "x", {}, errors.BAD_REQUEST, "no such destination '/queue/x'"),
        ("/app/chat/", "x", {}, errors.BAD_REQUEST, "names no room"),
        ("/app/chat/a", b"\xff", {}, errors.BAD_REQUEST, "must be UTF-8"),
        ("/app/chat/a", "", {}, errors.BAD_REQUEST, "message must be a non-empty string"),
        ("/app/chat/a", {"note": "x"}, {}, errors.BAD_REQUEST, "message must be a non-empty string"),
        ("/app/chat/a", {"type": "SHOUT"}, {}, errors.BAD_REQUEST, "type must be TALK, ENTER or QUIT"),
        ("/app/chat/a", "x" * (MAX_TALK + 1), {}, errors.TOO_LARGE, f"longer than {MAX_TALK}"),
        ("/app/chat/a", "x", {"cid": "c" * 65}, errors.BAD_REQUEST, "cid must be"),
        ("/pub/chat/message", "hello", {}, errors.BAD_REQUEST, "takes a JSON object"),
        ("/pub/chat/message", "[1]", {}, errors.BAD_REQUEST, "takes a JSON object"),
        ("/pub/chat/message", {"type": "TALK", "message": "x"}, {}, errors.BAD_REQUEST, "roomId must be a string"),
        ("/pub/chat/message", {"type": "TALK", "roomId": True, "message": "x"}, {}, errors.BAD_REQUEST, "roomId must be"),
        ("/pub/chat/message", {"type": "TALK", "roomId": "a b", "message": "x"}, {}, errors.BAD_REQUEST, "room names are 1-64"),
        ("/pub/chat/message", {"type": "ENTER", "roomId": "a/b"}, {}, errors.BAD_REQUEST, "room names are 1-64"),
        ("/pub/chat/message", {"type": "TALK", "roomId": "a", "message": 5}, {}, errors.BAD_REQUEST, "message must be"),
        ("/pub/chat/message", {"type": "TALK", "roomId": "a", "message": "\ud800"}, {}, errors.BAD_REQUEST, "valid Unicode"),
        ("/pub/chat/message", {"type": "AUTH", "roomId": "a"}, {}, errors.BAD_REQUEST, "type must be TALK, ENTER or QUIT"),
        ("/app/auth", "", {}, errors.UNAUTHORIZED, "needs Authorization: Bearer <JWT>"),
        ("/app/auth", "", {"Authorization": "Basic dXNlcjpwYXNz"}, errors.UNAUTHORIZED, "Authorization must be Bearer"),
    ],
)
def test_send_refusals(destination, body, headers, code, why):
    """Each bad SEND is refused with chatd.v1's code for the same mistake, naming it."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode("utf-8")
    if destination is not None:
        headers = dict(headers, destination=destination)
    error = refused(mapping.send, frame("SEND", body, **headers), ROUTES, MAX_TALK)
    assert error.code == code and why in error.message, error.message


@pytest.mark.parametrize(
    "headers,jwt",
    [
        ({}, None),
        ({"Authorization": "Bearer a.b.c"}, "a.b.c"),
        ({"authorization": "bearer  a.b.c "}, "a.b.c"),
        ({"token": "a.b.c"}, "a.b.c"),
        ({"passcode": "a.b.c", "login": "ann"}, "a.b.c"),
        ({"passcode": ""}, None),
    ],
)
def test_token(headers, jwt):
    """The JWT of a CONNECT: Authorization Bearer, token or passcode."""
    assert mapping.token(frame("CONNECT", **headers)) == jwt


# --- subscriptions -----------------------------------------------------------


def test_subscriptions_one_per_room_and_id():
    """A second SUBSCRIBE to a room, or a reused id, is refused; remove gives the room back."""
    table = Subscriptions()
    table.add(Subscribe("s1", "/topic/a", "a"))
    assert "already subscribed to a as 's1'" in refused(table.add, Subscribe("s2", "/sub/chat/room/a", "a")).message
    assert "subscription id 's1' is in use" in refused(table.add, Subscribe("s1", "/topic/b", "b")).message
    table.add(Subscribe("s2", "/topic/b", "b"))
    assert len(table) == 2 and table.of_room("b").id == "s2"
    assert table.remove("s1").room == "a"
    assert table.of_room("a") is None and [s.id for s in table] == ["s2"]
    error = refused(table.remove, "s1")
    assert error.code == errors.NOT_MEMBER and "no subscription 's1'" in error.message
    table.add(Subscribe("s1", "/topic/a", "a"))  # free again


# --- bodies ------------------------------------------------------------------


def test_event_body_is_the_seed_clients_shape():
    """A RoomEvent as MESSAGE body: type, roomId, sender, message, userCount, id, ts."""
    event = messages.RoomEvent("TALK", "7-2", "lobby", "Ann", "hi \u00e9", 3, 1700000000000)
    body = json.loads(mapping.event_body(event))
    assert body == {
        "type": "TALK", "roomId": "lobby", "sender": "Ann", "message": "hi \u00e9",
        "userCount": 3, "id": "7-2", "ts": 1700000000000,
    }
    assert "\u00e9" in mapping.event_body(event)  # compact: not \\u-escaped
    system = messages.RoomEvent("TALK", "7-3", "lobby", "ops", "maintenance", 3, 1, system=True)
    assert json.loads(mapping.event_body(system))["system"] is True


def test_replay_body():
    """The REPLAY marker after a since-replay, before live events."""
    assert json.loads(mapping.replay_body("lobby", 2, True)) == {
        "type": "REPLAY", "roomId": "lobby", "count": 2, "complete": True,
    }
