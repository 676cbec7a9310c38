# -*- test-case-name: tests.test_seats -*-
"""
Who sits where on this instance, without I/O: the pure half of
L{chatd.hub}.

A L{Seat} is one connection's place in one room and goes
C{entering -> live -> quitting}, and out of the registry from any of them.
While entering, it buffers the room's feed; L{Seat.go_live} is the one
transition that takes the buffered feed live, so nothing published between
the subscription and the ENTER's reply is lost or sent twice.

L{SeatRegistry} keeps the seats by room and by connection and says when a
room gets its first local seat and loses its last (as Crossbar's
C{UriObservationMap.add_observer} / C{drop_observer} do), so the hub only
subscribes, unsubscribes and delivers.
"""

from typing import Dict, List, Tuple

from chatd.broker.interfaces import Delivery
from chatd.messages import event_id_key

# Bytes an event's JSON adds to its text (ids, names, field names): for
# counting what a seat buffers while it enters.
EVENT_OVERHEAD = 200

ENTERING = "entering"
LIVE = "live"
QUITTING = "quitting"


class WrongState(Exception):
    """A transition asked of a seat in a state that does not have it (a bug)."""


class Seat:
    """
    One connection in one room.

    @ivar state: L{ENTERING}, L{LIVE} or L{QUITTING}.
    @ivar floor: the key of the newest event sent to this seat; the feed's
        events at or below it are not sent (again).
    """

    # One per connection and room: thousands per instance.
    __slots__ = ("connection", "member", "state", "floor", "_buffer", "buffered_bytes", "at_broker")

    def __init__(self, connection, member):
        self.connection = connection
        self.member = member
        self.state = ENTERING
        self.floor = ()
        self._buffer: List[Delivery] = []
        self.buffered_bytes = 0  # about what the buffered events will cost to send
        self.at_broker = False  # the broker answered this seat's ENTER

    def __repr__(self):
        return f"<Seat {self.member.connection_id} {self.state}>"

    @property
    def is_member(self):
        """Whether the connection may TALK and QUIT here (live, no QUIT in flight)."""
        return self.state == LIVE

    def offer(self, delivery, key=None):
        """
        A feed event for this seat's room.

        @param key: C{event_id_key(delivery.event.id)}, when the caller has
            it: the hub offers one event to every seat of a room and parses
            its id once.
        @return: whether to send it now.  While entering it is buffered
            (L{False}); an event at or below the floor is dropped.
        """
        if self.state == ENTERING:
            self._buffer.append(delivery)
            self.buffered_bytes += EVENT_OVERHEAD + len(delivery.event.message.encode("utf-8"))
            return False
        if key is None:
            key = event_id_key(delivery.event.id)
        if key <= self.floor:
            return False
        self.floor = key
        return True

    def go_live(self, entered):
        """
        The ENTER was answered with C{entered} (a L{Delivery} of the own
        ENTER event, with the ENTER's C{ref}): entering -> live.

        @return: the deliveries to send now, in order: the own ENTER (once,
            whether or not the feed brought it already), then what the feed
            brought after it.  Buffered events before the own ENTER were
            published before this member was in the room: not its business.
        @raise WrongState: unless entering.
        """
        self._require(ENTERING)
        self.at_broker = True
        own = event_id_key(entered.event.id)
        buffered, self._buffer = self._buffer, []
        self.buffered_bytes = 0
        sends = [] if any(event_id_key(d.event.id) == own for d in buffered) else [entered]
        # No buffered copy of the own ENTER means the feed has not brought
        # it yet, so nothing after it either: sending it first keeps order.
        sends.extend(d for d in buffered if event_id_key(d.event.id) >= own)
        self.state = LIVE
        self.floor = max([self.floor] + [event_id_key(d.event.id) for d in sends])
        return sends

    def start_quit(self):
        """
        A QUIT was sent to the broker: live -> quitting.  Events still
        arrive until the QUIT's own.

        @raise WrongState: unless live.
        """
        self._require(LIVE)
        self.state = QUITTING

    def quit_failed(self):
        """
        The broker did not take the QUIT: quitting -> live again.

        @raise WrongState: unless quitting.
        """
        self._require(QUITTING)
        self.state = LIVE

    def _require(self, state):
        if self.state != state:
            raise WrongState(f"{self!r} is not {state}")


class SeatRegistry:
    """
    The seats of this instance, by room and by connection id.

    Only the first L{add} and the last L{drop} of a room are news to the
    broker; both say so.
    """

    def __init__(self):
        self._by_room: Dict[str, Dict[str, Seat]] = {}
        self._by_connection: Dict[str, set] = {}
        self.version = 0  # counts the seats taken out, so a loop over a copy can tell

    def add(self, room, seat):
        """
        Seat C{seat} (of C{seat.member.connection_id}) in C{room}.

        @return: whether it is the room's first seat here.
        @raise KeyError: the connection has a seat there already.
        """
        connection_id = seat.member.connection_id
        seats = self._by_room.get(room)
        is_first = seats is None
        if is_first:
            seats = self._by_room[room] = {}
        elif connection_id in seats:
            raise KeyError((room, connection_id))
        seats[connection_id] = seat
        self._by_connection.setdefault(connection_id, set()).add(room)
        return is_first

    def drop(self, room, connection_id, seat=None) -> Tuple[object, bool]:
        """
        Take the connection's seat out of C{room}; with C{seat}, only if
        it is that seat (not a newer one of the same connection).

        @return: C{(seat or None, was_last)}: C{was_last} is true when the
            room had seats here and now has none.
        """
        seats = self._by_room.get(room)
        if seats is None or connection_id not in seats:
            return None, False
        if seat is not None and seats[connection_id] is not seat:
            return None, False
        dropped = seats.pop(connection_id)
        self.version += 1
        rooms = self._by_connection[connection_id]
        rooms.discard(room)
        if not rooms:
            del self._by_connection[connection_id]
        was_last = not seats
        if was_last:
            del self._by_room[room]
        return dropped, was_last

    def room_count(self):
        """How many rooms have a seat (a metric, read at scrape time)."""
        return len(self._by_room)

    def get(self, room, connection_id):
        """The connection's seat in C{room}, or L{None}."""
        return self._by_room.get(room, {}).get(connection_id)

    def seats(self, room):
        """The room's seats here, as a list (safe to drop from while iterating)."""
        return list(self._by_room.get(room, {}).values())

    def count(self, room):
        """How many seats C{room} has here, in any state."""
        return len(self._by_room.get(room, ()))

    def rooms_of(self, connection_id):
        """The rooms the connection has a seat in (any state)."""
        return frozenset(self._by_connection.get(connection_id, ()))
