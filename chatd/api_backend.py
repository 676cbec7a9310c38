# -*- test-case-name: tests.test_api_backend -*-
"""
The server API's backend (L{chatd.api.IApiBackend}) over the broker, so it
works the same on one instance and across instances over Redis: what every
instance must see (presence, history, the published TALK) comes from the
broker, and what every instance must do (close a user's connections, take
them out of a room) goes through the broker's control commands, which
L{ControlDispatcher} carries out on each instance.
"""

import collections

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from chatd import errors
from chatd.api import History, IApiBackend, RoomPresence, UnknownRoom, UserPresence
from chatd.broker.interfaces import DISCONNECT, KICK
from chatd.logs import printable

log = Logger()

@implementer(IApiBackend)
class BrokerApiBackend:
    """
    L{IApiBackend} on an L{IBroker}.

    @param broker: the instance's broker (with webhooks on, the
        L{chatd.webhooks.AcceptingBroker} around it, so a publish reaches
        the webhook from this instance).
    """

    def __init__(self, broker):
        self._broker = broker

    def publish(self, request):
        """IApiBackend API"""
        d = defer.maybeDeferred(self._broker.publish, request.room, request.sender, request.message, request.cid)
        return d.addCallback(lambda talked: talked.event.id)

    def list_rooms(self):
        """IApiBackend API"""
        return self._broker.list_rooms()

    def room_presence(self, room):
        """IApiBackend API"""
        return defer.maybeDeferred(self._broker.members, room).addCallback(self._presence, room)

    @staticmethod
    def _presence(members, room):
        if members is None:
            raise UnknownRoom(room)
        names = {}
        counts = collections.Counter()
        for member in members:
            names.setdefault(member.sub, member.name)
            counts[member.sub] += 1
        users = tuple(UserPresence(sub, names[sub], counts[sub]) for sub in sorted(names))
        return RoomPresence(room, users)

    def history(self, query):
        """IApiBackend API"""
        d = defer.maybeDeferred(self._broker.history, query.room, query.since, query.limit)
        return d.addCallback(self._history, query.room)

    @staticmethod
    def _history(found, room):
        if found is None:
            raise UnknownRoom(room)
        events, complete = found
        return History(tuple(events), complete)

    def disconnect(self, request):
        """IApiBackend API"""
        return self._broker.disconnect(request.sub, request.reason)

    async def _kick(self, request):
        if await self._broker.members(request.room) is None:
            raise UnknownRoom(request.room)
        await self._broker.kick(request.room, request.sub)

    def kick(self, request):
        """IApiBackend API"""
        return defer.ensureDeferred(self._kick(request))


class ControlDispatcher:
    """
    Carries out the broker's control commands on this instance.

    @param connections_of: C{sub -> iterable} of this instance's open client
        connections of that user, each with C{close(code, reason)}.
    @param kick: C{(room, sub) -> Deferred}: take C{sub}'s connections here
        out of C{room} (the hub's part).
    """

    def __init__(self, connections_of, kick):
        self._connections_of = connections_of
        self._kick = kick

    def __call__(self, control):
        """The broker's control handler."""
        if control.op == DISCONNECT:
            closing = list(self._connections_of(control.sub))
            for connection in closing:
                connection.close(errors.CLOSE_DISCONNECTED, control.reason)
            if closing:
                log.info("api: closed {count} connections of {sub}", count=len(closing), sub=printable(control.sub))
        elif control.op == KICK:
            d = defer.maybeDeferred(self._kick, control.room, control.sub)
            d.addErrback(self._failed, control)
        else:
            log.warn("ignoring unknown control command {op}", op=printable(control.op))

    @staticmethod
    def _failed(failure, control):
        if failure.check(errors.BrokerUnavailable):
            log.warn("api: kick of {sub} from {room} stopped: broker unavailable",
                     sub=printable(control.sub), room=control.room)
            return None
        log.failure("api: kick of {sub} from {room} failed", failure, sub=printable(control.sub), room=control.room)
