# -*- test-case-name: tests.test_broker_contract,tests.test_broker_memory -*-
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

from chatd.broker.interfaces import DISCONNECT, KICK, Control, Delivery, Entered, IBroker, Member, Talked
from chatd.errors import RoomLimitReached, TooManyNewRooms
from chatd.rooms import DEFAULT_MAX_BYTES, DEFAULT_TTL, Room, id_counter
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
    @param max_bytes: C{[history] max_bytes}, TALK text kept per room.
    @param ttl: C{[history] ttl}, seconds an empty, quiet room is kept.
    @param max_new_rooms_per_user: C{[limits] max_new_rooms_per_user}.
    """

    log = Logger()

    def __init__(
        self, clock, history_size=500, instance_id=None, max_rooms=10000,
        max_bytes=DEFAULT_MAX_BYTES, ttl=DEFAULT_TTL, max_new_rooms_per_user=100,
    ):
        super().__init__()
        self.instance_id = instance_id or uuid.uuid4().hex[:12]
        self._clock = clock
        self._history_size = history_size
        self._max_rooms = max_rooms
        self._max_bytes = max_bytes
        self._ttl = ttl
        self._max_new_rooms_per_user = max_new_rooms_per_user
        self._epoch = int(clock.seconds() * 1000)
        self._counter = id_counter()
        self._rooms = {}
        self._made_by = {}  # room name -> sub of the member whose ENTER made it
        self._made = {}  # sub -> names of the rooms it made that are still held
        self._subscribed = set()
        self._tickets = TicketBook(clock)
        self._deliver = None
        self._control = None
        sweeper = TimerService(SWEEP_INTERVAL, self.sweep)
        sweeper.clock = clock
        sweeper.setServiceParent(self)

    def sweep(self):
        """
        The timer's work: forget used tickets, cids past their window, and
        rooms empty and quiet for C{ttl} (with their history).
        """
        now = self._clock.seconds()
        self._tickets.sweep()
        for name, room in list(self._rooms.items()):
            room.expire_cids(now)
            if room.expired(now, self._ttl):
                self._forget(name)

    def _held(self, name):
        """The room if the registry holds it (an expired one is forgotten first)."""
        room = self._rooms.get(name)
        if room is not None and room.expired(self._clock.seconds(), self._ttl):
            self._forget(name)
            room = None
        return room

    def _room(self, name, maker=None):
        room = self._held(name)
        if room is None:
            if maker is not None:
                if len(self._rooms) >= self._max_rooms:
                    self.sweep()  # expired rooms make space
                if len(self._rooms) >= self._max_rooms:
                    raise RoomLimitReached(name)
                if len(self._made.get(maker, ())) >= self._max_new_rooms_per_user:
                    raise TooManyNewRooms(self._max_new_rooms_per_user)
                self._made_by[name] = maker
                self._made.setdefault(maker, set()).add(name)
            room = self._rooms[name] = Room(
                name, self._epoch, self._counter, self._history_size, self._max_bytes
            )
        return room

    def _forget(self, name):
        del self._rooms[name]
        maker = self._made_by.pop(name, None)
        if maker is not None:
            made = self._made[maker]
            made.discard(name)
            if not made:
                del self._made[maker]

    def _publish(self, event, origin, ref):
        if event.room in self._subscribed and self._deliver is not None:
            self._deliver(Delivery(event, origin, ref))

    def set_feed(self, deliver, deliver_burst=None):
        # Each event is fanned out as it is published: there are no bursts.
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
        try:
            state = self._room(room, maker=member.sub)
        except (RoomLimitReached, TooManyNewRooms) as refused:
            return defer.fail(refused)
        event, replay, complete = state.enter(member, since, self._clock.seconds())
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
            self._forget(room)
        self._publish(event, member.connection_id, ref)
        return defer.succeed(event)

    def list_rooms(self):
        for name in list(self._rooms):
            self._held(name)
        return defer.succeed(sorted((name, room.users) for name, room in self._rooms.items()))

    def is_available(self):
        return True

    # --- the server API ----------------------------------------------------------

    def publish(self, room, sender, text, cid=None):
        """IBroker API"""
        state = self._held(room)
        if state is None:
            if len(self._rooms) >= self._max_rooms:
                self.sweep()
            if len(self._rooms) >= self._max_rooms:
                return defer.fail(RoomLimitReached(room))
            state = self._room(room)
        member = Member(f"{self.instance_id}:api", "", sender)  # "": no token's sub
        event, duplicate = state.talk(member, text, cid, self._clock.seconds(), system=True)
        if not duplicate:
            self._publish(event, member.connection_id, None)
        return defer.succeed(Talked(event, duplicate))

    def members(self, room):
        """IBroker API"""
        state = self._held(room)
        if state is None:
            return defer.succeed(None)
        return defer.succeed(tuple(sorted(state.members.values(), key=lambda m: m.connection_id)))

    def history(self, room, since=None, limit=100):
        """IBroker API"""
        state = self._held(room)
        if state is None:
            return defer.succeed(None)
        return defer.succeed(state.history_page(since, limit))

    def set_control(self, handler):
        """IBroker API"""
        self._control = handler

    def set_own_events(self, handler):
        """IBroker API: one instance; every event comes from a call, so this is never called."""

    def disconnect(self, sub, reason=""):
        """IBroker API"""
        self._tickets.void(sub)
        self._command(Control(DISCONNECT, sub, reason=reason))
        return defer.succeed(None)

    def kick(self, room, sub):
        """IBroker API"""
        self._command(Control(KICK, sub, room=room))
        return defer.succeed(None)

    def _command(self, control):
        if self._control is None:
            return
        try:
            self._control(control)
        except Exception:
            self.log.failure("carrying out {op} failed", op=control.op)
