# -*- test-case-name: tests.test_seats -*-
"""
chatd.seats: a seat's entering -> live -> quitting transitions, the one
transition that takes the buffered feed live, and the registry's first/last.
"""

import pytest

from chatd.broker.interfaces import Delivery, Member
from chatd.messages import RoomEvent
from chatd.seats import ENTERING, LIVE, QUITTING, Seat, SeatRegistry, WrongState

ALICE = Member("i:1", "alice", "Alice")
BOB = Member("i:2", "bob", "Bob")


def delivery(n, kind="TALK", origin="i:9", ref=None):
    event = RoomEvent(type=kind, id=f"7-{n}", room="lobby", sender="X", message=str(n), user_count=1, ts=0)
    return Delivery(event, origin, ref)


def ids(deliveries):
    return [d.event.id for d in deliveries]


def test_entering_buffers_the_feed():
    """While entering nothing is sent; the feed is kept for go_live."""
    seat = Seat(object(), ALICE)
    assert seat.state == ENTERING and not seat.is_member
    assert seat.offer(delivery(1)) is False


def test_go_live_own_enter_first_when_feed_has_not_brought_it():
    """No buffered own ENTER: it goes first, then buffered events after it, earlier ones dropped."""
    seat = Seat(object(), ALICE)
    for n in (3, 6):
        seat.offer(delivery(n))
    own = delivery(5, "ENTER", origin="i:1", ref="e")
    sends = seat.go_live(own)
    assert sends[0] is own and ids(sends) == ["7-5", "7-6"]
    assert seat.state == LIVE and seat.is_member and seat.floor == (7, 6)


def test_go_live_uses_the_feed_copy_of_the_own_enter():
    """The own ENTER already buffered is sent once, in its feed position."""
    seat = Seat(object(), ALICE)
    feed_copy = delivery(5, "ENTER", origin="i:1", ref="e")
    for d in (delivery(4), feed_copy, delivery(6)):
        seat.offer(d)
    sends = seat.go_live(delivery(5, "ENTER", origin="i:1", ref="e"))
    assert ids(sends) == ["7-5", "7-6"] and sends[0] is feed_copy


def test_live_seat_drops_at_or_below_floor():
    """Once live, each event is sent once and never one older than the floor."""
    seat = Seat(object(), ALICE)
    seat.go_live(delivery(5, "ENTER", origin="i:1"))
    assert [seat.offer(delivery(n)) for n in (4, 5, 6, 6, 8, 7)] == [False, False, True, False, True, False]


def test_quit_transitions():
    """live -> quitting still receives; a failed QUIT goes back to live; wrong states raise."""
    seat = Seat(object(), ALICE)
    with pytest.raises(WrongState):
        seat.start_quit()
    seat.go_live(delivery(1, "ENTER", origin="i:1"))
    seat.start_quit()
    assert seat.state == QUITTING and not seat.is_member
    assert seat.offer(delivery(2)) is True
    with pytest.raises(WrongState):
        seat.go_live(delivery(3))
    seat.quit_failed()
    assert seat.state == LIVE
    with pytest.raises(WrongState):
        seat.quit_failed()


def test_registry_first_and_last():
    """add says whether it is the room's first seat, drop whether it was the last."""
    registry = SeatRegistry()
    alice, bob = Seat(object(), ALICE), Seat(object(), BOB)
    assert registry.add("lobby", alice) is True
    assert registry.add("lobby", bob) is False
    assert registry.add("ops", Seat(object(), ALICE)) is True
    assert registry.count("lobby") == 2 and registry.rooms_of("i:1") == frozenset({"lobby", "ops"})
    assert registry.drop("lobby", "i:1") == (alice, False)
    assert registry.drop("lobby", "i:1") == (None, False)
    assert registry.drop("lobby", "i:2") == (bob, True)
    assert registry.count("lobby") == 0 and registry.seats("lobby") == []
    assert registry.rooms_of("i:1") == frozenset({"ops"}) and registry.rooms_of("i:2") == frozenset()


def test_registry_refuses_a_second_seat_and_drops_only_the_named_seat():
    """One seat per connection and room; drop(seat=) leaves a newer seat alone."""
    registry = SeatRegistry()
    old, new = Seat(object(), ALICE), Seat(object(), ALICE)
    registry.add("lobby", old)
    with pytest.raises(KeyError):
        registry.add("lobby", new)
    registry.drop("lobby", "i:1")
    registry.add("lobby", new)
    assert registry.drop("lobby", "i:1", old) == (None, False)
    assert registry.get("lobby", "i:1") is new
