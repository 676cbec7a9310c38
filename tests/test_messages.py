# -*- test-case-name: tests.test_messages -*-
"""
chatd.messages: every rule docs/protocol.md states about client frames, and
the server frames' exact encoding.
"""

import dataclasses
import json

import pytest

from chatd import errors, messages
from chatd.errors import ProtocolError
from chatd.messages import Auth, Enter, Quit, RoomEvent, Talk, event_id_key, parse_client_message

LIMIT = 10


def parse(frame, limit=LIMIT):
    return parse_client_message(frame if isinstance(frame, str) else json.dumps(frame), limit)


def refusal(frame, limit=LIMIT):
    with pytest.raises(ProtocolError) as info:
        parse(frame, limit)
    return info.value


# --- the four commands ---------------------------------------------------------------


def test_enter():
    """ENTER needs a room; since and ref are optional."""
    assert parse({"type": "ENTER", "room": "lobby"}) == Enter("lobby")
    assert parse({"type": "ENTER", "room": "lobby", "since": "17-3", "ref": 4}) == Enter(
        "lobby", since="17-3", ref=4
    )


def test_talk():
    """TALK needs a room and a message; cid and ref are optional."""
    assert parse({"type": "TALK", "room": "a", "message": "hi"}) == Talk("a", "hi")
    assert parse({"type": "TALK", "room": "a", "message": "hi", "cid": "c1", "ref": "r"}) == Talk(
        "a", "hi", cid="c1", ref="r"
    )


def test_quit():
    """QUIT needs a room."""
    assert parse({"type": "QUIT", "room": "a.b-c_d", "ref": "x"}) == Quit("a.b-c_d", ref="x")


def test_auth():
    """AUTH carries a token string."""
    assert parse({"type": "AUTH", "token": "eyJ.x.y"}) == Auth("eyJ.x.y")


def test_unknown_fields_ignored():
    """A client-sent sender (or anything else unlisted) has no effect."""
    talk = parse({"type": "TALK", "room": "a", "message": "hi", "sender": "mallory", "x": [1]})
    assert talk == Talk("a", "hi")
    assert not hasattr(talk, "sender")


# --- the frame as a whole ----------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["", "not json", "{\"type\": \"TALK\"", "[]", "\"TALK\"", "42", "null", "[" * 100000]
)
def test_not_an_object(text):
    """Anything but one JSON object is bad_request, deep nesting included."""
    error = refusal(text)
    assert (error.code, error.ref) == (errors.BAD_REQUEST, None)
    assert error.message == "a frame is one JSON object"


@pytest.mark.parametrize("kind", [None, 1, ["ENTER"]])
def test_type_not_a_string(kind):
    """A missing or non-string type is bad_request, echoing ref."""
    frame = {"room": "a", "ref": "r1"}
    if kind is not None:
        frame["type"] = kind
    error = refusal(frame)
    assert (error.code, error.message, error.ref) == (errors.BAD_REQUEST, "type must be a string", "r1")


@pytest.mark.parametrize("kind", ["talk", "JOIN", "", "WELCOME"])
def test_unknown_type(kind):
    """Types are exact and case-sensitive."""
    error = refusal({"type": kind, "room": "a", "ref": 9})
    assert (error.code, error.ref) == (errors.BAD_REQUEST, 9)
    assert "ENTER, TALK, QUIT or AUTH" in error.message


# --- ref ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["", "x" * 128, 0, -5, 2**53 - 1, -(2**53) + 1])
def test_ref_accepted(ref):
    """ref is a string of up to 128 characters or an integer within JSON's safe range."""
    assert parse({"type": "QUIT", "room": "a", "ref": ref}).ref == ref


@pytest.mark.parametrize("ref", [True, False, 1.5, [1], {"a": 1}, "x" * 129, 2**53, -(2**53)])
def test_ref_refused(ref):
    """A bad ref is bad_request, and being bad it is not echoed."""
    error = refusal({"type": "QUIT", "room": "a", "ref": ref})
    assert (error.code, error.ref) == (errors.BAD_REQUEST, None)
    assert "ref" in error.message


def test_ref_echoed_in_every_field_error():
    """Errors about a field carry the frame's ref."""
    for frame in (
        {"type": "ENTER", "room": "bad room"},
        {"type": "ENTER", "room": "a", "since": "x"},
        {"type": "TALK", "room": "a"},
        {"type": "TALK", "room": "a", "message": "m", "cid": ""},
        {"type": "QUIT"},
        {"type": "AUTH"},
    ):
        assert refusal(dict(frame, ref="R")).ref == "R", frame


# --- rooms ---------------------------------------------------------------------------------


@pytest.mark.parametrize("room", ["a", "A-z_0.9", "x" * 64, "...", "-"])
def test_room_names_accepted(room):
    """1-64 of ASCII letters, digits, _, - and ."""
    assert parse({"type": "ENTER", "room": room}).room == room
    assert messages.is_room_name(room)


@pytest.mark.parametrize(
    "room",
    ["", "x" * 65, "with space", "café", "комната", "日本", "a/b", "a\n", "lobby\u200b",
     "١٢٣", "a:b"],
)
def test_room_names_refused(room):
    """Unicode letters and digits, spaces, separators and over-long names are refused."""
    error = refusal({"type": "TALK", "room": room, "message": "m", "ref": 1})
    assert (error.code, error.ref) == (errors.BAD_REQUEST, 1)
    assert "room names are" in error.message
    assert not messages.is_room_name(room)


@pytest.mark.parametrize("room", [None, 5, ["a"], {"a": 1}])
def test_room_must_be_a_string(room):
    """A missing or non-string room is bad_request."""
    frame = {"type": "QUIT"}
    if room is not None:
        frame["room"] = room
    assert refusal(frame).message == "room must be a string"
    assert not messages.is_room_name(room)


# --- TALK ---------------------------------------------------------------------------------


@pytest.mark.parametrize("message", [None, "", 5, ["hi"]])
def test_talk_message_required(message):
    """message must be a non-empty string."""
    frame = {"type": "TALK", "room": "a"}
    if message is not None:
        frame["message"] = message
    error = refusal(frame)
    assert (error.code, error.message) == (errors.BAD_REQUEST, "message must be a non-empty string")


def test_talk_length_limit():
    """max_talk_chars counts characters (not bytes): at it fine, over it too_large with ref."""
    assert parse({"type": "TALK", "room": "a", "message": "é" * LIMIT}).message == "é" * LIMIT
    error = refusal({"type": "TALK", "room": "a", "message": "x" * (LIMIT + 1), "ref": "big"})
    assert (error.code, error.ref) == (errors.TOO_LARGE, "big")
    assert str(LIMIT) in error.message


def test_too_large_only_for_well_formed_talk():
    """An over-long message in a frame with a bad room is bad_request, not too_large."""
    error = refusal({"type": "TALK", "room": "no room", "message": "x" * (LIMIT + 1)})
    assert error.code == errors.BAD_REQUEST


def test_talk_keeps_text_exactly():
    """Braces, quotes, newlines and non-ASCII text pass through untouched."""
    text = 'a {b} "c"\n\U0001f600'
    assert parse({"type": "TALK", "room": "a", "message": text}, 100).message == text


@pytest.mark.parametrize("cid", ["", "x" * 65, 5, ["c"], True])
def test_cid_refused(cid):
    """cid is 1-64 characters when present."""
    error = refusal({"type": "TALK", "room": "a", "message": "m", "cid": cid})
    assert error.code == errors.BAD_REQUEST and "cid" in error.message


def test_cid_accepted():
    """cid of 1 and of 64 characters; null means none."""
    assert parse({"type": "TALK", "room": "a", "message": "m", "cid": "x" * 64}).cid == "x" * 64
    assert parse({"type": "TALK", "room": "a", "message": "m", "cid": "1"}).cid == "1"
    assert parse({"type": "TALK", "room": "a", "message": "m", "cid": None}).cid is None


# --- ENTER since -----------------------------------------------------------------------------


@pytest.mark.parametrize("since", ["0", "17", "1732147200123-7", "1-2-3-4", "9" * 20])
def test_since_accepted(since):
    """since is an event id: decimal parts joined by -."""
    assert parse({"type": "ENTER", "room": "a", "since": since}).since == since


@pytest.mark.parametrize(
    "since", ["", "x", "1-", "-1", "1--2", "1-2-3-4-5", "9" * 21, "1.5", " 1", "1\n", "١٢", 17, [1]]
)
def test_since_refused(since):
    """Anything else, an integer included, is bad_request."""
    error = refusal({"type": "ENTER", "room": "a", "since": since, "ref": "s"})
    assert (error.code, error.ref) == (errors.BAD_REQUEST, "s")
    assert "since" in error.message


# --- AUTH -------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, "", 5, "x" * (messages.MAX_TOKEN_CHARS + 1)])
def test_auth_token_refused(token):
    """token must be a non-empty string of bounded length."""
    frame = {"type": "AUTH"}
    if token is not None:
        frame["token"] = token
    assert refusal(frame).code == errors.BAD_REQUEST


# --- event ids -------------------------------------------------------------------------------


def test_event_id_key_orders_numerically():
    """Ids compare part by part as integers, never as strings."""
    ids = ["1-10", "1-9", "2-1", "10-0", "1-9-1", "1"]
    assert sorted(ids, key=event_id_key) == ["1", "1-9", "1-9-1", "1-10", "2-1", "10-0"]
    assert event_id_key("1732147200123-7") == (1732147200123, 7)
    assert sorted(["9", "10"]) == ["10", "9"]  # what string order would get wrong


@pytest.mark.parametrize("bad", ["", "a-1", None, 3, "1-2-3-4-5"])
def test_event_id_key_refuses(bad):
    """Anything that is not an id raises ValueError."""
    with pytest.raises(ValueError):
        event_id_key(bad)


# --- encoding --------------------------------------------------------------------------------


EVENT = RoomEvent(type="TALK", id="5-2", room="lobby", sender="Zoë", message="hi {x}",
                  user_count=2, ts=1732147200123)


def test_event_encoding():
    """A room event encodes compactly with its wire names; the actor's copy adds ref."""
    assert messages.event(EVENT) == (
        '{"type":"TALK","id":"5-2","room":"lobby","sender":"Zoë","message":"hi {x}",'
        '"userCount":2,"ts":1732147200123}'
    )
    assert json.loads(messages.event(EVENT, ref=0))["ref"] == 0
    assert "ref" not in json.loads(messages.event(EVENT))


def test_event_wire_round_trip():
    """from_wire inverts to_wire, ignoring ref."""
    assert RoomEvent.from_wire(EVENT.to_wire(ref="r")) == EVENT


def test_system_event_says_so():
    """A TALK posted through the server API carries "system": true; others carry no such key."""
    system = EVENT._replace(sender="system", system=True)
    assert json.loads(messages.event(system))["system"] is True
    assert "system" not in EVENT.to_wire()
    assert RoomEvent.from_wire(system.to_wire()) == system
    assert RoomEvent.from_wire(dict(EVENT.to_wire(), system="yes")).system is False


def test_welcome_encoding():
    """WELCOME names the user and the token's expiry; ref only when given."""
    assert json.loads(messages.welcome("Alice", 1732150800)) == {
        "type": "WELCOME", "user": "Alice", "expires": 1732150800
    }
    assert json.loads(messages.welcome("Alice", 1, ref="a"))["ref"] == "a"


def test_replay_marker_encoding():
    """REPLAY carries room, count, complete and ref."""
    assert json.loads(messages.replay_marker("lobby", 3, False, ref="x")) == {
        "type": "REPLAY", "room": "lobby", "count": 3, "complete": False, "ref": "x"
    }
    assert "ref" not in json.loads(messages.replay_marker("lobby", 0, True))


def test_error_encoding():
    """ERROR carries code, message and ref; unknown codes are a programming error."""
    assert json.loads(messages.error(errors.NOT_MEMBER, "not in lobby", ref="42")) == {
        "type": "ERROR", "code": "not_member", "message": "not in lobby", "ref": "42"
    }
    assert "ref" not in json.loads(messages.error(errors.BAD_REQUEST, "x"))
    with pytest.raises(AssertionError):
        messages.error("oops", "x")


def test_encode_is_compact_unicode():
    """Server frames are compact and keep non-ASCII text as is."""
    assert messages.encode({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'


def test_entered_and_left_text():
    """The generated ENTER and QUIT texts."""
    assert (messages.entered_text("Alice"), messages.left_text("Alice")) == (
        "Alice entered", "Alice left"
    )


def test_protocol_error_codes_are_known():
    """ProtocolError only takes codes from chatd.errors."""
    with pytest.raises(AssertionError):
        ProtocolError("nope", "x")
    assert ProtocolError(errors.FORBIDDEN, "m", "r").ref == "r"


def test_event_id_keys_are_remembered_within_a_bound():
    """Parsed keys are kept for the next caller of the same id, never more than _KEYS_MAX of them."""
    first = event_id_key("77-1")
    assert event_id_key("77-1") is first
    for n in range(messages._KEYS_MAX + 10):
        assert event_id_key(f"78-{n}") == (78, n)
    assert len(messages._KEYS) <= messages._KEYS_MAX

