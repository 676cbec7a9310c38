# -*- test-case-name: tests.test_api -*-
"""
The server API under C{/api/}: the application's backend publishes into
rooms, lists rooms and who is in them, reads history, and disconnects or
kicks users.  docs/api.md is the contract.

Three layers, each testable alone:
  - pure request rules (C{parse_*}, L{key_matches}): bytes and strings in,
    a request value or L{BadRequest} (naming the field) out;
  - L{IApiBackend}: what the API asks of the chat (implemented over the hub
    and the broker, so it works the same on one instance and over Redis);
  - L{ApiResource}: HTTP, the C{X-API-Key} check, JSON answers.

Keys are compared in constant time (as SHA-256 digests, so not even their
length shows) and never logged; the access log has only the path.
"""

import dataclasses
import hashlib
import hmac
import json
from typing import Optional, Tuple
from urllib.parse import unquote_to_bytes

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import Interface

from chatd import errors, messages
from chatd.auth import is_display_name, is_sub
from chatd.logs import printable, redact_uri

log = Logger()

API_KEY_HEADER = b"x-api-key"
MAX_BODY_BYTES = 64 * 1024  # the same cap the listener's guard puts on any request body
DEFAULT_HISTORY_LIMIT = 100
SYSTEM_SENDER = "system"
MAX_CLOSE_REASON_BYTES = 123  # a WebSocket close reason (RFC 6455, 5.5.1)


class BadRequest(Exception):
    """A request the API refuses with 400; C{message} names the field."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


class UnknownRoom(Exception):
    """A room nobody is in and with no history: 404."""

    def __init__(self, room):
        super().__init__(room)
        self.room = room


# --- requests, as values -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Publish:
    room: str
    message: str
    sender: str = SYSTEM_SENDER
    cid: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Disconnect:
    sub: str
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Kick:
    room: str
    sub: str


@dataclasses.dataclass(frozen=True)
class HistoryQuery:
    room: str
    since: Optional[str] = None
    limit: int = DEFAULT_HISTORY_LIMIT


# --- answers from the backend ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UserPresence:
    """One user in a room: C{connections} counts theirs across all instances."""

    sub: str
    name: str
    connections: int


@dataclasses.dataclass(frozen=True)
class RoomPresence:
    room: str
    users: Tuple[UserPresence, ...]

    def to_json(self):
        return {
            "room": self.room,
            "userCount": len(self.users),
            "users": [dataclasses.asdict(user) for user in self.users],
        }


@dataclasses.dataclass(frozen=True)
class History:
    """TALK events oldest first; C{complete} is false when older ones were not kept."""

    events: Tuple[messages.RoomEvent, ...]
    complete: bool

    def to_json(self):
        return {"events": [event.to_wire() for event in self.events], "complete": self.complete}


class IApiBackend(Interface):
    """
    What the server API asks of the chat.  Every method returns a Deferred
    (or a value); a broker outage fails it with
    L{chatd.errors.BrokerUnavailable} (503).
    """

    def publish(request):
        """
        Store and publish C{request} (a L{Publish}) as a TALK with
        C{"system": true}; a C{cid} already published within ten minutes
        publishes nothing.

        @return: the event id, the original one for a repeated C{cid}.
        @raise chatd.errors.RoomLimitReached: a new room beyond C{max_rooms}.
        """

    def list_rooms():
        """@return: C{[(name, users)]} for every room, across instances."""

    def room_presence(room):
        """
        @return: a L{RoomPresence}, users counted across instances.
        @raise UnknownRoom: nobody is in C{room} and it has no history.
        """

    def history(query):
        """
        @param query: a L{HistoryQuery}.
        @return: a L{History}.
        @raise UnknownRoom: nobody is in the room and it has no history.
        """

    def disconnect(request):
        """
        Close every connection of C{request.sub} on every instance with
        4003 and void the tickets not yet redeemed for it (a L{Disconnect}).
        """

    def kick(request):
        """
        Take C{request.sub}'s connections out of C{request.room} (a L{Kick});
        they stay connected.

        @raise UnknownRoom: nobody is in the room and it has no history.
        """


# --- pure request rules ----------------------------------------------------------------


def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _wrong_type(field, wanted, value):
    return BadRequest(f"{field} must be {wanted}, got {_json_type(value)}")


def parse_body(body):
    """
    A request body as a JSON object (unknown fields are kept and ignored).

    @raise BadRequest: for anything but one JSON object of at most
        L{MAX_BODY_BYTES}.
    """
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("the body must be one JSON object (UTF-8)") from None
    if not isinstance(value, dict):
        raise _wrong_type("the body", "a JSON object", value)
    return value


def _room_field(fields, field="room"):
    room = fields.get(field)
    if not isinstance(room, str):
        raise _wrong_type(field, "a string", room)
    if not messages.is_room_name(room):
        raise BadRequest(f"{field}: room names are 1-64 of A-Z a-z 0-9 _ - .")
    return room


def _sub_field(fields):
    sub = fields.get("sub")
    if not isinstance(sub, str):
        raise _wrong_type("sub", "a string", sub)
    if not is_sub(sub):
        raise BadRequest("sub must be printable, 1-256 characters, without outer spaces")
    return sub


def parse_room(segment):
    """
    A room name from a path segment (percent-decoded).

    @raise BadRequest: when it is not a room name.
    """
    try:
        room = unquote_to_bytes(segment).decode("ascii")
    except UnicodeDecodeError:
        room = None
    if room is None or not messages.is_room_name(room):
        raise BadRequest("room: room names are 1-64 of A-Z a-z 0-9 _ - .")
    return room


def parse_publish(body, max_talk_chars):
    """
    POST /api/publish: C{{"room", "message", "sender"?, "cid"?}}, with the
    rules clients' TALKs follow.

    @return: a L{Publish}.
    @raise BadRequest: naming the field.
    """
    fields = parse_body(body)
    room = _room_field(fields)
    message = fields.get("message")
    if not isinstance(message, str):
        raise _wrong_type("message", "a string", message)
    if not message or not messages._is_unicode(message):
        raise BadRequest("message must be a non-empty string of valid Unicode")
    if len(message) > max_talk_chars:
        raise BadRequest(f"message is longer than {max_talk_chars} characters")
    sender = fields.get("sender", SYSTEM_SENDER)
    if not isinstance(sender, str):
        raise _wrong_type("sender", "a string", sender)
    if not is_display_name(sender):
        raise BadRequest("sender must be printable, 1-64 characters, without outer spaces")
    cid = fields.get("cid")
    if cid is not None:
        if not isinstance(cid, str):
            raise _wrong_type("cid", "a string", cid)
        if not cid or len(cid) > messages.MAX_CID_CHARS or not messages._is_unicode(cid):
            raise BadRequest(f"cid must be a string of 1-{messages.MAX_CID_CHARS} characters")
    return Publish(room=room, message=message, sender=sender, cid=cid)


def parse_disconnect(body):
    """
    POST /api/disconnect: C{{"sub", "reason"?}}; the reason becomes the close
    reason, so it is at most 123 bytes of UTF-8.

    @return: a L{Disconnect}.
    @raise BadRequest: naming the field.
    """
    fields = parse_body(body)
    sub = _sub_field(fields)
    reason = fields.get("reason", "")
    if not isinstance(reason, str):
        raise _wrong_type("reason", "a string", reason)
    if not messages._is_unicode(reason) or not reason.isprintable():
        raise BadRequest("reason must be printable text")
    if len(reason.encode("utf-8")) > MAX_CLOSE_REASON_BYTES:
        raise BadRequest(f"reason is longer than {MAX_CLOSE_REASON_BYTES} bytes of UTF-8")
    return Disconnect(sub=sub, reason=reason)


def parse_kick(room, body):
    """
    POST /api/rooms/{room}/kick: C{{"sub"}}.

    @return: a L{Kick}.
    @raise BadRequest: naming the field.
    """
    return Kick(room=room, sub=_sub_field(parse_body(body)))


def parse_history_query(room, args, history_size):
    """
    GET /api/rooms/{room}/history?since=ID&limit=N.

    @param args: the query as twisted.web gives it, C{{bytes: [bytes]}}.
    @param history_size: C{[history] size}, the most C{limit} may be.
    @return: a L{HistoryQuery}.
    @raise BadRequest: naming the parameter.
    """
    most = max(1, history_size)

    def one(name):
        values = args.get(name.encode("ascii"), [])
        if len(values) > 1:
            raise BadRequest(f"give {name} at most once")
        return values[0].decode("latin-1") if values else None

    since = one("since")
    if since is not None:
        try:
            messages.event_id_key(since)
        except ValueError:
            raise BadRequest('since must be an event id such as "12-3"') from None
    limit = one("limit")
    if limit is None:
        number = min(DEFAULT_HISTORY_LIMIT, most)
    else:
        if not limit.isascii() or not limit.isdigit() or len(limit) > 9:
            raise BadRequest(f"limit must be a whole number from 1 to {most}")
        number = int(limit)
        if not 1 <= number <= most:
            raise BadRequest(f"limit must be a whole number from 1 to {most}")
    return HistoryQuery(room=room, since=since, limit=number)


def key_digests(keys):
    """The configured keys as the SHA-256 digests L{key_matches} compares."""
    return tuple(hashlib.sha256(key.encode("ascii")).digest() for key in keys)


def key_matches(presented, digests):
    """
    Whether C{presented} (the header's bytes, or L{None}) is one of the keys.
    Every key is compared, in constant time, whatever matched.
    """
    if not presented:
        return False
    candidate = hashlib.sha256(presented).digest()
    found = False
    for digest in digests:
        found |= hmac.compare_digest(candidate, digest)
    return found


# --- HTTP ------------------------------------------------------------------------------


def _json(request, status, body):
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class _Route:
    def __init__(self, method, handler, *params):
        self.method = method
        self.handler = handler
        self.params = params


class ApiResource(Resource):
    """
    Everything under C{/api/}: the key check first (401 for any path
    without a good key), then the route (404), the method (405) and the
    body (400), then the backend.
    """

    isLeaf = True

    def __init__(self, keys, backend, max_talk_chars, history_size):
        """
        @param keys: the API keys (C{[api] key_file}'s lines).
        @param backend: an L{IApiBackend}.
        """
        super().__init__()
        self._digests = key_digests(keys)
        self._backend = backend
        self._max_talk_chars = max_talk_chars
        self._history_size = history_size

    @classmethod
    def from_settings(cls, settings, backend):
        """The resource for C{[api]}, or L{None} when the API is off."""
        if not settings.api_keys:
            return None
        return cls(settings.api_keys, backend, settings.limits.max_talk_chars, settings.history.size)

    def render(self, request):
        presented = request.requestHeaders.getRawHeaders(API_KEY_HEADER) or []
        if len(presented) != 1 or not key_matches(presented[0], self._digests):
            return _json(request, errors.HTTP_UNAUTHORIZED, {"error": "invalid_key", "message": "send X-API-Key: <key>"})
        try:
            route = self._route(request.postpath)
            if route is None:
                return _json(request, http.NOT_FOUND, {"error": "not_found", "message": "no such API resource"})
            if request.method != route.method:
                request.setHeader(b"allow", route.method)
                return _json(
                    request, http.NOT_ALLOWED,
                    {"error": "method_not_allowed", "message": f"use {route.method.decode()}"},
                )
            body = request.content.read(MAX_BODY_BYTES + 1) if route.method == b"POST" else b""
            work = route.handler(request, body, *route.params)
        except BadRequest as e:
            return _json(request, http.BAD_REQUEST, {"error": errors.BAD_REQUEST, "message": e.message})
        d = defer.maybeDeferred(work)
        gone = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d.addCallbacks(self._answer, self._refused, callbackArgs=(request, gone), errbackArgs=(request, gone))
        return server.NOT_DONE_YET

    def _route(self, path):
        if path == [b"publish"]:
            return _Route(b"POST", self._publish)
        if path == [b"disconnect"]:
            return _Route(b"POST", self._disconnect)
        if path == [b"rooms"]:
            return _Route(b"GET", self._rooms)
        if len(path) in (2, 3) and path[0] == b"rooms" and path[1]:
            room = path[1]
            if len(path) == 2:
                return _Route(b"GET", self._room, room)
            if path[2] == b"history":
                return _Route(b"GET", self._history, room)
            if path[2] == b"kick":
                return _Route(b"POST", self._kick, room)
        return None

    # Each handler checks the request (raising BadRequest) and returns a
    # no-argument callable doing the work, whose result is (status, body).

    def _publish(self, request, body):
        publish = parse_publish(body, self._max_talk_chars)

        async def work():
            event_id = await defer.maybeDeferred(self._backend.publish, publish)
            log.info("api: published {id} to {room}", id=event_id, room=publish.room)
            return {"id": event_id}

        return lambda: defer.ensureDeferred(work())

    def _rooms(self, request, body):
        def listed(rooms):
            return {"rooms": [{"name": name, "users": users} for name, users in rooms]}

        return lambda: defer.maybeDeferred(self._backend.list_rooms).addCallback(listed)

    def _room(self, request, body, segment):
        room = parse_room(segment)
        return lambda: defer.maybeDeferred(self._backend.room_presence, room).addCallback(
            lambda presence: presence.to_json()
        )

    def _history(self, request, body, segment):
        query = parse_history_query(parse_room(segment), request.args, self._history_size)
        return lambda: defer.maybeDeferred(self._backend.history, query).addCallback(
            lambda history: history.to_json()
        )

    def _disconnect(self, request, body):
        disconnect = parse_disconnect(body)

        def done(_):
            log.info("api: disconnected {sub}", sub=printable(disconnect.sub))
            return {"ok": True}

        return lambda: defer.maybeDeferred(self._backend.disconnect, disconnect).addCallback(done)

    def _kick(self, request, body, segment):
        kick = parse_kick(parse_room(segment), body)

        def done(_):
            log.info("api: kicked {sub} from {room}", sub=printable(kick.sub), room=kick.room)
            return {"ok": True}

        return lambda: defer.maybeDeferred(self._backend.kick, kick).addCallback(done)

    def _answer(self, body, request, gone):
        if not gone:
            request.write(_json(request, http.OK, body))
            request.finish()

    def _refused(self, failure, request, gone):
        if failure.check(UnknownRoom):
            status, body = http.NOT_FOUND, {"error": "not_found", "message": f"no room {failure.value.room}"}
        elif failure.check(BadRequest):
            status, body = http.BAD_REQUEST, {"error": errors.BAD_REQUEST, "message": failure.value.message}
        else:
            status, body = errors.http_error(failure.value)
            if status >= 500 and status != errors.HTTP_UNAVAILABLE:
                log.failure("api: {method} {path} failed", failure,
                            method=printable(request.method.decode("latin-1"), 16),
                            path=redact_uri(request.uri))
        if not gone:
            request.write(_json(request, status, body))
            request.finish()
