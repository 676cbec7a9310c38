# -*- test-case-name: tests.test_session -*-
"""
One authenticated connection's conversation: commands in, events out.

No Autobahn here: L{chatd.ws} feeds text in and provides the connection
(see L{chatd.hub.IConnection} plus C{close}).  Per-connection rules live
here: rate limit, rooms per connection, the token's expiry and its renewal
by AUTH.
"""

from twisted.internet import defer
from twisted.logger import Logger

from chatd import errors, messages
from chatd.auth import InvalidToken
from chatd.broker.interfaces import Member
from chatd.errors import ProtocolError
from chatd.limits import TokenBucket
from chatd.logs import printable

log = Logger()

# Strikes (rate_limited answers) are forgiven at this pace, so only
# sustained flooding ends in 1008, not a long life of occasional bursts.
STRIKES_FORGIVEN_PER_SECOND = 1.0


class Session:
    def __init__(self, principal, connection, hub, verifier, limits, clock):
        self.principal = principal
        self.member = Member(connection.connection_id, principal.sub, principal.name)
        self._connection = connection
        self._hub = hub
        self._verifier = verifier
        self._limits = limits
        self._clock = clock
        self._bucket = TokenBucket(limits.rate, limits.burst, clock)
        # Room for abuse_strikes - 1 strikes; the next one closes (1008).
        self._patience = TokenBucket(
            STRIKES_FORGIVEN_PER_SECOND, limits.abuse_strikes - 1, clock
        )
        self._expiry = None
        self._closed = False

    def open(self):
        self._connection.send_text(messages.welcome(self.principal.name, self.principal.exp))
        self._schedule_expiry()

    def closed(self):
        """The connection is gone: it quits every room it was in."""
        self._closed = True
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        return self._hub.leave_all(self.member.connection_id)

    def received(self, text):
        """
        Handle one text frame.  Returns a Deferred that fires when the frame
        was answered; it never fails (errors become ERROR events).
        """
        if not self._bucket.take():
            if not self._patience.take():
                self._connection.close(errors.CLOSE_POLICY_VIOLATION, "rate limit exceeded")
                return defer.succeed(None)
            self._send_error(ProtocolError(errors.RATE_LIMITED, "slow down"))
            return defer.succeed(None)
        try:
            command = messages.parse_client_message(text, self._limits.max_talk_chars)
        except ProtocolError as e:
            self._send_error(e)
            return defer.succeed(None)
        d = defer.ensureDeferred(self._dispatch(command))
        d.addErrback(self._failed, command)
        return d

    async def _dispatch(self, command):
        connection = self._connection
        if isinstance(command, messages.Talk):
            await self._hub.talk(
                command.room, self.member, connection, command.message, command.cid, command.ref
            )
        elif isinstance(command, messages.Enter):
            if not self.principal.may_enter(command.room):
                raise ProtocolError(errors.FORBIDDEN, f"your token does not allow {command.room}", command.ref)
            if len(self._hub.rooms_of(self.member.connection_id)) >= self._limits.max_rooms_per_connection:
                raise ProtocolError(
                    errors.FORBIDDEN,
                    f"at most {self._limits.max_rooms_per_connection} rooms per connection",
                    command.ref,
                )
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

    def _schedule_expiry(self):
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        delay = max(0.0, self.principal.exp - self._clock.seconds())
        self._expiry = self._clock.callLater(delay, self._expired)

    def _expired(self):
        if not self._closed:
            log.info("token of {user} expired; closing", user=printable(self.principal.name))
            self._connection.close(errors.CLOSE_TOKEN_EXPIRED, "token expired")

    def _send_error(self, error):
        if not self._closed:
            self._connection.send_text(messages.error(error.code, error.message, error.ref))

    def _failed(self, failure, command):
        if failure.check(ProtocolError):
            self._send_error(failure.value)
            return None
        log.failure(
            "unexpected error handling {command} from {user}",
            failure, command=type(command).__name__, user=printable(self.principal.name),
        )
        self._send_error(
            ProtocolError(errors.UNAVAILABLE, "internal error, try again", getattr(command, "ref", None))
        )
