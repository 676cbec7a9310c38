# -*- test-case-name: tests.test_handshake -*-
"""
chatd.handshake: the decisions on an upgrade request (Origin, ticket,
grant, subprotocol) and the statuses they answer with.
"""

import pytest

from chatd import errors
from chatd.auth import Principal
from chatd.handshake import Deny, check_grant, check_origin, choose_subprotocol, ticket_from_params

ALLOWED = ("https://chat.example.com", "http://localhost:8080")


def denied(call, *args):
    with pytest.raises(Deny) as info:
        call(*args)
    assert info.value.reason.isascii()
    return info.value.status, info.value.reason


@pytest.mark.parametrize(
    "origin",
    [None, "https://chat.example.com", "http://localhost:8080", "HTTPS://Chat.Example.com",
     "https://chat.example.com/"],
)
def test_origin_allowed(origin):
    """No Origin (non-browser) or an exact match (case-insensitive) passes."""
    assert check_origin(origin, ALLOWED) is None


@pytest.mark.parametrize(
    "origin",
    ["https://evil.example", "http://chat.example.com", "https://chat.example.com:8443",
     "https://chat.example.com.evil", "https://sub.chat.example.com", "http://localhost",
     "http://localhost:8081", "null", ""],
)
def test_origin_refused(origin):
    """Scheme, host and port must all match: anything else is 403."""
    assert denied(check_origin, origin, ALLOWED) == (errors.HTTP_FORBIDDEN, "origin not allowed")


def test_origin_star():
    """* allows any origin."""
    assert check_origin("https://anything.example", ("*",)) is None


def test_ticket_from_params():
    """The one ticket in the query is taken."""
    assert ticket_from_params({"ticket": ["abc"], "other": ["x"]}) == "abc"


@pytest.mark.parametrize(
    "params", [{}, {"ticket": []}, {"ticket": [""]}, {"ticket": ["a", "b"]},
               {"ticket": ["x" * 257]}, {"Ticket": ["abc"]}]
)
def test_ticket_missing(params):
    """No ticket, an empty one, two, or an over-long one: 401."""
    assert denied(ticket_from_params, params) == (errors.HTTP_UNAUTHORIZED, "ticket required")


def test_grant_checked():
    """A redeemed grant whose token is still valid is returned."""
    grant = Principal(sub="a", name="a", exp=101)
    assert check_grant(grant, 100) is grant


def test_grant_missing():
    """An unknown, used or expired ticket (no grant) is 401."""
    assert denied(check_grant, None, 100) == (errors.HTTP_UNAUTHORIZED, "invalid ticket")


@pytest.mark.parametrize("exp", [100, 99])
def test_grant_token_expired(exp):
    """A ticket whose token expired by now (exp <= now) is 401."""
    grant = Principal(sub="a", name="a", exp=exp)
    assert denied(check_grant, grant, 100) == (errors.HTTP_UNAUTHORIZED, "token expired")


@pytest.mark.parametrize(
    "offered,chosen",
    [(["chatd.v1"], "chatd.v1"), (["x", "chatd.v1"], "chatd.v1"), ([], None), (["chatd.v2"], None),
     (["CHATD.V1"], None)],
)
def test_choose_subprotocol(offered, chosen):
    """The first offered subprotocol we speak, exactly; None means plain JSON."""
    assert choose_subprotocol(offered, ("chatd.v1",)) == chosen


def test_deny_carries_status_and_reason():
    """Deny keeps status and reason as attributes."""
    deny = Deny(403, "origin not allowed")
    assert (deny.status, deny.reason) == (403, "origin not allowed")
