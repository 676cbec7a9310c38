# -*- test-case-name: tests.test_stomp_mapping -*-
"""
STOMP destinations and bodies to chatd's room commands, and room events to
MESSAGE bodies.

Pure, no I/O.  The rules on room names, message length, C{cid} and C{since}
stay in L{chatd.messages}: a SEND becomes the chatd.v1 frame it stands for
and goes through L{messages.parse_client_message}, so both protocols refuse
the same things with the same codes.  docs/stomp.md is the contract.

    SUBSCRIBE <subscribe prefix><room>       ENTER room (since: header)
    UNSUBSCRIBE id                           QUIT that room
    SEND [stomp] send_destination            {"type": "TALK", "roomId", "message", "cid"?}
                                             ("ENTER"/"QUIT": accepted, nothing more)
    SEND <app prefix><room>                  {"message": M} or a plain-text body: TALK
    SEND /app/auth                           AUTH with the frame's JWT
"""

import dataclasses
import json
from typing import Optional

from chatd import errors, messages
from chatd.errors import ProtocolError

AUTH_DESTINATION = "/app/auth"
MESSAGE_TYPES = (messages.TALK, messages.ENTER, messages.QUIT)
_MAX_ECHO = 80


def _echo(text):
    return repr(text[:_MAX_ECHO] + ("..." if len(text) > _MAX_ECHO else ""))


@dataclasses.dataclass(frozen=True)
class Routes:
    """The C{[stomp]} destinations, checked by L{chatd.config}."""

    subscribe_prefixes: tuple
    app_prefixes: tuple
    send_destination: str

    @classmethod
    def from_settings(cls, stomp):
        """From C{settings.stomp}."""
        return cls(stomp.subscribe_prefixes, stomp.app_prefixes, stomp.send_destination)

    def topic_room(self, destination):
        """The room a subscribe destination names, or C{None}."""
        return _room_under(destination, self.subscribe_prefixes)

    def app_room(self, destination):
        """The room an app destination names, or C{None}."""
        return _room_under(destination, self.app_prefixes)


def _room_under(destination, prefixes):
    for prefix in prefixes:
        if destination.startswith(prefix):
            room = destination[len(prefix):]
            if not messages.is_room_name(room):
                raise ProtocolError(
                    errors.BAD_REQUEST,
                    f"{_echo(destination)} names no room: room names are 1-64 of A-Z a-z 0-9 _ - .",
                )
            return room
    return None


# --- what the client asks ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Subscribe:
    """SUBSCRIBE: ENTER C{room}, events go to subscription C{id}."""

    id: str
    destination: str
    room: str
    since: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Presence:
    """
    A Spring-style C{{"type": "ENTER"|"QUIT"}} SEND: accepted, nothing
    more, because the subscription itself is the presence.
    """

    type: str
    room: str


def _required(frame, name):
    value = frame.get(name)
    if not value:
        raise ProtocolError(errors.BAD_REQUEST, f"{frame.command} needs a {name} header")
    return value


def subscribe(frame, routes):
    """
    SUBSCRIBE as a L{Subscribe}.

    @raise ProtocolError: no destination, not a room topic, a bad C{since},
        an C{ack} mode other than auto (ACK is not supported).
    """
    destination = _required(frame, "destination")
    room = routes.topic_room(destination)
    if room is None:
        raise ProtocolError(
            errors.BAD_REQUEST,
            f"no such topic {_echo(destination)}: subscribe to one of "
            + " ".join(p + "ROOM" for p in routes.subscribe_prefixes),
        )
    ack = frame.get("ack", "auto") or "auto"
    if ack != "auto":
        raise ProtocolError(errors.BAD_REQUEST, f"ack:{_echo(ack)} is not supported; use ack:auto")
    # 1.0 made the id optional; then the destination names the subscription.
    subscription = frame.get("id") or destination
    since = frame.get("since") or None
    if since is not None:
        try:
            messages.event_id_key(since)
        except ValueError:
            raise ProtocolError(errors.BAD_REQUEST, 'since must be an event id such as "12-3"') from None
    return Subscribe(subscription, destination, room, since)


def unsubscribe(frame):
    """
    UNSUBSCRIBE: the subscription id (1.0 may name the destination instead).

    @raise ProtocolError: neither header.
    """
    subscription = frame.get("id") or frame.get("destination")
    if not subscription:
        raise ProtocolError(errors.BAD_REQUEST, "UNSUBSCRIBE needs an id header")
    return subscription


def token(frame):
    """
    The JWT a CONNECT or SEND carries: C{Authorization: Bearer <JWT>},
    C{token} or C{passcode}; C{None} when there is none.
    """
    authorization = frame.get("Authorization") or frame.get("authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        raise ProtocolError(errors.UNAUTHORIZED, "Authorization must be Bearer <JWT>")
    return frame.get("token") or frame.get("passcode") or None


def send(frame, routes, max_talk_chars):
    """
    SEND as the command it stands for: a L{messages.Talk}, a L{Presence},
    or a L{messages.Auth} (to L{AUTH_DESTINATION}).  A JWT header on any
    other SEND is the adapter's business (see L{token}).

    @raise ProtocolError: no destination, a topic (nobody publishes into
        one directly), an unknown destination, a body that is not what the
        destination takes, or a TALK chatd.v1 would refuse.
    """
    destination = _required(frame, "destination")
    if destination == AUTH_DESTINATION:
        jwt = token(frame)
        if jwt is None:
            raise ProtocolError(errors.UNAUTHORIZED, f"SEND to {AUTH_DESTINATION} needs Authorization: Bearer <JWT>")
        return _checked({"type": messages.AUTH, "token": jwt}, max_talk_chars)
    if destination == routes.send_destination:
        body = _json_object(frame, f"{destination} takes a JSON object")
        kind = body.get("type", messages.TALK)
        if kind not in MESSAGE_TYPES:
            raise ProtocolError(errors.BAD_REQUEST, "type must be TALK, ENTER or QUIT")
        return _talk_or_presence(frame, kind, _room_id(body), body, max_talk_chars)
    for prefix in routes.subscribe_prefixes:
        if destination.startswith(prefix):
            raise ProtocolError(
                errors.FORBIDDEN,
                f"{_echo(destination)} is a topic; send to {routes.send_destination} "
                "or an app destination instead",
            )
    room = routes.app_room(destination)
    if room is None:
        raise ProtocolError(errors.BAD_REQUEST, f"no such destination {_echo(destination)}")
    text = _text(frame)
    body = _maybe_json_object(text)
    if body is None:
        return _checked({"type": messages.TALK, "room": room, "message": text,
                         "cid": frame.get("cid") or None}, max_talk_chars)
    kind = body.get("type", messages.TALK)
    if kind not in MESSAGE_TYPES:
        raise ProtocolError(errors.BAD_REQUEST, "type must be TALK, ENTER or QUIT")
    return _talk_or_presence(frame, kind, room, body, max_talk_chars)


def _talk_or_presence(frame, kind, room, body, max_talk_chars):
    if kind != messages.TALK:
        if not messages.is_room_name(room):
            raise ProtocolError(errors.BAD_REQUEST, "room names are 1-64 of A-Z a-z 0-9 _ - .")
        return Presence(kind, room)
    cid = body.get("cid")
    if cid is None:
        cid = frame.get("cid") or None
    # The sender is never read from the body: it comes from the token.
    return _checked(
        {"type": messages.TALK, "room": room, "message": body.get("message"), "cid": cid},
        max_talk_chars,
    )


def _checked(wire, max_talk_chars):
    """The chatd.v1 frame C{wire} parsed by chatd.v1's own rules."""
    wire = {key: value for key, value in wire.items() if value is not None}
    return messages.parse_client_message(messages.encode(wire), max_talk_chars)


def _room_id(body):
    room = body.get("roomId")
    if isinstance(room, int) and not isinstance(room, bool) and room >= 0:
        return str(room)  # JPA-style numeric ids are room names too
    if not isinstance(room, str):
        raise ProtocolError(errors.BAD_REQUEST, "roomId must be a string")
    return room


def _text(frame):
    try:
        return frame.body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(errors.BAD_REQUEST, "a SEND body must be UTF-8") from None


def _maybe_json_object(text):
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _json_object(frame, why):
    value = _maybe_json_object(_text(frame))
    if value is None:
        raise ProtocolError(errors.BAD_REQUEST, why)
    return value


# --- subscriptions -----------------------------------------------------------


class Subscriptions:
    """
    One connection's subscriptions: one per room, ids unique.  Pure
    bookkeeping for the adapter, which ENTERs and QUITs through the hub.
    """

    def __init__(self):
        self._by_id = {}
        self._by_room = {}

    def add(self, subscription):
        """
        Record a L{Subscribe} before its ENTER is sent.

        @raise ProtocolError: the id is in use, or the room is subscribed.
        """
        if subscription.id in self._by_id:
            raise ProtocolError(errors.BAD_REQUEST, f"subscription id {_echo(subscription.id)} is in use")
        if subscription.room in self._by_room:
            raise ProtocolError(
                errors.BAD_REQUEST,
                f"already subscribed to {subscription.room} as {_echo(self._by_room[subscription.room].id)}",
            )
        self._by_id[subscription.id] = subscription
        self._by_room[subscription.room] = subscription

    def remove(self, subscription_id):
        """
        Forget a subscription; it is returned so its room can be quit.

        @raise ProtocolError: no such subscription (C{not_member}).
        """
        subscription = self._by_id.pop(subscription_id, None)
        if subscription is None:
            raise ProtocolError(errors.NOT_MEMBER, f"no subscription {_echo(subscription_id)}")
        del self._by_room[subscription.room]
        return subscription

    def of_room(self, room):
        """The L{Subscribe} of C{room}, or C{None}."""
        return self._by_room.get(room)

    def __len__(self):
        return len(self._by_id)

    def __iter__(self):
        return iter(list(self._by_id.values()))


# --- what the client receives ------------------------------------------------


def event_body(event):
    """
    A L{messages.RoomEvent} as a MESSAGE body: the Spring seed clients'
    ChatMessage shape plus chatd's C{id} and C{ts} (and C{system}, as in
    chatd.v1, for a TALK the application's backend posted).  Encode once per
    event: only the headers differ between subscribers.
    """
    body = {
        "type": event.type,
        "roomId": event.room,
        "sender": event.sender,
        "message": event.message,
        "userCount": event.user_count,
        "id": event.id,
        "ts": event.ts,
    }
    if event.system:
        body["system"] = True
    return messages.encode(body)


def replay_body(room, count, complete):
    """The marker after the replay that C{since} asked for, before live events."""
    return messages.encode({"type": "REPLAY", "roomId": room, "count": count, "complete": complete})
