# -*- test-case-name: tests.test_messages -*-
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
CLOSE_SLOW_CONSUMER = 4008  # outgoing buffer over its cap

# HTTP statuses.
HTTP_UNAUTHORIZED = 401  # missing/invalid JWT or ticket
HTTP_FORBIDDEN = 403  # Origin not allowed
HTTP_TOO_MANY_REQUESTS = 429  # per-IP connection cap
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


class RoomLimitReached(Exception):
    """
    Entering would make a new room while the registry already holds
    C{[limits] max_rooms}: every room keeps history, so their number is what
    bounds the broker's memory.  Answered with ERROR forbidden.
    """


class BrokerUnavailable(Exception):
    """
    The broker could not store or deliver something (Redis down, timed out).
    Callers answer ERROR unavailable or HTTP 503.
    """
