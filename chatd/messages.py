# -*- test-case-name: tests.test_messages -*-
"""
The chatd.v1 wire format: client frames in, server events out.

Pure functions and values, no I/O: the WebSocket adapter hands text in and
sends the strings that come out.  docs/protocol.md is the contract for
client authors; every rule it states about fields lives here.
"""

import dataclasses
import json
import re
from json.encoder import encode_basestring
from typing import Any, NamedTuple, Optional, Tuple

from chatd import errors
from chatd.errors import ProtocolError

SUBPROTOCOL = "chatd.v1"

ROOM_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
EVENT_ID = re.compile(r"[0-9]{1,20}(?:-[0-9]{1,20}){0,3}\Z")
MAX_REF_CHARS = 128
MAX_CID_CHARS = 64
MAX_TOKEN_CHARS = 16384

# Room event types, also the client command types that cause them.
ENTER = "ENTER"
TALK = "TALK"
QUIT = "QUIT"
AUTH = "AUTH"


@dataclasses.dataclass(frozen=True)
class Enter:
    kind = ENTER  # the type as sent (a class attribute, not a field)
    room: str
    since: Optional[str] = None
    ref: Any = None


@dataclasses.dataclass(frozen=True)
class Talk:
    kind = TALK  # the type as sent (a class attribute, not a field)
    room: str
    message: str
    cid: Optional[str] = None
    ref: Any = None


@dataclasses.dataclass(frozen=True)
class Quit:
    kind = QUIT  # the type as sent (a class attribute, not a field)
    room: str
    ref: Any = None


@dataclasses.dataclass(frozen=True)
class Auth:
    kind = AUTH  # the type as sent (a class attribute, not a field)
    token: str
    ref: Any = None


class RoomEvent(NamedTuple):
    """
    One ENTER, TALK or QUIT as every member of the room sees it.  C{id}
    orders the room's events (see L{event_id_key}).

    A named tuple: made for every message, it is cheaper to build than a
    frozen dataclass, and C{tuple(event)} is what a room's history keeps
    (see L{chatd.rooms.Room}).
    """

    type: str
    id: str
    room: str
    sender: str
    message: str
    user_count: int
    ts: int  # milliseconds since the epoch
    system: bool = False  # posted by the application's backend (POST /api/publish)

    def to_wire(self, ref=None):
        wire = {
            "type": self.type,
            "id": self.id,
            "room": self.room,
            "sender": self.sender,
            "message": self.message,
            "userCount": self.user_count,
            "ts": self.ts,
        }
        if self.system:
            wire["system"] = True
        if ref is not None:
            wire["ref"] = ref
        return wire

    @classmethod
    def from_wire(cls, wire):
        """The inverse of L{to_wire}; for brokers that carry events as JSON."""
        return cls(
            type=wire["type"],
            id=wire["id"],
            room=wire["room"],
            sender=wire["sender"],
            message=wire["message"],
            user_count=wire["userCount"],
            ts=wire["ts"],
            system=wire.get("system") is True,
        )


def is_room_name(name):
    """Room names: 1-64 ASCII letters, digits, C{_}, C{-} and C{.}."""
    return isinstance(name, str) and ROOM_NAME.match(name) is not None


# The keys of recently seen event ids: each event's id is parsed by the
# broker, the hub and the seats; a TALK's costs one parse this way.  Bounded
# (emptied when full), as clients choose the ids they send as since.
_KEYS: dict = {}
_KEYS_MAX = 4096


def event_id_key(event_id) -> Tuple[int, ...]:
    """
    The sort key of an event id: its decimal parts, compared left to right.

    @raise ValueError: if C{event_id} is not such an id.
    """
    if event_id.__class__ is str:
        key = _KEYS.get(event_id)
        if key is not None:
            return key
    if not isinstance(event_id, str) or not EVENT_ID.match(event_id):
        raise ValueError(f"not an event id: {event_id!r}")
    key = tuple(map(int, event_id.split("-")))
    if len(_KEYS) >= _KEYS_MAX:
        _KEYS.clear()
    _KEYS[event_id] = key
    return key


def entered_text(name):
    return f"{name} entered"


def left_text(name):
    return f"{name} left"


# --- parsing -----------------------------------------------------------------


def _is_unicode(text):
    """
    False for strings with lone surrogates: valid UTF-8 on the wire can spell
    them as JSON escapes (C{"\\ud800"}), and no UTF-8 encoder takes them back.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ref(frame):
    ref = frame.get("ref")
    if ref is None:
        return None
    if isinstance(ref, bool) or not isinstance(ref, (str, int)):
        raise ProtocolError(errors.BAD_REQUEST, "ref must be a string or an integer")
    if isinstance(ref, str) and len(ref) > MAX_REF_CHARS:
        raise ProtocolError(errors.BAD_REQUEST, f"ref is longer than {MAX_REF_CHARS} characters")
    if isinstance(ref, str) and not _is_unicode(ref):
        raise ProtocolError(errors.BAD_REQUEST, "ref must be valid Unicode")
    if isinstance(ref, int) and not -(2**53) < ref < 2**53:
        raise ProtocolError(errors.BAD_REQUEST, "ref is out of range")
    return ref


def _room(frame, ref):
    room = frame.get("room")
    if not isinstance(room, str):
        raise ProtocolError(errors.BAD_REQUEST, "room must be a string", ref)
    if not is_room_name(room):
        raise ProtocolError(
            errors.BAD_REQUEST, "room names are 1-64 of A-Z a-z 0-9 _ - .", ref
        )
    return room


def _optional_text(frame, key, limit, ref):
    value = frame.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > limit or not _is_unicode(value):
        raise ProtocolError(
            errors.BAD_REQUEST, f"{key} must be a string of 1-{limit} characters", ref
        )
    return value


def parse_client_message(text, max_talk_chars):
    """
    One client text frame as a command.

    @return: an L{Enter}, L{Talk}, L{Quit} or L{Auth}.
    @raise ProtocolError: for anything else, carrying the frame's C{ref}
        when one could be read.
    """
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError(errors.BAD_REQUEST, "a frame is one JSON object") from None
    if not isinstance(frame, dict):
        raise ProtocolError(errors.BAD_REQUEST, "a frame is one JSON object")
    ref = _ref(frame)
    kind = frame.get("type")
    if kind == ENTER:
        room = _room(frame, ref)
        since = frame.get("since")
        if since is not None:
            try:
                event_id_key(since)
            except ValueError:
                raise ProtocolError(
                    errors.BAD_REQUEST, "since must be an event id such as \"12-3\"", ref
                ) from None
        return Enter(room=room, since=since, ref=ref)
    if kind == TALK:
        room = _room(frame, ref)
        message = frame.get("message")
        if not isinstance(message, str) or not message:
            raise ProtocolError(errors.BAD_REQUEST, "message must be a non-empty string", ref)
        if not _is_unicode(message):
            raise ProtocolError(errors.BAD_REQUEST, "message must be valid Unicode", ref)
        if len(message) > max_talk_chars:
            raise ProtocolError(
                errors.TOO_LARGE, f"message is longer than {max_talk_chars} characters", ref
            )
        cid = _optional_text(frame, "cid", MAX_CID_CHARS, ref)
        return Talk(room=room, message=message, cid=cid, ref=ref)
    if kind == QUIT:
        return Quit(room=_room(frame, ref), ref=ref)
    if kind == AUTH:
        token = frame.get("token")
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS or not _is_unicode(token):
            raise ProtocolError(errors.BAD_REQUEST, "token must be a JWT string", ref)
        return Auth(token=token, ref=ref)
    if not isinstance(kind, str):
        raise ProtocolError(errors.BAD_REQUEST, "type must be a string", ref)
    raise ProtocolError(errors.BAD_REQUEST, "type must be ENTER, TALK, QUIT or AUTH", ref)


# --- encoding ----------------------------------------------------------------


# One encoder for every frame (json.dumps with options makes one per call).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode(wire):
    """A server frame as text; C{ensure_ascii=False} keeps chat text compact."""
    return _ENCODER.encode(wire)


def welcome(user, expires, ref=None):
    """
    WELCOME as text: exactly C{encode} of its fields (type, user, expires,
    then ref when given), built directly for the common name and expiry
    (one per connection opened).
    """
    if ref is None and user.__class__ is str and expires.__class__ is int:
        return f'{{"type":"WELCOME","user":{encode_basestring(user)},"expires":{int.__repr__(expires)}}}'
    wire = {"type": "WELCOME", "user": user, "expires": expires}
    if ref is not None:
        wire["ref"] = ref
    return encode(wire)


def replay_marker(room, count, complete, ref=None):
    wire = {"type": "REPLAY", "room": room, "count": count, "complete": complete}
    if ref is not None:
        wire["ref"] = ref
    return encode(wire)


def error(code, message, ref=None):
    assert code in errors.ERROR_CODES, code
    wire = {"type": "ERROR", "code": code, "message": message}
    if ref is not None:
        wire["ref"] = ref
    return encode(wire)


def _ref_text(ref):
    """C{ref} as JSON, or L{None} when it is of no type a client can send."""
    kind = ref.__class__
    if kind is str:
        return encode_basestring(ref)
    if kind is int:
        return int.__repr__(ref)
    return None


def event(room_event, ref=None):
    """
    A room event as text: exactly C{encode(room_event.to_wire(ref))}, built
    directly (this runs once per event, and for every actor's copy).
    """
    e = room_event
    if e.user_count.__class__ is not int or e.ts.__class__ is not int:
        return encode(e.to_wire(ref))
    s = encode_basestring
    text = (
        f'{{"type":{s(e.type)},"id":{s(e.id)},"room":{s(e.room)},"sender":{s(e.sender)},'
        f'"message":{s(e.message)},"userCount":{int.__repr__(e.user_count)},"ts":{int.__repr__(e.ts)}'
    )
    if e.system:
        text += ',"system":true'
    if ref is None:
        return text + "}"
    quoted = _ref_text(ref)
    if quoted is None:
        return encode(e.to_wire(ref))
    return f'{text},"ref":{quoted}}}'


def with_ref(event_text, ref):
    """
    The actor's copy of an event from the text everyone else gets: the same
    as C{event(room_event, ref)} where C{event_text} is
    C{event(room_event)}, without encoding the event again.
    """
    if ref is None:
        return event_text
    quoted = _ref_text(ref)
    if quoted is None:
        return encode(dict(json.loads(event_text), ref=ref))
    return f'{event_text[:-1]},"ref":{quoted}}}'
