# -*- test-case-name: tests.test_hub -*-
"""
Local fan-out: which of this instance's connections are in which room.

The hub subscribes to a room's feed at the broker when its first local
member enters and unsubscribes when the last one leaves (the
L{chatd.seats.SeatRegistry} says which is which).  Each event off the feed
is encoded once per instance and the same C{str} is handed to every local
member's C{send_shared}, so the WebSocket layer can frame it once; only the
actor's copy, which echoes its C{ref}, is encoded again.

Ordering: a member sees a room's events in feed order, never one twice.
Each seat remembers the newest id it was sent (its floor) and drops anything
at or below it; while an ENTER is in flight its seat buffers the feed, so
nothing published between the subscription and the ENTER's reply is lost
(L{chatd.seats.Seat.go_live}).

Refusals are domain exceptions (L{chatd.errors.ChatError}); the session
turns them into ERROR events.
"""

from typing import Dict

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface

from chatd import errors, messages
from chatd.broker.interfaces import Delivery
from chatd.errors import AlreadyInRoom, BrokerUnavailable, NotMember
from chatd.logs import printable
from chatd.messages import event_id_key
from chatd.observer import OneShotObserverList
from chatd.seats import ENTERING, QUITTING, Seat, SeatRegistry

log = Logger()

DEFAULT_MAX_PENDING_BYTES = 4 * 1024 * 1024  # [limits] max_send_buffer_bytes


class IConnection(Interface):
    """What the hub and the session need of a connection (L{chatd.ws} provides it)."""

    connection_id = Attribute("Unique across instances.")

    def send_text(text):
        """Send one text frame to this connection only."""

    def send_shared(text):
        """
        Send C{text}, a C{str} the hub hands to many connections for one
        event (the very same object to each), so the transport may frame it
        once and reuse the frame.
        """

    def close(code, reason):
        """Close with a WebSocket close C{code} and a short C{reason}, once."""

    def when_drained():
        """
        A Deferred that fires once the connection's send buffer is below its
        high-water mark again (at once when it is), or the connection is
        gone.  The replay waits for it between events, so a catch-up goes at
        the client's read speed and never counts against the slow-consumer
        cap.
        """


class Hub:
    """
    This instance's rooms: seats, subscriptions and the fan-out of the
    broker's feed to local connections.

    @param broker: an L{chatd.broker.interfaces.IBroker}; the hub becomes
        its feed.
    @param max_pending_bytes: how much of the room's live feed a seat may
        buffer while its ENTER (and replay) is under way; past it the
        connection is a slow consumer and is closed with 4008.
    @param flush_writes: a callable that writes out now what this reactor
        turn wrote to connections so far (the TLS layer's
        L{chatd.tls.TurnFlush.flush_now}); without it a burst
        is fanned out one event at a time.
    """

    SLICE = 64  # members per slice of a burst's fan-out (deliver_burst)

    def __init__(self, broker, max_pending_bytes=DEFAULT_MAX_PENDING_BYTES, flush_writes=None):
        self.flush_writes = flush_writes
        self._broker = broker
        self._max_pending_bytes = max_pending_bytes
        self._seats = SeatRegistry()
        self._subscribed: Dict[str, OneShotObserverList] = {}
        broker.set_feed(self.deliver, self.deliver_burst)

    # --- what connections ask -------------------------------------------------

    def rooms_of(self, connection_id):
        """
        @return: the rooms the connection has a seat in (entering, in, or
            leaving), as a frozenset.
        """
        return self._seats.rooms_of(connection_id)

    def room_count(self):
        """Rooms with a local member."""
        return self._seats.room_count()

    def local_users(self, room):
        """@return: how many of this instance's connections have a seat in C{room}."""
        return self._seats.count(room)

    async def enter(self, room, member, connection, since=None, ref=None):
        """
        Seat C{member} in C{room}: subscribe if it is the room's first local
        seat, ENTER at the broker, send the replay (with C{since}) and the
        REPLAY marker, then go live, starting with the own ENTER.

        Any failure leaves no seat (and no member at the broker, as far as
        it can be told).

        @param connection: the member's L{IConnection}.
        @param since: the last event id the client saw in C{room}, or L{None}.
        @param ref: the client's C{ref}, echoed on the own ENTER and REPLAY.
        @raise AlreadyInRoom: the connection has a seat there already.
        @raise NotMember: the connection was made to leave while entering.
        @raise BrokerUnavailable: the broker could not take the ENTER.
        @raise RoomLimitReached: a new room, with the registry full.
        @raise TooManyNewRooms: a new room, with this user's share of the
            registry taken.
        """
        connection_id = member.connection_id
        seat = Seat(connection, member)
        try:
            is_first = self._seats.add(room, seat)
        except KeyError:
            raise AlreadyInRoom(room) from None
        if is_first:
            subscription = self._subscribed[room] = OneShotObserverList()
            defer.maybeDeferred(self._broker.subscribe, room).addBoth(subscription.fire)
        entered = None
        try:
            await self._subscribed[room].when_fired()
            if self._seats.get(room, connection_id) is not seat:
                raise NotMember(room)  # made to leave before the broker heard of it
            entered = await self._broker.enter(room, member, since, ref)
            if self._seats.get(room, connection_id) is not seat:
                # Made to leave while the ENTER was in flight: leave() left
                # the broker to us, since it could not know the ENTER's fate.
                self._quit_at_broker(room, member)
                raise NotMember(room)
            seat.at_broker = True
            if since is not None:
                await self._replay(room, seat, entered.replay)
                connection.send_text(
                    messages.replay_marker(room, len(entered.replay), entered.complete, ref)
                )
            for delivery in seat.go_live(Delivery(entered.event, connection_id, ref)):
                self._send(seat, delivery)
        except BaseException:
            if self._drop(room, connection_id, seat) is not None and entered is not None:
                # The broker has the member; tell it the member is gone.
                self._quit_at_broker(room, member)
            raise

    async def _replay(self, room, seat, events):
        # At the client's read speed: whenever the send buffer is full, wait
        # for it to drain; the seat buffers the live feed meanwhile.
        connection = seat.connection
        for event in events:
            connection.send_text(messages.event(event))
            drained = connection.when_drained()
            if not drained.called:
                await drained
                if self._seats.get(room, seat.member.connection_id) is not seat:
                    raise NotMember(room)  # made to leave meanwhile (and quit for)

    def talk(self, room, member, connection, text, cid=None, ref=None):
        """
        Store and publish a TALK; the own copy (with C{ref}) comes off the
        feed.  A repeated C{cid} is answered with the original event.

        A plain call, not a coroutine: with the embedded broker the TALK is
        stored, fanned out and acknowledged before this returns, and this is
        the path of every chat message (docs/performance.md).

        @param cid: the client's message id, for deduplication, or L{None}.
        @return: a Deferred that fires (with L{None}) once the broker took
            it; it fails with L{NotMember} (no live seat in C{room}) or
            L{BrokerUnavailable} (not known to be stored).
        """
        try:
            self._member_seat(room, member)
        except NotMember:
            return defer.fail()
        return self._broker.talk(room, member, text, cid, ref).addCallback(self._talked, connection, ref)

    @staticmethod
    def _talked(talked, connection, ref):
        if talked.duplicate:
            # Already accepted once: the original, same id, is the ack.
            connection.send_text(messages.event(talked.event, ref))

    async def quit(self, room, member, connection, ref=None):
        """
        Leave C{room}.  The own QUIT (with C{ref}) is the last event the
        connection gets from the room.

        @raise NotMember: no live seat in C{room}.
        @raise BrokerUnavailable: the broker did not take the QUIT; the
            member stays in.
        """
        seat = self._member_seat(room, member)
        seat.start_quit()
        try:
            event = await self._broker.quit(room, member, ref)
        except BaseException:
            if seat.state == QUITTING:
                seat.quit_failed()
            raise
        if self._seats.get(room, member.connection_id) is seat:
            # The feed has not brought our QUIT yet; it is our last event.
            if seat.offer(Delivery(event, member.connection_id, ref)):
                connection.send_text(messages.event(event, ref))
            self._drop(room, member.connection_id, seat)

    def leave(self, connection_id, rooms):
        """
        Take the connection out of C{rooms} at once (nothing more is sent to
        it from them) and QUIT each at the broker; the connection gets no
        QUIT of its own.

        @return: a Deferred that fires when the broker heard of every QUIT;
            it never fails (failures are logged).
        """
        quits = []
        for room in sorted(rooms):
            seat = self._seats.get(room, connection_id)
            if seat is not None:
                quits.append(self._evict(room, seat))
        return defer.gatherResults(quits, consumeErrors=True)

    def kick(self, room, sub):
        """
        The server API's kick, on this instance: every local seat of user
        C{sub} in C{room} leaves at once and gets ERROR C{forbidden}
        "removed from R" instead of its own QUIT; the room sees the QUIT
        (through the broker), and the connections stay open.

        @return: a Deferred that fires when the broker heard of every QUIT;
            it never fails (failures are logged).
        """
        seats = [seat for seat in self._seats.seats(room) if seat.member.sub == sub]
        for seat in seats:
            # All out before any QUIT is published: none of them sees another's.
            self._drop(room, seat.member.connection_id, seat)
            seat.connection.send_text(messages.error(errors.FORBIDDEN, f"removed from {room}"))
        quits = [
            self._quit_at_broker(room, seat.member)
            for seat in seats
            if seat.state != QUITTING and seat.at_broker  # else quit for elsewhere, as in _evict
        ]
        if seats:
            log.info("{count} connections of {sub} removed from {room}",
                     count=len(seats), sub=printable(sub), room=printable(room))
        return defer.gatherResults(quits, consumeErrors=True)

    def leave_all(self, connection_id):
        """
        A connection closed: it quits every room it was in.

        @return: a Deferred that fires when the broker heard of every QUIT.
        """
        return self.leave(connection_id, self._seats.rooms_of(connection_id))

    # --- the feed -------------------------------------------------------------

    def deliver(self, delivery):
        """
        L{chatd.broker.interfaces.IBroker.set_feed} target: send one event
        to every local seat in its room.  The text is encoded once and the
        event id parsed once; the actor's copy is that text with its C{ref}
        spliced in; nothing else is done per seat but the seat's own check
        and the write (this loop runs once per member).
        """
        room = delivery.event.room
        seats = self._seats.seats(room)
        if seats:
            self._fan_out(room, seats, delivery, event_id_key(delivery.event.id))

    def _fan_out(self, room, seats, delivery, key, shared=None, too_slow=None):
        """
        C{delivery} to C{seats}, each of them in C{room}, with the event's
        id parsed (C{key}) and maybe its text encoded (C{shared}) already.

        @param too_slow: a list to add the seats found too slow to, to be
            let go later; L{None} to let them go at once.
        @return: the event's shared text, if it was needed.
        """
        event = delivery.event
        origin = delivery.origin
        for seat in seats:
            if not seat.offer(delivery, key):
                if seat.state == ENTERING and seat.buffered_bytes > self._max_pending_bytes:
                    if too_slow is None:
                        self._too_slow(room, seat)
                    elif seat not in too_slow:
                        too_slow.append(seat)
                continue
            if shared is None:
                shared = messages.event(event)
            connection_id = seat.member.connection_id
            if connection_id != origin:
                seat.connection.send_shared(shared)
                continue
            # The actor's copy echoes its ref (with none, it is shared).
            if delivery.ref is None:
                seat.connection.send_shared(shared)
            else:
                seat.connection.send_text(messages.with_ref(shared, delivery.ref))
            if event.type == messages.QUIT:
                self._drop(room, connection_id, seat)
        return shared

    def deliver_burst(self, deliveries):
        """
        L{chatd.broker.interfaces.IBroker.set_feed}'s burst target: events
        read together, in feed order (from Redis, a window of a sender's
        messages comes back so).

        Consecutive events of one room with more than L{SLICE} local seats
        go out a slice of members at a time: each slice gets every one of
        them and is written at once (L{flush_writes}), so the first
        members' bytes are on their way, and their clients reading, while
        the later slices are fanned out.  Each connection is still written
        once per burst, as when the turn's writes go out together
        (docs/performance.md, scenario 4).  Anything else is L{deliver}ed
        one event at a time.
        """
        start, count = 0, len(deliveries)
        while start < count:  # bounded: every round moves start on
            room = deliveries[start].event.room
            end = start + 1
            while end < count and deliveries[end].event.room == room:
                end += 1
            if end - start > 1 and self.flush_writes is not None and self._seats.count(room) > self.SLICE:
                self._deliver_sliced(room, deliveries[start:end])
            else:
                for delivery in deliveries[start:end]:
                    self.deliver(delivery)
            start = end

    def _deliver_sliced(self, room, run):
        """
        L{deliver} for each of C{run} (events of C{room}), a slice of seats
        at a time.  A seat taken out meanwhile (its own QUIT) gets nothing
        after; a seat found too slow is let go after the whole run, so that
        its QUIT, which the embedded broker would feed back at once, comes
        after the run for everyone.
        """
        seats = self._seats.seats(room)
        registry = self._seats
        keys = [event_id_key(delivery.event.id) for delivery in run]
        texts = [None] * len(run)  # each event encoded once, for the first seat that takes it
        too_slow = []
        copied = registry.version  # seats is a copy as of this
        for first in range(0, len(seats), self.SLICE):  # bounded by the seats
            part = seats[first:first + self.SLICE]
            version = copied
            for index, delivery in enumerate(run):
                if registry.version != version:
                    # A seat was taken out since (its QUIT, or a connection
                    # an earlier slice's flush closed): the rest is not its.
                    version = registry.version
                    part = [seat for seat in part if registry.get(room, seat.member.connection_id) is seat]
                texts[index] = self._fan_out(room, part, delivery, keys[index], texts[index], too_slow)
            if first + self.SLICE < len(seats):
                self.flush_writes()
        for seat in too_slow:
            if registry.get(room, seat.member.connection_id) is seat:
                self._too_slow(room, seat)

    def _send(self, seat, delivery):
        """One event to one seat alone; only the actor's copy carries its C{ref}."""
        ref = delivery.ref if delivery.origin == seat.member.connection_id else None
        seat.connection.send_text(messages.event(delivery.event, ref))

    def _too_slow(self, room, seat):
        """
        The feed piled up past the cap for a seat still entering (a replay
        the client does not read): let the connection go, as a slow
        consumer, and QUIT the room for it now.
        """
        connection_id = seat.member.connection_id
        log.warn(
            "{connection} is not reading its catch-up of {room}: {size} bytes of live events "
            "waiting; closing {code}", connection=connection_id, room=printable(room),
            size=seat.buffered_bytes, code=errors.CLOSE_SLOW_CONSUMER,
        )
        self._evict(room, seat)
        seat.connection.close(errors.CLOSE_SLOW_CONSUMER, "not reading fast enough")

    # --- bookkeeping ----------------------------------------------------------

    def _member_seat(self, room, member):
        seat = self._seats.get(room, member.connection_id)
        if seat is None or not seat.is_member:
            raise NotMember(room)
        return seat

    def _evict(self, room, seat):
        """
        Take C{seat} out now and QUIT it at the broker unless that is taken
        care of: a QUIT in flight is its own, and an ENTER still in flight
        is quit for by enter() once answered (only it can know the answer).

        @return: a Deferred that fires when the broker heard (never fails).
        """
        self._drop(room, seat.member.connection_id, seat)
        if seat.state == QUITTING or not seat.at_broker:
            return defer.succeed(None)
        return self._quit_at_broker(room, seat.member)

    def _drop(self, room, connection_id, seat):
        return self._drop_seat(room, connection_id, seat)[0]

    def _drop_seat(self, room, connection_id, seat=None):
        dropped, was_last = self._seats.drop(room, connection_id, seat)
        if was_last:
            del self._subscribed[room]
            d = defer.maybeDeferred(self._broker.unsubscribe, room)
            d.addErrback(lambda f: log.warn(
                "could not unsubscribe from {room}: {why}", room=printable(room),
                why=f.getErrorMessage()))
        return dropped, was_last

    def _quit_at_broker(self, room, member):
        d = defer.maybeDeferred(self._broker.quit, room, member)
        d.addErrback(self._quit_failed, room, member)
        return d

    def _quit_failed(self, failure, room, member):
        if failure.check(BrokerUnavailable):
            log.warn(
                "QUIT of {user} from {room} not recorded: {why}",
                user=printable(member.name), room=printable(room), why=failure.getErrorMessage(),
            )
        else:
            log.failure(
                "QUIT of {user} from {room} failed", failure,
                user=printable(member.name), room=printable(room),
            )

