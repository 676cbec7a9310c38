# -*- test-case-name: tests.test_session -*-
"""
One authenticated connection's conversation: commands in, events out.

No Autobahn here: L{chatd.ws} feeds text in and provides the connection
(see L{chatd.hub.IConnection}).  Per-connection rules live
here: rate limit, rooms per connection, the token's expiry and its renewal
by AUTH.
"""

from twisted.internet import defer
from twisted.logger import Logger

from chatd import errors, messages
from chatd.auth import InvalidToken
from chatd.broker.interfaces import Member
from chatd.errors import (
    AlreadyInRoom, BrokerUnavailable, Forbidden, NotMember, ProtocolError, RoomLimitReached,
    TooManyNewRooms, TooManyRooms,
)
from chatd.limits import TokenBucket
from chatd.logs import printable

log = Logger()

# Strikes (rate_limited answers) are forgiven at this pace, so only
# sustained flooding ends in 1008, not a long life of occasional bursts.
STRIKES_FORGIVEN_PER_SECOND = 1.0

# The one table from domain refusals (L{chatd.errors.ChatError}) to ERROR
# events: kind -> (code, message, formatted with the exception's fields).
# Subclasses before their bases; anything not here is unexpected (logged
# once, answered unavailable).  docs/protocol.md lists the codes.
ERROR_TABLE = (
    (NotMember, errors.NOT_MEMBER, "not in {room}"),
    (AlreadyInRoom, errors.BAD_REQUEST, "already in {room}"),
    (Forbidden, errors.FORBIDDEN, "your token does not allow {room}"),
    (TooManyRooms, errors.FORBIDDEN, "at most {limit} rooms per connection"),
    (RoomLimitReached, errors.FORBIDDEN, "no new rooms: this server holds its maximum"),
    (TooManyNewRooms, errors.FORBIDDEN, "you made {limit} rooms that still exist; use one of those"),
    (BrokerUnavailable, errors.UNAVAILABLE, "chat is unavailable, try again"),
)


def protocol_error(exc, ref=None):
    """
    The ERROR for a domain refusal.

    @param exc: a L{chatd.errors.ChatError} (or a L{ProtocolError}, returned
        as it is).
    @param ref: the C{ref} of the client message refused.
    @return: a L{ProtocolError}, or L{None} when C{exc} is of no known kind.
    """
    if isinstance(exc, ProtocolError):
        return exc
    for kind, code, text in ERROR_TABLE:
        if isinstance(exc, kind):
            return ProtocolError(code, text.format(**vars(exc)), ref)
    return None


class Expiries:
    """
    The sessions' token expiries on one clock: one clock call per distinct
    C{exp}, running every session whose token expires then, not one per
    session.  Tokens are issued by the second, so many share an C{exp};
    a clock call is a C{DelayedCall} and three bound methods, and an idle
    connection's every object is work for the cyclic garbage collector
    (docs/performance.md).  A session is due at C{exp} (at once when that
    has passed), as with a clock call of its own.

    @param clock: an C{IReactorTime}.
    """

    def __init__(self, clock):
        self._clock = clock
        self._due = {}  # exp -> ({session: None}, its clock call)

    def add(self, exp, session):
        """Call C{session.expired()} at C{exp}."""
        due = self._due.get(exp)
        if due is None:
            call = self._clock.callLater(max(0.0, exp - self._clock.seconds()), self._run, exp)
            due = self._due[exp] = ({}, call)
        due[0][session] = None

    def remove(self, exp, session):
        """Do not call C{session.expired()} at C{exp} (a no-op if it is not due then)."""
        due = self._due.get(exp)
        if due is not None and due[0].pop(session, _NOT_DUE) is not _NOT_DUE and not due[0]:
            del self._due[exp]
            due[1].cancel()

    def _run(self, exp):
        sessions, _ = self._due.pop(exp)
        for session in sessions:
            session.expired()


_NOT_DUE = object()


class Session:
    """
    One authenticated connection's conversation.

    @param principal: the L{chatd.auth.Principal} the ticket granted.
    @param connection: an L{chatd.hub.IConnection}.
    @param hub: the instance's L{chatd.hub.Hub}.
    @param verifier: checks AUTH's fresh tokens (C{verify(token)}).
    @param limits: the C{[limits]} settings.
    @param clock: an C{IReactorTime}, for the rate limit and the expiry.
    @param metrics: a L{chatd.metrics.Metrics} counting messages by type and
        ERRORs by code, or L{None}.
    @param expiries: the L{Expiries} on C{clock} that close sessions when
        their token expires (a server's sessions share one), or L{None} for
        one of its own.
    """

    # One per connection: no per-instance dict.
    __slots__ = (
        "principal", "member", "_connection", "_hub", "_verifier", "_limits", "_clock", "_bucket",
        "_patience", "_expiry", "_closed", "_metrics", "_expiries",
    )

    def __init__(self, principal, connection, hub, verifier, limits, clock, metrics=None, expiries=None):
        self.principal = principal
        self.member = Member(connection.connection_id, principal.sub, principal.name)
        self._connection = connection
        self._hub = hub
        self._verifier = verifier
        self._limits = limits
        self._clock = clock
        # Both buckets are made when first needed: a bucket starts full and
        # a full one stays full, so one made then reads as one made now,
        # and an idle connection's every object is work for the cyclic
        # garbage collector (docs/performance.md).
        self._bucket = None
        self._patience = None
        self._expiry = None  # the exp this session is due to expire at (Expiries)
        self._closed = False
        self._metrics = metrics
        self._expiries = expiries if expiries is not None else Expiries(clock)

    def open(self):
        """The connection is open: WELCOME, and close at the token's exp."""
        self._connection.send_text(messages.welcome(self.principal.name, self.principal.exp))
        self._schedule_expiry()

    def closed(self):
        """The connection is gone: it quits every room it was in."""
        self._closed = True
        if self._expiry is not None:
            self._expiries.remove(self._expiry, self)
            self._expiry = None
        return self._hub.leave_all(self.member.connection_id)

    def received(self, text):
        """
        Handle one text frame.

        @return: a Deferred that fires when the frame was answered; it never
            fails: refusals (L{ProtocolError}, and the domain's
            L{chatd.errors.ChatError} through L{ERROR_TABLE}) become ERROR
            events with the message's C{ref}.
        """
        bucket = self._bucket
        if bucket is None:
            bucket = self._bucket = TokenBucket(self._limits.rate, self._limits.burst, self._clock)
        if not bucket.take():
            if self._metrics is not None:
                self._metrics.count_received(None)  # not read: "other"
            patience = self._patience
            if patience is None:
                # Room for abuse_strikes - 1 strikes; the next one closes (1008).
                patience = self._patience = TokenBucket(
                    STRIKES_FORGIVEN_PER_SECOND, self._limits.abuse_strikes - 1, self._clock
                )
            if not patience.take():
                self._connection.close(errors.CLOSE_POLICY_VIOLATION, "rate limit exceeded")
                return defer.succeed(None)
            self._send_error(ProtocolError(errors.RATE_LIMITED, "slow down"))
            return defer.succeed(None)
        try:
            command = messages.parse_client_message(text, self._limits.max_talk_chars)
        except ProtocolError as e:
            if self._metrics is not None:
                self._metrics.count_received(None)
            self._send_error(e)
            return defer.succeed(None)
        if self._metrics is not None:
            self._metrics.count_received(command.kind)
        if command.__class__ is messages.Talk:
            # Every chat message: a plain call (the embedded broker answers
            # it at once), not a coroutine (docs/performance.md).
            try:
                d = self._hub.talk(
                    command.room, self.member, self._connection, command.message, command.cid, command.ref
                )
            except Exception:
                d = defer.fail()
        else:
            d = defer.ensureDeferred(self._dispatch(command))
        d.addErrback(self._failed, command)
        return d

    async def _dispatch(self, command):
        connection = self._connection
        if isinstance(command, messages.Enter):
            if not self.principal.may_enter(command.room):
                raise Forbidden(command.room)
            if len(self._hub.rooms_of(self.member.connection_id)) >= self._limits.max_rooms_per_connection:
                raise TooManyRooms(self._limits.max_rooms_per_connection)
            await self._hub.enter(command.room, self.member, connection, command.since, command.ref)
        elif isinstance(command, messages.Quit):
            await self._hub.quit(command.room, self.member, connection, command.ref)
        elif isinstance(command, messages.Auth):
            self._renew(command)

    def _renew(self, command):
        try:
            principal = self._verifier.verify(command.token)
        except InvalidToken as e:
            raise ProtocolError(errors.UNAUTHORIZED, str(e), command.ref) from None
        if principal.sub != self.principal.sub:
            raise ProtocolError(errors.UNAUTHORIZED, "token is for another user", command.ref)
        # The name stays: members already know this connection by it.
        self.principal = principal.__class__(
            sub=principal.sub, name=self.principal.name, exp=principal.exp, rooms=principal.rooms
        )
        self._connection.send_text(messages.welcome(self.principal.name, self.principal.exp, command.ref))
        self._schedule_expiry()
        # A narrower rooms claim: leave what the new token no longer allows.
        connection_id = self.member.connection_id
        barred = sorted(r for r in self._hub.rooms_of(connection_id) if not self.principal.may_enter(r))
        if barred:
            self._hub.leave(connection_id, barred)
            for room in barred:
                self._send_error(protocol_error(Forbidden(room), command.ref))

    def _schedule_expiry(self):
        if self._expiry is not None:
            self._expiries.remove(self._expiry, self)
        self._expiry = self.principal.exp
        self._expiries.add(self._expiry, self)

    def expired(self):
        """The token expired (L{Expiries} calls this): close the connection."""
        self._expiry = None
        if not self._closed:
            log.info("token of {user} expired; closing", user=printable(self.principal.name))
            self._connection.close(errors.CLOSE_TOKEN_EXPIRED, "token expired")

    def _send_error(self, error):
        if not self._closed:
            if self._metrics is not None:
                self._metrics.count_error(error.code)
            self._connection.send_text(messages.error(error.code, error.message, error.ref))

    def _failed(self, failure, command):
        ref = getattr(command, "ref", None)
        error = protocol_error(failure.value, ref)
        if error is None:
            log.failure(
                "unexpected error handling {command} from {user}",
                failure, command=type(command).__name__, user=printable(self.principal.name),
            )
            error = ProtocolError(errors.UNAVAILABLE, "internal error, try again", ref)
        self._send_error(error)
