# -*- test-case-name: tests.test_handshake -*-
"""
The decisions taken on a WebSocket upgrade request before it is accepted.

Pure functions; L{chatd.ws} applies them in C{onConnect}.  The Origin check
is ours rather than Autobahn's C{allowedOrigins}, which answers 400: the
contract is 403, and origins match exactly (scheme, host and port).
"""

from chatd import errors


class Deny(Exception):
    """Refuse the upgrade with an HTTP status and a short ASCII reason."""

    def __init__(self, status, reason):
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


def check_origin(origin, allowed_origins):
    """
    @param origin: the request's C{Origin} header, or L{None} when absent.
    @raise Deny: 403 when a browser's origin is not allowed.  Non-browser
        clients send no Origin and are not held to it.
    """
    if origin is None or "*" in allowed_origins:
        return
    if origin.lower().rstrip("/") not in {o.lower().rstrip("/") for o in allowed_origins}:
        raise Deny(errors.HTTP_FORBIDDEN, "origin not allowed")


def ticket_from_params(params):
    """
    @param params: the query as Autobahn parses it (C{parse_qs}: name to a
        list of values).
    @return: the one ticket.
    @raise Deny: 401 when there is no ticket, or more than one.
    """
    values = params.get("ticket", [])
    if len(values) != 1 or not values[0] or len(values[0]) > 256:
        raise Deny(errors.HTTP_UNAUTHORIZED, "ticket required")
    return values[0]


def check_grant(grant, now):
    """
    @param grant: the L{chatd.auth.Principal} a redeemed ticket carried, or
        L{None} when redemption failed.
    @raise Deny: 401 for an unknown, used or expired ticket, or an expired
        token behind it.
    """
    if grant is None:
        raise Deny(errors.HTTP_UNAUTHORIZED, "invalid ticket")
    if grant.exp <= now:
        raise Deny(errors.HTTP_UNAUTHORIZED, "token expired")
    return grant


def choose_subprotocol(offered, supported):
    """The first offered subprotocol we speak; L{None} means plain JSON."""
    for name in offered:
        if name in supported:
            return name
    return None
