# -*- test-case-name: tests.test_hub -*-
"""
chatd.hub over the embedded broker with in-memory connections: fan-out
encodes once per event, the actor's copy echoes its ref, replay order, and
what a member sees on entering, leaving and broker failures.
"""

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.exceptions import BrokenImplementation
from zope.interface.verify import verifyObject

from chatd.broker.interfaces import Member
from chatd.errors import AlreadyInRoom, BrokerUnavailable, NotMember
from chatd.hub import Hub, IConnection
from tests.fakes import FakeConnection, RecordingBroker


class World:
    """A hub, its broker and named users, each with one connection."""

    def __init__(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.broker = RecordingBroker(self.clock)
        self.hub = Hub(self.broker)
        self.users = {}

    def user(self, name, connection_id=None):
        connection_id = connection_id or f"i:{name}"
        member = Member(connection_id, name.lower(), name)
        connection = FakeConnection(connection_id)
        self.users[name] = (member, connection)
        return connection

    def run(self, method, name, *args, **kwargs):
        """Call hub.<method> for a user; return its result or raise its error, synchronously."""
        member, connection = self.users[name]
        d = defer.ensureDeferred(getattr(self.hub, method)(*args[:1], member, connection, *args[1:], **kwargs))
        results = []
        d.addBoth(results.append)
        assert results, f"{method} did not finish"
        if isinstance(results[0], defer.Failure):
            results[0].raiseException()
        return results[0]

    def start(self, method, name, *args, **kwargs):
        member, connection = self.users[name]
        return defer.ensureDeferred(getattr(self.hub, method)(*args[:1], member, connection, *args[1:], **kwargs))


def refused(world, kind, method, name, *args, **kwargs):
    with pytest.raises(kind) as info:
        world.run(method, name, *args, **kwargs)
    return info.value


@pytest.fixture
def world():
    return World()


def test_fake_connection_provides_iconnection():
    """The test double really is an IConnection."""
    assert verifyObject(IConnection, FakeConnection("x"))


def test_iconnection_requires_close():
    """A connection without the close() the session calls is caught by verifyObject."""

    @implementer(IConnection)
    class NoClose:
        connection_id = "x"

        def send_text(self, text):
            pass

        def send_shared(self, text):
            pass

        def when_drained(self):
            return defer.succeed(None)

    with pytest.raises(BrokenImplementation):
        verifyObject(IConnection, NoClose())


def test_enter_sends_own_enter_with_ref(world):
    """The enterer gets its ENTER with ref; members already there get it without."""
    alice, bob = world.user("Alice"), world.user("Bob")
    world.run("enter", "Alice", "lobby", ref="a1")
    (own,) = alice.take()
    assert (own["type"], own["sender"], own["userCount"], own["ref"]) == ("ENTER", "Alice", 1, "a1")
    world.run("enter", "Bob", "lobby", ref="b1")
    (seen,) = alice.take()
    (bobs,) = bob.take()
    assert seen == {k: v for k, v in bobs.items() if k != "ref"} and bobs["ref"] == "b1"
    assert seen["userCount"] == 2
    assert world.hub.local_users("lobby") == 2
    assert world.hub.rooms_of("i:Alice") == frozenset({"lobby"})


def test_fan_out_encodes_once(world):
    """A TALK to many members is prepared once and shared; the actor's ref'd copy is separate."""
    conns = [world.user(n) for n in ("Alice", "Bob", "Carol", "Dave")]
    for name in ("Alice", "Bob", "Carol", "Dave"):
        world.run("enter", name, "lobby")
    for c in conns:
        c.take()
        c.shared.clear()

    world.run("talk", "Alice", "lobby", "hello", ref="t1")
    alice, *others = conns
    assert all(len(c.shared) == 1 for c in others)
    # The very same str object, so the WebSocket layer frames it once.
    assert len({id(c.shared[0]) for c in others}) == 1
    assert alice.shared == []
    (own,) = alice.take()
    assert own["ref"] == "t1" and own["message"] == "hello"
    for c in others:
        (heard,) = c.take()
        assert heard == {k: v for k, v in own.items() if k != "ref"}


def test_fan_out_without_ref_shares_with_actor(world):
    """With no ref to echo, the actor gets the same shared text as everyone."""
    alice, bob = world.user("Alice"), world.user("Bob")
    world.run("enter", "Alice", "lobby")
    world.run("enter", "Bob", "lobby")
    alice.shared.clear()
    bob.shared.clear()
    world.run("talk", "Alice", "lobby", "hi")
    assert len(alice.shared) == len(bob.shared) == 1
    assert alice.shared[0] is bob.shared[0]


def test_lone_actor_needs_no_shared_frame(world):
    """An actor alone in the room gets its ref'd copy; nothing is shared."""
    alice = world.user("Alice")
    world.run("enter", "Alice", "lobby")
    alice.take()
    alice.shared.clear()
    world.run("talk", "Alice", "lobby", "anyone?", ref=7)
    assert alice.shared == []
    assert [f["ref"] for f in alice.take()] == [7]


def test_replay_then_marker_then_live(world):
    """ENTER with since: missed TALKs in order, REPLAY with ref, own ENTER, then live events."""
    alice, bob = world.user("Alice"), world.user("Bob")
    world.run("enter", "Alice", "lobby")
    first = None
    for i in range(4):
        world.run("talk", "Alice", "lobby", f"m{i}", ref=i)
    said = [f for f in alice.take() if f["type"] == "TALK"]
    first = said[0]["id"]

    world.run("enter", "Bob", "lobby", since=first, ref="b")
    frames = bob.take()
    assert [f["message"] for f in frames[:3]] == ["m1", "m2", "m3"]
    assert all("ref" not in f for f in frames[:3])
    assert frames[3] == {"type": "REPLAY", "room": "lobby", "count": 3, "complete": True, "ref": "b"}
    assert (frames[4]["type"], frames[4]["sender"], frames[4]["ref"]) == ("ENTER", "Bob", "b")
    assert len(frames) == 5

    world.run("talk", "Alice", "lobby", "live")
    (live,) = bob.take()
    assert live["message"] == "live"


def test_replay_incomplete_is_reported(world):
    """A since older than the history window gives complete: false and what is left."""
    alice, bob = world.user("Alice"), world.user("Bob")
    world.run("enter", "Alice", "lobby")
    for i in range(13):  # history_size is 10
        world.run("talk", "Alice", "lobby", f"m{i}")
    first = [f for f in alice.take() if f["type"] == "TALK"][0]["id"]
    world.run("enter", "Bob", "lobby", since=first)
    frames = bob.take()
    assert [f["message"] for f in frames[:10]] == [f"m{i}" for i in range(3, 13)]
    assert frames[10]["type"] == "REPLAY"
    assert frames[10]["complete"] is False and frames[10]["count"] == 10


def test_events_published_while_entering_are_kept_in_order(world):
    """Feed events that arrive before the ENTER's reply are sent after the own ENTER, once."""
    alice, bob = world.user("Alice"), world.user("Bob")
    world.run("enter", "Alice", "lobby")
    alice.take()
    release = world.broker.held = defer.Deferred()
    entering = world.start("enter", "Bob", "lobby", ref="b")
    world.run("talk", "Alice", "lobby", "during")
    assert bob.take() == []  # buffered until the ENTER is answered
    assert not entering.called
    release.callback(None)
    assert entering.called
    frames = bob.take()
    assert [(f["type"], f.get("ref")) for f in frames] == [("ENTER", "b"), ("TALK", None)]
    assert frames[1]["message"] == "during"
    assert [f["type"] for f in alice.take()] == ["ENTER", "TALK"]


def test_not_member(world):
    """TALK or QUIT in a room not entered is NotMember, naming the room."""
    world.user("Alice")
    assert refused(world, NotMember, "talk", "Alice", "lobby", "hi", ref="x").room == "lobby"
    assert refused(world, NotMember, "quit", "Alice", "lobby", ref="y").room == "lobby"


def test_already_in_room(world):
    """A second ENTER of the same room is AlreadyInRoom and changes nothing."""
    alice = world.user("Alice")
    world.run("enter", "Alice", "lobby")
    alice.take()
    assert refused(world, AlreadyInRoom, "enter", "Alice", "lobby", ref="again").room == "lobby"
    assert alice.take() == [] and world.hub.local_users("lobby") == 1


def test_quit_own_quit_last(world):
    """The quitter's own QUIT (with ref) is the last it gets; others see it; it is no member after."""
    alice, bob = world.user("Alice"), world.user("Bob")
    world.run("enter", "Alice", "lobby")
    world.run("enter", "Bob", "lobby")
    alice.take()
    bob.take()
    world.run("quit", "Alice", "lobby", ref="q")
    (own,) = alice.take()
    assert (own["type"], own["ref"], own["userCount"]) == ("QUIT", "q", 1)
    (seen,) = bob.take()
    assert seen["type"] == "QUIT" and seen["id"] == own["id"] and "ref" not in seen
    world.run("talk", "Bob", "lobby", "still here")
    assert alice.take() == []
    assert world.hub.rooms_of("i:Alice") == frozenset()
    refused(world, NotMember, "talk", "Alice", "lobby", "x")


def test_unsubscribe_when_last_leaves(world):
    """The hub subscribes with the first local member and unsubscribes after the last."""
    world.user("Alice")
    world.user("Bob")
    world.run("enter", "Alice", "lobby")
    world.run("enter", "Bob", "lobby")
    assert world.broker.calls == [("subscribe", "lobby")]
    world.run("quit", "Alice", "lobby")
    assert world.broker.calls == [("subscribe", "lobby")]
    world.run("quit", "Bob", "lobby")
    assert world.broker.calls == [("subscribe", "lobby"), ("unsubscribe", "lobby")]
    assert world.hub.local_users("lobby") == 0


def test_leave_all(world):
    """A closed connection quits every room; others get its QUIT, it gets nothing."""
    alice, bob = world.user("Alice"), world.user("Bob")
    world.run("enter", "Alice", "lobby")
    world.run("enter", "Alice", "ops")
    world.run("enter", "Bob", "lobby")
    alice.take()
    bob.take()
    d = world.hub.leave_all("i:Alice")
    assert d.called
    assert alice.take() == []
    (seen,) = bob.take()
    assert (seen["type"], seen["sender"], seen["userCount"]) == ("QUIT", "Alice", 1)
    assert world.hub.rooms_of("i:Alice") == frozenset()
    assert ("unsubscribe", "ops") in world.broker.calls
    assert ("unsubscribe", "lobby") not in world.broker.calls


def test_kick_removes_every_seat_of_the_user(world):
    """
    kick: each of the user's connections in the room gets ERROR forbidden
    instead of its QUIT and is out; the room sees one QUIT per connection;
    the user's other rooms and other users stay.
    """
    alice1, bob = world.user("Alice"), world.user("Bob")
    alice2 = world.user("Alice", connection_id="i:Alice-2")
    world.run("enter", "Alice", "lobby")  # i:Alice-2 (the last Alice made)
    world.users["Alice"] = (Member("i:Alice", "alice", "Alice"), alice1)
    world.run("enter", "Alice", "lobby")
    world.run("enter", "Alice", "ops")
    world.run("enter", "Bob", "lobby")
    for connection in (alice1, alice2, bob):
        connection.take()
    d = world.hub.kick("lobby", "alice")
    assert d.called
    for connection in (alice1, alice2):
        assert connection.take() == [{"type": "ERROR", "code": "forbidden", "message": "removed from lobby"}]
    quits = bob.take()
    assert [(e["type"], e["sender"]) for e in quits] == [("QUIT", "Alice"), ("QUIT", "Alice")]
    assert quits[-1]["userCount"] == 1
    assert world.hub.rooms_of("i:Alice") == frozenset({"ops"})
    assert world.hub.rooms_of("i:Alice-2") == frozenset()
    assert world.hub.local_users("lobby") == 1
    world.run("enter", "Alice", "lobby")  # may come back: a kick is not a ban
    assert world.hub.kick("nowhere", "alice").called


def test_leave_all_survives_broker_failure(world):
    """A QUIT the broker cannot record is logged, not raised."""
    world.user("Alice")
    world.run("enter", "Alice", "lobby")
    world.broker.down.add("quit")
    d = world.hub.leave_all("i:Alice")
    results = []
    d.addBoth(results.append)
    assert results and not isinstance(results[0], defer.Failure)
    assert world.hub.rooms_of("i:Alice") == frozenset()


def test_enter_broker_failure(world):
    """An ENTER the broker cannot take is BrokerUnavailable, and the seat is gone."""
    alice = world.user("Alice")
    world.broker.down.add("enter")
    refused(world, BrokerUnavailable, "enter", "Alice", "lobby", ref="e")
    assert alice.take() == []
    assert world.hub.rooms_of("i:Alice") == frozenset() and world.hub.local_users("lobby") == 0
    assert world.broker.calls[-1] == ("unsubscribe", "lobby")
    world.broker.down.clear()
    world.run("enter", "Alice", "lobby", ref="again")
    assert [f["ref"] for f in alice.take()] == ["again"]


def test_subscribe_failure(world):
    """A subscription the broker cannot make is BrokerUnavailable too."""
    world.user("Alice")
    world.broker.down.add("subscribe")
    refused(world, BrokerUnavailable, "enter", "Alice", "lobby")
    assert world.hub.rooms_of("i:Alice") == frozenset()


def test_talk_broker_failure(world):
    """A TALK the broker cannot store is BrokerUnavailable; the member stays."""
    alice = world.user("Alice")
    world.run("enter", "Alice", "lobby")
    alice.take()
    world.broker.down.add("talk")
    refused(world, BrokerUnavailable, "talk", "Alice", "lobby", "hi", cid="c", ref="t")
    assert alice.take() == []
    world.broker.down.clear()
    world.run("talk", "Alice", "lobby", "hi", cid="c", ref="t2")
    assert [f["ref"] for f in alice.take()] == ["t2"]


def test_quit_broker_failure(world):
    """A QUIT the broker cannot record is BrokerUnavailable; the member is still in."""
    alice = world.user("Alice")
    world.run("enter", "Alice", "lobby")
    alice.take()
    world.broker.down.add("quit")
    refused(world, BrokerUnavailable, "quit", "Alice", "lobby")
    world.broker.down.clear()
    world.run("talk", "Alice", "lobby", "still in", ref=1)
    assert [f["message"] for f in alice.take()] == ["still in"]


def test_duplicate_cid_acknowledged_to_sender_only(world):
    """A resent (sub, cid) gives the sender the original event with the new ref; nobody else hears it."""
    alice, bob = world.user("Alice"), world.user("Bob")
    world.run("enter", "Alice", "lobby")
    world.run("enter", "Bob", "lobby")
    world.run("talk", "Alice", "lobby", "once", cid="c1", ref="r1")
    original = alice.take()[-1]
    bob.take()
    world.run("talk", "Alice", "lobby", "once", cid="c1", ref="r2")
    (ack,) = alice.take()
    assert ack["id"] == original["id"] and ack["ref"] == "r2"
    assert bob.take() == []


def test_close_while_entering(world):
    """A connection that closes while its ENTER is in flight is sent nothing, and quits."""
    alice, bob = world.user("Alice"), world.user("Bob")
    world.run("enter", "Alice", "lobby")
    alice.take()
    world.broker.held = defer.Deferred()
    release = world.broker.held
    entering = world.start("enter", "Bob", "lobby")
    world.hub.leave_all("i:Bob")
    release.callback(None)
    outcome = []
    entering.addBoth(outcome.append)
    assert outcome and outcome[0].check(NotMember)
    assert bob.take() == []
    assert [f["type"] for f in alice.take()] == ["ENTER", "QUIT"]
    assert world.hub.local_users("lobby") == 1


@pytest.mark.parametrize("step", ["enter", "subscribe"])
def test_any_enter_failure_leaves_no_seat(world, step):
    """Any exception from subscribe or ENTER propagates and leaves no seat or subscription."""
    world.user("Alice")
    world.broker.broken[step] = RuntimeError("boom")
    refused(world, RuntimeError, "enter", "Alice", "lobby")
    assert world.hub.rooms_of("i:Alice") == frozenset() and world.hub.local_users("lobby") == 0
    assert world.broker.calls[-1] == ("unsubscribe", "lobby")
    del world.broker.broken[step]
    world.run("enter", "Alice", "lobby")
    assert world.hub.rooms_of("i:Alice") == frozenset({"lobby"})


def test_failure_after_the_broker_entered_quits_there(world):
    """If going live fails after the broker took the ENTER, the broker hears a QUIT too."""
    alice, bob = world.user("Alice"), world.user("Bob")
    world.run("enter", "Alice", "lobby")
    alice.take()

    def broken(text):
        raise OSError("transport gone")

    bob.send_text = broken
    refused(world, OSError, "enter", "Bob", "lobby")
    assert [(f["type"], f["sender"], f["userCount"]) for f in alice.take()] == [
        ("ENTER", "Bob", 2), ("QUIT", "Bob", 1)
    ]
    assert world.hub.local_users("lobby") == 1


def test_leave_some_rooms(world):
    """leave() takes a connection out of the named rooms only; the rooms see its QUIT, it gets nothing."""
    alice, bob = world.user("Alice"), world.user("Bob")
    for room in ("lobby", "ops"):
        world.run("enter", "Alice", room)
        world.run("enter", "Bob", room)
    alice.take()
    bob.take()
    assert world.hub.leave("i:Alice", ["lobby"]).called
    assert alice.take() == []
    (seen,) = bob.take()
    assert (seen["type"], seen["room"], seen["sender"]) == ("QUIT", "lobby", "Alice")
    assert world.hub.rooms_of("i:Alice") == frozenset({"ops"})


def catch_up_world(world, talks=4, **hub_kwargs):
    """Alice said C{talks} things in lobby; Bob's buffer is full. Returns the since id."""
    if hub_kwargs:
        world.hub = Hub(world.broker, **hub_kwargs)
    alice, bob = world.user("Alice"), world.user("Bob")
    world.run("enter", "Alice", "lobby")
    for i in range(talks):
        world.run("talk", "Alice", "lobby", f"m{i}")
    since = alice.take()[0]["id"]
    bob.fill()
    return alice, bob, since


def test_replay_waits_for_the_send_buffer(world):
    """The replay goes one event per drained buffer; live events wait behind it, in order, once."""
    alice, bob, since = catch_up_world(world)
    entering = world.start("enter", "Bob", "lobby", since=since, ref="b")
    assert [f["message"] for f in bob.take()] == ["m0"]
    world.run("talk", "Alice", "lobby", "live")
    assert bob.take() == [] and not entering.called
    bob.drain()
    assert entering.called
    frames = bob.take()
    assert [f["type"] for f in frames] == ["TALK"] * 3 + ["REPLAY", "ENTER", "TALK"]
    assert [f.get("message") for f in frames if f["type"] == "TALK"] == ["m1", "m2", "m3", "live"]
    assert frames[3]["count"] == 4 and frames[4]["ref"] == "b"


def test_close_during_replay(world):
    """A connection that closes mid-replay quits at once (the room sees it) and is sent nothing more."""
    alice, bob, since = catch_up_world(world)
    entering = world.start("enter", "Bob", "lobby", since=since)
    bob.take()
    world.hub.leave_all("i:Bob")
    assert [(f["type"], f["sender"]) for f in alice.take()] == [("ENTER", "Bob"), ("QUIT", "Bob")]
    bob.drain()
    outcome = []
    entering.addBoth(outcome.append)
    assert outcome[0].check(NotMember)
    assert bob.take() == [] and alice.take() == []
    assert world.hub.local_users("lobby") == 1


def test_live_events_piling_up_during_a_stalled_replay_cut_it(world):
    """Past max_pending_bytes of buffered live events, a stalled catch-up is closed 4008 and leaves."""
    alice, bob, since = catch_up_world(world, max_pending_bytes=1000)
    entering = world.start("enter", "Bob", "lobby", since=since)
    alice.take()
    world.run("talk", "Alice", "lobby", "x" * 500)
    assert bob.closes == []
    world.run("talk", "Alice", "lobby", "y" * 500)
    assert bob.closes == [(4008, "not reading fast enough")]
    assert [(f["type"], f.get("sender")) for f in alice.take()] == [
        ("TALK", "Alice"), ("TALK", "Alice"), ("QUIT", "Bob")
    ]
    bob.drain()
    outcome = []
    entering.addBoth(outcome.append)
    assert outcome[0].check(NotMember)
    assert world.hub.rooms_of("i:Bob") == frozenset()


# --- bursts: a slice of members at a time ------------------------------------------


NAMES = ("Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Gina")


def burst_world(slice_size, flushes=None, **hub_kwargs):
    """Seven members in lobby, three of them in ops; bursts go out C{slice_size} members at a time."""
    world = World()
    world.hub = Hub(world.broker, flush_writes=lambda: flushes.append(None) if flushes is not None else None,
                    **hub_kwargs)
    world.hub.SLICE = slice_size
    for name in NAMES:
        world.user(name)
        world.run("enter", name, "lobby")
    for name in NAMES[:3]:
        world.run("enter", name, "ops")
    for _, connection in world.users.values():
        connection.take()
    return world


def published(world, steps):
    """
    The deliveries the broker publishes for C{steps} (C{(method, name,
    args...)}), kept back from the hub: a burst as Redis would read it.
    """
    kept = []
    world.broker.set_feed(kept.append)
    try:
        for method, name, *args in steps:
            world.run(method, name, *args)
    finally:
        world.broker.set_feed(world.hub.deliver, world.hub.deliver_burst)
    return kept


def quit_after(world, delivery, name, ref):
    """
    A QUIT of C{name}, published right after C{delivery} (its id sorts
    between that one's and the next), as the feed brings a QUIT whose reply
    has not come yet: the seat is still live.
    """
    from chatd.broker.interfaces import Delivery
    from chatd.messages import QUIT, RoomEvent

    member, _ = world.users[name]
    event = RoomEvent(type=QUIT, id=delivery.event.id + "-1", room=delivery.event.room, sender=name,
                      message="", user_count=6, ts=delivery.event.ts)
    return Delivery(event, member.connection_id, ref)


STEPS = [
    ("talk", "Alice", "lobby", "one", None, "a1"),
    ("talk", "Bob", "lobby", "two"),
    ("talk", "Carol", "ops", "elsewhere", None, "c1"),
    ("talk", "Dave", "lobby", "three", None, "d1"),
    ("talk", "Erin", "lobby", "four"),
    ("talk", "Gina", "lobby", "five", None, "g1"),
]


@pytest.mark.parametrize("slice_size", [1, 2, 3, 6, 7])
def test_a_burst_in_slices_is_what_each_event_alone_gives(slice_size):
    """
    Every connection gets from a burst fanned out a slice of members at a
    time exactly what it gets from the same events delivered one by one:
    the same frames in the same order, its own copies with their ref, and
    a member whose QUIT is in the burst nothing after it.  Each slice but
    the last is flushed at once; a room with no more seats than a slice
    is not sliced.
    """
    flushes = []
    one, sliced = burst_world(slice_size), burst_world(slice_size, flushes)
    burst = published(one, STEPS)
    assert [d.event.id for d in published(sliced, STEPS)] == [d.event.id for d in burst]
    # Frank's QUIT after Alice's TALK, Gina's (without a ref) after her own TALK.
    burst.insert(1, quit_after(one, burst[0], "Frank", "f1"))
    burst.append(quit_after(one, burst[-1], "Gina", None))
    for delivery in burst:
        one.hub.deliver(delivery)
    sliced.hub.deliver_burst(burst)
    for name, (_, connection) in one.users.items():
        got = sliced.users[name][1].take()
        assert got == connection.take() and got, name
    assert got[-1]["type"] == "QUIT" and got[-1]["sender"] == "Gina"  # the last member's own, shared
    assert sliced.hub.rooms_of("i:Frank") == sliced.hub.rooms_of("i:Gina") == frozenset()
    assert sliced.hub.local_users("lobby") == one.hub.local_users("lobby") == 5
    # lobby's two runs, before ops' event (7 seats) and after it (6: Frank left).
    assert len(flushes) == sum(-(-seats // slice_size) - 1 for seats in (7, 6) if seats > slice_size)


def test_a_burst_in_slices_reaches_each_member_in_order():
    """
    What a member gets of a sliced burst: every event once, in the feed's
    order, its own TALK with its ref, its QUIT last.
    """
    world = burst_world(2, [])
    burst = published(world, STEPS)
    burst.insert(1, quit_after(world, burst[0], "Frank", "f1"))
    world.hub.deliver_burst(burst)
    alice, frank, carol = (world.users[name][1].take() for name in ("Alice", "Frank", "Carol"))
    assert [(f["room"], f["message"], f.get("ref")) for f in alice] == [
        ("lobby", "one", "a1"), ("lobby", "", None), ("lobby", "two", None), ("ops", "elsewhere", None),
        ("lobby", "three", None), ("lobby", "four", None), ("lobby", "five", None),
    ]
    assert [(f["type"], f.get("ref")) for f in frank] == [("TALK", None), ("QUIT", "f1")]
    assert [(f["room"], f.get("ref")) for f in carol if f["room"] == "ops"] == [("ops", "c1")]
    ids = [f["id"] for f in alice if f["room"] == "lobby"]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))


def test_a_seat_that_leaves_during_a_slices_flush_gets_nothing_after():
    """
    A connection that goes while an earlier slice is written out (its
    close, say, as a flush finds it) is not written to by the later
    slices: its seat is looked up again before the next event.
    """
    world = burst_world(2)
    gina = world.users["Gina"][1]
    burst = published(world, STEPS[:2])
    for _, connection in world.users.values():
        connection.take()
    world.hub.flush_writes = lambda: world.hub.leave_all("i:Gina") if world.hub.rooms_of("i:Gina") else None
    later = []
    world.broker.set_feed(later.append)  # Gina's QUIT comes back later, as from Redis
    world.hub.deliver_burst(burst)
    assert gina.take() == []
    frank = world.users["Frank"][1].take()  # a later slice than the flush Gina left in
    assert [f["message"] for f in frank] == ["one", "two"]
    assert [d.event.type for d in later] == ["QUIT"]
    assert world.hub.rooms_of("i:Gina") == frozenset()


def test_a_stalled_catch_up_is_cut_after_the_burst():
    """
    A member still catching up whose buffered live events pass
    max_pending_bytes during a sliced burst is closed 4008 once, after the
    burst's fan-out; its QUIT comes after every event of the burst, for
    every member, whatever slice they are in.
    """
    world = burst_world(2, [], max_pending_bytes=1000)
    world.run("talk", "Alice", "lobby", "seen")
    world.run("talk", "Alice", "lobby", "missed")
    since = world.users["Alice"][1].take()[0]["id"]
    late = world.user("Late")
    late.fill()
    entering = world.start("enter", "Late", "lobby", since=since)
    assert [f["message"] for f in late.take()] == ["missed"]  # and waits for the buffer to drain
    burst = published(world, [("talk", "Bob", "lobby", "x" * 500), ("talk", "Bob", "lobby", "y" * 500),
                              ("talk", "Bob", "lobby", "z" * 500)])
    for _, connection in world.users.values():
        connection.take()
    world.hub.deliver_burst(burst)
    assert late.closes == [(4008, "not reading fast enough")]
    for name in NAMES:
        frames = world.users[name][1].take()
        assert [(f["type"], f["message"][:1] if f["type"] == "TALK" else None) for f in frames] == [
            ("TALK", "x"), ("TALK", "y"), ("TALK", "z"), ("QUIT", None),
        ], name
        assert frames[-1]["sender"] == "Late"
    late.drain()
    outcome = []
    entering.addBoth(outcome.append)
    assert outcome[0].check(NotMember)
    assert world.hub.rooms_of("i:Late") == frozenset()


def test_a_burst_without_a_flush_goes_event_by_event(world):
    """Without flush_writes (no TLS layer to ask), a burst is delivered one event at a time."""
    for name in NAMES:
        world.user(name)
        world.run("enter", name, "lobby")
    world.hub.SLICE = 1
    burst = published(world, STEPS[:2])
    for _, connection in world.users.values():
        connection.take()
    world.hub.deliver_burst(burst)
    assert [f["message"] for f in world.users["Gina"][1].take()] == ["one", "two"]
