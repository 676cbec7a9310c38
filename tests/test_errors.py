# -*- test-case-name: tests.test_errors -*-
"""
chatd.errors and the session's ERROR table: every domain refusal has one
ERROR code and one HTTP answer, and anything else is an internal error.
"""

import pytest

from chatd import errors
from chatd.errors import (
    AlreadyInRoom, BrokerUnavailable, ChatError, Forbidden, NotMember, RoomLimitReached,
    TooManyNewRooms, TooManyRooms,
)
from chatd.session import ERROR_TABLE, protocol_error

EXAMPLES = [
    NotMember("lobby"), AlreadyInRoom("lobby"), Forbidden("lobby"), TooManyRooms(3),
    RoomLimitReached("lobby"), TooManyNewRooms(5), BrokerUnavailable("redis down"),
]


def test_every_domain_error_has_an_example_and_a_row():
    """Each ChatError kind is in ERROR_TABLE (and in EXAMPLES, so the tests below cover it)."""
    kinds = set(ChatError.__subclasses__())
    assert kinds == {type(e) for e in EXAMPLES}
    assert kinds <= {kind for kind, _, _ in ERROR_TABLE}


@pytest.mark.parametrize("exc", EXAMPLES, ids=lambda e: type(e).__name__)
def test_protocol_error(exc):
    """A domain refusal becomes a ProtocolError with a known code, the ref, and no internals."""
    error = protocol_error(exc, ref="r")
    assert error.code in errors.ERROR_CODES and error.ref == "r"
    assert "redis down" not in error.message
    if hasattr(exc, "room"):
        assert "lobby" in error.message


def test_protocol_error_codes():
    """The codes docs/protocol.md promises for each kind."""
    codes = {type(e).__name__: protocol_error(e).code for e in EXAMPLES}
    assert codes == {
        "NotMember": errors.NOT_MEMBER, "AlreadyInRoom": errors.BAD_REQUEST,
        "Forbidden": errors.FORBIDDEN, "TooManyRooms": errors.FORBIDDEN,
        "RoomLimitReached": errors.FORBIDDEN, "TooManyNewRooms": errors.FORBIDDEN,
        "BrokerUnavailable": errors.UNAVAILABLE,
    }


def test_unknown_error_is_not_in_the_table():
    """Anything that is no domain refusal is left to the caller (logged, unavailable)."""
    assert protocol_error(RuntimeError("boom")) is None


@pytest.mark.parametrize("exc", EXAMPLES, ids=lambda e: type(e).__name__)
def test_http_error(exc):
    """Each domain refusal has a 4xx/503 status and a JSON body with error and message."""
    status, body = errors.http_error(exc)
    assert 400 <= status < 500 or status == errors.HTTP_UNAVAILABLE
    assert set(body) == {"error", "message"} and body["message"]
    assert "redis down" not in body["message"]


def test_http_error_statuses():
    """Unavailable is 503; forbidden 403; anything unexpected 500 with no detail."""
    assert errors.http_error(BrokerUnavailable("x"))[0] == errors.HTTP_UNAVAILABLE
    assert errors.http_error(Forbidden("ops")) == (
        errors.HTTP_FORBIDDEN, {"error": "forbidden", "message": "your token does not allow ops"}
    )
    assert errors.http_error(KeyError("secret")) == (
        errors.HTTP_INTERNAL_ERROR, {"error": "internal", "message": "try again"}
    )
