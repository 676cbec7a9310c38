# -*- test-case-name: tests.test_broker_contract -*-
"""
The embedded broker: one instance's rooms and tickets in this process.

Everything happens synchronously inside each call, so the feed sees a room's
events in the order the calls were made and a TALK's acknowledgement reaches
its sender before the call's Deferred fires.  State is lost with the
process; event ids carry this process's start time (its epoch) so a client
that reconnects to a restarted server learns from C{complete: false} that it
may have missed something.
"""

import uuid

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from chatd.broker.interfaces import Delivery, Entered, IBroker, Talked
from chatd.errors import RoomLimitReached
from chatd.rooms import Room, id_counter
from chatd.tickets import TicketBook

SWEEP_INTERVAL = 60.0


@implementer(IBroker)
class MemoryBroker(MultiService):
    """
    The L{IBroker} of a single instance: rooms (L{chatd.rooms.Room}) and
    tickets in this process, each call answered before it returns.

    @param clock: an C{IReactorTime}: event times, epochs, ticket expiry.
    @param history_size: C{[history] size}, TALK events kept per room.
    @param instance_id: this instance's id (random when not given).
    @param max_rooms: C{[limits] max_rooms}, rooms the registry holds.
    """

    log = Logger()

    def __init__(self, clock, history_size=500, instance_id=None, max_rooms=10000):
        super().__init__()
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self._clock = clock
        self._history_size = history_size
        self._max_rooms = max_rooms
        self._epoch = int(clock.seconds() * 1000)
        self._counter = id_counter()
        self._rooms = {}
        self._subscribed = set()
        self._tickets = TicketBook(clock)
        self._deliver = None
        sweeper = TimerService(SWEEP_INTERVAL, self._tickets.sweep)
        sweeper.clock = clock
        sweeper.setServiceParent(self)

    def _room(self, name):
        room = self._rooms.get(name)
        if room is None:
            room = self._rooms[name] = Room(name, self._epoch, self._counter, self._history_size)
        return room

    def _publish(self, event, origin, ref):
        if event.room in self._subscribed and self._deliver is not None:
            self._deliver(Delivery(event, origin, ref))

    def set_feed(self, deliver):
        self._deliver = deliver

    def subscribe(self, room):
        self._subscribed.add(room)
        return defer.succeed(None)

    def unsubscribe(self, room):
        self._subscribed.discard(room)
        return defer.succeed(None)

    def issue_ticket(self, ticket, grant, ttl):
        self._tickets.issue(ticket, grant, ttl)
        return defer.succeed(None)

    def redeem_ticket(self, ticket):
        return defer.succeed(self._tickets.redeem(ticket))

    def enter(self, room, member, since=None, ref=None):
        if room not in self._rooms and len(self._rooms) >= self._max_rooms:
            return defer.fail(RoomLimitReached(room))
        event, replay, complete = self._room(room).enter(member, since, self._clock.seconds())
        self._publish(event, member.connection_id, ref)
        return defer.succeed(Entered(event, replay, complete))

    def talk(self, room, member, text, cid=None, ref=None):
        event, duplicate = self._room(room).talk(member, text, cid, self._clock.seconds())
        if not duplicate:
            self._publish(event, member.connection_id, ref)
        return defer.succeed(Talked(event, duplicate))

    def quit(self, room, member, ref=None):
        state = self._room(room)
        event = state.quit(member, self._clock.seconds())
        if state.forgettable:
            del self._rooms[room]
        self._publish(event, member.connection_id, ref)
        return defer.succeed(event)

    def list_rooms(self):
        return defer.succeed(sorted((name, room.users) for name, room in self._rooms.items()))

    def is_available(self):
        return True
