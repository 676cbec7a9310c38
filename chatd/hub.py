# -*- test-case-name: tests.test_hub -*-
"""
Local fan-out: which of this instance's connections are in which room.

The hub subscribes to a room's feed at the broker when its first local
member enters and unsubscribes when the last one leaves.  Each event off the
feed is encoded (and, through C{prepare}, framed) once per instance and sent
to every local member; only the actor's copy, which echoes its C{ref}, is
encoded again.

Ordering: a member sees a room's events in feed order, never one twice.
Each seat remembers the newest id it was sent (its floor) and drops anything
at or below it; while an ENTER is in flight its seat buffers the feed, so
nothing published between the subscription and the ENTER's reply is lost.
"""

import dataclasses
from typing import Any, Callable, Dict, List, Optional

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from chatd import errors, messages
from chatd.broker.interfaces import Delivery
from chatd.errors import BrokerUnavailable, ProtocolError, RoomLimitReached
from chatd.logs import printable
from chatd.messages import event_id_key

log = Logger()


class IConnection(Interface):
    """What the hub needs of a connection (L{chatd.ws} provides it)."""

    connection_id = Attribute("Unique across instances.")

    def send_text(text):
        """Send one text frame to this connection only."""

    def send_shared(frame):
        """Send a frame made by the hub's C{prepare}, shared by many connections."""


@dataclasses.dataclass
class _Seat:
    connection: Any
    member: Any
    floor: tuple = ()
    pending: Optional[List[Any]] = dataclasses.field(default_factory=list)  # None once live
    quitting: bool = False


_PENDING = object()


class _LocalRoom:
    def __init__(self, subscribed):
        self.seats: Dict[str, _Seat] = {}
        self._outcome = _PENDING  # None, or the subscription's Failure
        self._waiters = []
        subscribed.addBoth(self._settle)

    def _settle(self, result):
        self._outcome = result if isinstance(result, defer.Failure) else None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if self._outcome is None:
                waiter.callback(None)
            else:
                waiter.errback(self._outcome)
        return None  # a failure is handed to each waiter

    def ready(self):
        """A fresh Deferred that fires once the subscription is in place."""
        if self._outcome is _PENDING:
            waiter = defer.Deferred()
            self._waiters.append(waiter)
            return waiter
        if self._outcome is not None:
            return defer.fail(self._outcome)
        return defer.succeed(None)


class Hub:
    def __init__(self, broker, prepare: Callable[[str], Any] = lambda text: text):
        self._broker = broker
        self._prepare = prepare
        self._rooms: Dict[str, _LocalRoom] = {}
        self._rooms_of: Dict[str, set] = {}  # connection id -> room names
        broker.set_feed(self.deliver)

    # --- what connections ask -------------------------------------------------

    def rooms_of(self, connection_id):
        return frozenset(self._rooms_of.get(connection_id, ()))

    def local_users(self, room):
        local = self._rooms.get(room)
        return len(local.seats) if local else 0

    async def enter(self, room, member, connection, since=None, ref=None):
        cid = member.connection_id
        local = self._rooms.get(room)
        if local is not None and cid in local.seats:
            raise ProtocolError(errors.BAD_REQUEST, f"already in {room}", ref)
        if local is None:
            local = self._rooms[room] = _LocalRoom(
                defer.maybeDeferred(self._broker.subscribe, room)
            )
        seat = local.seats[cid] = _Seat(connection, member)
        self._rooms_of.setdefault(cid, set()).add(room)
        try:
            await local.ready()
            entered = await self._broker.enter(room, member, since, ref)
        except BrokerUnavailable:
            self._unseat(room, cid)
            raise ProtocolError(errors.UNAVAILABLE, "chat is unavailable, try again", ref)
        except RoomLimitReached:
            self._unseat(room, cid)
            raise ProtocolError(errors.FORBIDDEN, "no new rooms: this server holds its maximum", ref)
        if local.seats.get(cid) is not seat:
            return  # the connection closed while entering; leave_all quit for it
        if since is not None:
            for event in entered.replay:
                connection.send_text(messages.event(event))
            connection.send_text(
                messages.replay_marker(room, len(entered.replay), entered.complete, ref)
            )
        pending, seat.pending = seat.pending, None
        own = event_id_key(entered.event.id)
        if not any(event_id_key(d.event.id) == own for d in pending):
            # The feed has not brought our ENTER yet: nothing at or after it
            # has arrived either, so sending it now keeps the order.
            self._send(seat, Delivery(entered.event, cid, ref), None)
        for delivery in pending:
            if event_id_key(delivery.event.id) >= own:
                self._send(seat, delivery, None)
        seat.floor = max(seat.floor, own)

    async def talk(self, room, member, connection, text, cid=None, ref=None):
        self._seat_of(room, member, ref)
        try:
            talked = await self._broker.talk(room, member, text, cid, ref)
        except BrokerUnavailable:
            raise ProtocolError(errors.UNAVAILABLE, "message not accepted, try again", ref)
        if talked.duplicate:
            # Already accepted once: the original, same id, is the ack.
            connection.send_text(messages.event(talked.event, ref))

    async def quit(self, room, member, connection, ref=None):
        seat = self._seat_of(room, member, ref)
        seat.quitting = True
        try:
            event = await self._broker.quit(room, member, ref)
        except BrokerUnavailable:
            seat.quitting = False
            raise ProtocolError(errors.UNAVAILABLE, "could not leave, try again", ref)
        local = self._rooms.get(room)
        if local is not None and local.seats.get(member.connection_id) is seat:
            # The feed has not brought our QUIT yet; it is our last event.
            if event_id_key(event.id) > seat.floor:
                connection.send_text(messages.event(event, ref))
            self._unseat(room, member.connection_id)

    def leave_all(self, connection_id):
        """
        A connection closed: it quits every room it was in.  Returns a
        Deferred that fires when the broker heard of every QUIT.
        """
        quits = []
        for room in sorted(self._rooms_of.get(connection_id, ())):
            seat = self._unseat(room, connection_id)
            if seat is None or seat.quitting:
                continue
            d = defer.maybeDeferred(self._broker.quit, room, seat.member)
            d.addErrback(self._quit_failed, room, seat.member)
            quits.append(d)
        return defer.gatherResults(quits, consumeErrors=True)

    # --- the feed -------------------------------------------------------------

    def deliver(self, delivery):
        """L{chatd.broker.interfaces.IBroker.set_feed} target."""
        local = self._rooms.get(delivery.event.room)
        if local is None:
            return
        shared = []
        key = event_id_key(delivery.event.id)
        for cid, seat in list(local.seats.items()):
            if seat.pending is not None:
                seat.pending.append(delivery)
                continue
            if key <= seat.floor:
                continue
            self._send(seat, delivery, shared)
            seat.floor = key
            if cid == delivery.origin and delivery.event.type == messages.QUIT:
                self._unseat(delivery.event.room, cid)

    def _send(self, seat, delivery, shared):
        connection = seat.connection
        if delivery.origin == seat.member.connection_id and delivery.ref is not None:
            connection.send_text(messages.event(delivery.event, delivery.ref))
            return
        if shared is None:
            connection.send_text(messages.event(delivery.event))
            return
        if not shared:
            shared.append(self._prepare(messages.event(delivery.event)))
        connection.send_shared(shared[0])

    # --- bookkeeping ----------------------------------------------------------

    def _seat_of(self, room, member, ref):
        local = self._rooms.get(room)
        seat = local.seats.get(member.connection_id) if local else None
        if seat is None or seat.pending is not None or seat.quitting:
            raise ProtocolError(errors.NOT_MEMBER, f"not in {room}", ref)
        return seat

    def _unseat(self, room, connection_id):
        local = self._rooms.get(room)
        seat = local.seats.pop(connection_id, None) if local else None
        rooms = self._rooms_of.get(connection_id)
        if rooms is not None:
            rooms.discard(room)
            if not rooms:
                del self._rooms_of[connection_id]
        if local is not None and not local.seats:
            del self._rooms[room]
            d = defer.maybeDeferred(self._broker.unsubscribe, room)
            d.addErrback(lambda f: log.warn(
                "could not unsubscribe from {room}: {why}", room=printable(room),
                why=f.getErrorMessage()))
        return seat

    def _quit_failed(self, failure, room, member):
        failure.trap(BrokerUnavailable)
        log.warn(
            "QUIT of {user} from {room} not recorded: {why}",
            user=printable(member.name), room=printable(room), why=failure.getErrorMessage(),
        )
