# -*- test-case-name: tests.test_errors,tests.test_messages -*-
"""
The one place for every code chatd answers with: ERROR event codes,
WebSocket close codes and the HTTP statuses of the handshake and resources.

docs/protocol.md documents the same table for client authors.
"""

# ERROR event codes ({"type": "ERROR", "code": ...}); the connection stays.
BAD_REQUEST = "bad_request"
NOT_MEMBER = "not_member"
FORBIDDEN = "forbidden"
RATE_LIMITED = "rate_limited"
TOO_LARGE = "too_large"
UNAUTHORIZED = "unauthorized"
UNAVAILABLE = "unavailable"

ERROR_CODES = frozenset(
    {BAD_REQUEST, NOT_MEMBER, FORBIDDEN, RATE_LIMITED, TOO_LARGE, UNAUTHORIZED, UNAVAILABLE}
)

# WebSocket close codes.
CLOSE_GOING_AWAY = 1001  # server shutdown
CLOSE_UNSUPPORTED_DATA = 1003  # binary frame
CLOSE_INVALID_PAYLOAD = 1007  # invalid UTF-8
CLOSE_POLICY_VIOLATION = 1008  # sustained abuse (flooding)
CLOSE_MESSAGE_TOO_BIG = 1009  # message over [limits] max_message_bytes
CLOSE_TOKEN_EXPIRED = 4001  # the token's exp passed without a fresh AUTH
CLOSE_DISCONNECTED = 4003  # the backend disconnected the user (POST /api/disconnect)
CLOSE_SLOW_CONSUMER = 4008  # outgoing buffer over its cap

# HTTP statuses.
HTTP_UNAUTHORIZED = 401  # missing/invalid JWT or ticket
HTTP_FORBIDDEN = 403  # Origin not allowed; a room the token does not allow
HTTP_NOT_FOUND = 404
HTTP_CONFLICT = 409
HTTP_PAYLOAD_TOO_LARGE = 413  # a request body over 64 KiB (chatd.guard)
HTTP_UPGRADE_REQUIRED = 426  # /ws without a WebSocket upgrade
HTTP_TOO_MANY_REQUESTS = 429  # per-IP connection cap
HTTP_HEADER_TOO_LARGE = 431  # a request or header line over 16 KiB (chatd.guard)
HTTP_INTERNAL_ERROR = 500  # anything unexpected (logged once)
HTTP_UNAVAILABLE = 503  # broker down, or total connection cap


class ProtocolError(Exception):
    """
    A client message chatd refuses; it becomes an ERROR event and the
    connection stays open.
    """

    def __init__(self, code, message, ref=None):
        assert code in ERROR_CODES, code
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.ref = ref


class ChatError(Exception):
    """
    A domain refusal: something the hub or a broker will not do.  Not
    tied to a wire: L{chatd.session.ERROR_TABLE} turns each kind into an
    ERROR event (WebSocket, later STOMP) and L{http_error} into an HTTP
    answer, so each kind gets the same code everywhere.
    """


class NotMember(ChatError):
    """TALK or QUIT in a room the connection is not (or no longer, or not yet) in."""

    def __init__(self, room):
        super().__init__(room)
        self.room = room


class AlreadyInRoom(ChatError):
    """ENTER of a room the connection is in (or entering, or leaving)."""

    def __init__(self, room):
        super().__init__(room)
        self.room = room


class Forbidden(ChatError):
    """The token's C{rooms} claim does not allow C{room}."""

    def __init__(self, room):
        super().__init__(room)
        self.room = room


class TooManyRooms(ChatError):
    """ENTER beyond C{[limits] max_rooms_per_connection} on one connection."""

    def __init__(self, limit):
        super().__init__(limit)
        self.limit = limit


class RoomLimitReached(ChatError):
    """
    Entering would make a new room while the registry already holds
    C{[limits] max_rooms}: every room keeps history, so their number is what
    bounds the broker's memory.  Answered with ERROR forbidden.
    """


class TooManyNewRooms(ChatError):
    """
    Entering would make a new room while this user made C{[limits]
    max_new_rooms_per_user} of the rooms the registry still holds: no single
    user can take the whole registry.  Answered with ERROR forbidden.
    """

    def __init__(self, limit):
        super().__init__(limit)
        self.limit = limit


class BrokerUnavailable(ChatError):
    """
    The broker could not store or deliver something (Redis down, timed out).
    Callers answer ERROR unavailable or HTTP 503.
    """


# Domain refusals over HTTP (web.py and the server API), most specific first.
_HTTP_TABLE = (
    (BrokerUnavailable, HTTP_UNAVAILABLE, UNAVAILABLE, "chat backend unavailable, try again"),
    (Forbidden, HTTP_FORBIDDEN, FORBIDDEN, "your token does not allow {room}"),
    (RoomLimitReached, HTTP_FORBIDDEN, FORBIDDEN, "no new rooms: this server holds its maximum"),
    (TooManyRooms, HTTP_FORBIDDEN, FORBIDDEN, "at most {limit} rooms per connection"),
    (TooManyNewRooms, HTTP_FORBIDDEN, FORBIDDEN, "you made {limit} rooms that still exist; use one of those"),
    (NotMember, HTTP_NOT_FOUND, NOT_MEMBER, "not in {room}"),
    (AlreadyInRoom, HTTP_CONFLICT, BAD_REQUEST, "already in {room}"),
)


def http_error(exc):
    """
    The HTTP answer for an exception a resource could not handle.

    @param exc: any exception; a L{ChatError} gets its own status, anything
        else is an internal error (500; the caller logs it, once).
    @return: C{(status, body)}, the body a JSON-able dict
        C{{"error": code, "message": text}}.
    """
    for kind, status, code, text in _HTTP_TABLE:
        if isinstance(exc, kind):
            return status, {"error": code, "message": text.format(**vars(exc))}
    return HTTP_INTERNAL_ERROR, {"error": "internal", "message": "try again"}
