"""
The IBroker contract as tests, written once and run against every broker
(tests/test_broker_contract.py runs it on MemoryBroker and on RedisBroker
with a real redis-server).

A subclass provides the C{make_rig} fixture: an async factory
C{await make_rig(history_size=N, max_rooms=N, max_bytes=N, ttl=S,
max_new_rooms_per_user=N)} (any subset) returning a L{Rig} around a started
broker.  Everything is awaited on events (the feed, Deferreds), each wait
with a deadline.
"""

import pytest_twisted
from twisted.internet import defer
from zope.interface.verify import verifyObject

from chatd.auth import Principal
from chatd.broker.interfaces import DISCONNECT, KICK, Control, IBroker, Member
from chatd.errors import RoomLimitReached, TooManyNewRooms
from chatd.messages import event_id_key

FEED_TIMEOUT = 5.0


class Rig:
    """A broker, the feed it delivers to, and a way to let time pass."""

    def __init__(self, broker, clock, elapse):
        self.broker = broker
        self.clock = clock
        self.feed = []
        self._waiters = []
        self._elapse = elapse
        self.controls = []
        self._control_waiters = []
        broker.set_feed(self._receive)
        if hasattr(broker, "set_control"):
            broker.set_control(self._command)

    def _command(self, control):
        self.controls.append(control)
        for waiter in list(self._control_waiters):
            count, d = waiter
            if len(self.controls) >= count:
                self._control_waiters.remove(waiter)
                d.callback(None)

    def controlled(self, count):
        """Fires once C{count} control commands arrived in all."""
        if len(self.controls) >= count:
            return defer.succeed(None)
        d = defer.Deferred()
        self._control_waiters.append((count, d))
        return d.addTimeout(FEED_TIMEOUT, self.clock)

    def _receive(self, delivery):
        self.feed.append(delivery)
        for waiter in list(self._waiters):
            count, d = waiter
            if len(self.feed) >= count:
                self._waiters.remove(waiter)
                d.callback(None)

    def fed(self, count):
        """Fires once the feed brought C{count} deliveries in all."""
        if len(self.feed) >= count:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append((count, d))
        return d.addTimeout(FEED_TIMEOUT, self.clock)

    def elapse(self, seconds):
        return self._elapse(seconds)

    def member(self, n, sub=None, name=None):
        sub = sub or f"user{n}"
        return Member(f"{self.broker.instance_id}:{n}", sub, name or sub.capitalize())


def keys_of(events):
    return [event_id_key(e.id) for e in events]


def assert_increasing(events):
    keys = keys_of(events)
    assert keys == sorted(keys) and len(set(keys)) == len(keys), [e.id for e in events]


class BrokerContract:
    """What every IBroker does.  Subclasses add the C{make_rig} fixture."""

    @pytest_twisted.ensureDeferred
    async def test_provides_the_interface(self, make_rig):
        """The broker provides IBroker, has an instance id and is available."""
        rig = await make_rig()
        assert verifyObject(IBroker, rig.broker)
        assert rig.broker.instance_id
        assert rig.broker.is_available()

    @pytest_twisted.ensureDeferred
    async def test_room_events_in_one_order(self, make_rig):
        """ENTER, TALK, QUIT: counts as the room changes, ids increasing, the feed in that order."""
        rig = await make_rig()
        alice, bob = rig.member(1), rig.member(2)
        await rig.broker.subscribe("lobby")
        entered = await rig.broker.enter("lobby", alice, ref="e1")
        second = await rig.broker.enter("lobby", bob)
        talked = await rig.broker.talk("lobby", alice, "hi {there}", ref=5)
        left = await rig.broker.quit("lobby", alice, ref="q")
        events = [entered.event, second.event, talked.event, left]
        assert [(e.type, e.sender, e.user_count) for e in events] == [
            ("ENTER", "User1", 1), ("ENTER", "User2", 2), ("TALK", "User1", 2), ("QUIT", "User1", 1)
        ]
        assert talked.event.message == "hi {there}" and not talked.duplicate
        assert left.message == "User1 left" and entered.event.message == "User1 entered"
        assert_increasing(events)
        await rig.fed(4)
        assert [d.event for d in rig.feed] == events
        assert [(d.origin, d.ref) for d in rig.feed] == [
            (alice.connection_id, "e1"), (bob.connection_id, None),
            (alice.connection_id, 5), (alice.connection_id, "q"),
        ]

    @pytest_twisted.ensureDeferred
    async def test_only_subscribed_rooms_are_fed(self, make_rig):
        """No deliveries for a room never subscribed or unsubscribed; the marker room proves it."""
        rig = await make_rig()
        alice = rig.member(1)
        await rig.broker.subscribe("marker")
        await rig.broker.subscribe("lobby")
        await rig.broker.enter("other", alice)
        await rig.broker.enter("lobby", alice)
        await rig.fed(1)
        await rig.broker.unsubscribe("lobby")
        await rig.broker.talk("lobby", alice, "unheard")
        await rig.broker.enter("marker", alice)
        # One feed, one order: once the marker's ENTER is in, nothing
        # published before it is still on its way.
        await rig.fed(2)
        assert [(d.event.room, d.event.type) for d in rig.feed] == [
            ("lobby", "ENTER"), ("marker", "ENTER")
        ]

    @pytest_twisted.ensureDeferred
    async def test_replay_since(self, make_rig):
        """ENTER with since gets the TALKs in between, in order, and whether that is all of them."""
        rig = await make_rig()
        alice, bob = rig.member(1), rig.member(2)
        first = await rig.broker.enter("lobby", alice)
        said = [(await rig.broker.talk("lobby", alice, f"m{i}")).event for i in range(3)]
        back = await rig.broker.enter("lobby", bob, since=said[0].id)
        assert back.replay == tuple(said[1:]) and back.complete is True
        assert event_id_key(back.event.id) > event_id_key(said[-1].id)
        everything = await rig.broker.enter("lobby", rig.member(3), since=first.event.id)
        assert everything.replay == tuple(said) and everything.complete is True
        nothing = await rig.broker.enter("lobby", rig.member(4), since=back.event.id)
        assert nothing.replay == () and nothing.complete is True
        # An id from another life of the broker cannot vouch for anything.
        foreign = await rig.broker.enter("lobby", rig.member(5), since="1-1")
        assert foreign.replay == tuple(said) and foreign.complete is False
        plain = await rig.broker.enter("lobby", rig.member(6))
        assert plain.replay == () and plain.complete is True

    @pytest_twisted.ensureDeferred
    async def test_history_cap_makes_replay_incomplete(self, make_rig):
        """With [history] size 2, a since before the evicted TALK says complete: false."""
        rig = await make_rig(history_size=2)
        alice = rig.member(1)
        first = await rig.broker.enter("lobby", alice)
        said = [(await rig.broker.talk("lobby", alice, f"m{i}")).event for i in range(3)]
        old = await rig.broker.enter("lobby", rig.member(2), since=first.event.id)
        assert old.replay == tuple(said[1:]) and old.complete is False
        recent = await rig.broker.enter("lobby", rig.member(3), since=said[0].id)
        assert recent.replay == tuple(said[1:]) and recent.complete is True

    @pytest_twisted.ensureDeferred
    async def test_no_history(self, make_rig):
        """With [history] size 0 nothing is replayed, and once anything was said, that is incomplete."""
        rig = await make_rig(history_size=0)
        alice = rig.member(1)
        first = await rig.broker.enter("lobby", alice)
        quiet = await rig.broker.enter("lobby", rig.member(2), since=first.event.id)
        assert quiet.replay == () and quiet.complete is True
        await rig.broker.talk("lobby", alice, "gone at once")
        after = await rig.broker.enter("lobby", rig.member(3), since=first.event.id)
        assert after.replay == () and after.complete is False

    @pytest_twisted.ensureDeferred
    async def test_cid_is_accepted_once(self, make_rig):
        """A repeated (sub, cid) returns the original event and publishes nothing."""
        rig = await make_rig()
        alice, alice_again, bob = rig.member(1), rig.member(2, sub="user1"), rig.member(3)
        await rig.broker.subscribe("lobby")
        await rig.broker.enter("lobby", alice)
        original = await rig.broker.talk("lobby", alice, "once", cid="c-1", ref="a")
        retry = await rig.broker.talk("lobby", alice_again, "once (retry)", cid="c-1", ref="b")
        assert retry.duplicate is True and retry.event == original.event
        other_user = await rig.broker.talk("lobby", bob, "same cid, other sub", cid="c-1")
        other_room = await rig.broker.talk("annex", alice, "same cid, other room", cid="c-1")
        no_cid = [await rig.broker.talk("lobby", alice, "no cid") for _ in range(2)]
        assert not any(t.duplicate for t in [other_user, other_room] + no_cid)
        assert len({t.event.id for t in [original, other_user] + no_cid}) == 4
        await rig.fed(5)
        talks = [d.event for d in rig.feed if d.event.type == "TALK"]
        assert talks == [original.event, other_user.event] + [t.event for t in no_cid]

    @pytest_twisted.ensureDeferred
    async def test_tickets_work_once_and_expire(self, make_rig):
        """A ticket is redeemed once; unknown and expired ones give None."""
        rig = await make_rig()
        grant = Principal(sub="alice", name="Alice", exp=2**40, rooms=frozenset({"lobby"}))
        await rig.broker.issue_ticket("ticket-1", grant, 30)
        await rig.broker.issue_ticket("ticket-2", grant, 0.3)
        assert await rig.broker.redeem_ticket("ticket-1") == grant
        assert await rig.broker.redeem_ticket("ticket-1") is None
        assert await rig.broker.redeem_ticket("never-issued") is None
        await rig.elapse(0.5)
        assert await rig.broker.redeem_ticket("ticket-2") is None

    @pytest_twisted.ensureDeferred
    async def test_room_registry(self, make_rig):
        """Rooms are listed with their counts; an empty room without history is forgotten."""
        rig = await make_rig()
        alice, bob = rig.member(1), rig.member(2)
        await rig.broker.enter("lobby", alice)
        await rig.broker.enter("lobby", bob)
        await rig.broker.enter("ops", alice)
        await rig.broker.enter("chat", bob)
        await rig.broker.talk("chat", bob, "kept in history")
        assert await rig.broker.list_rooms() == [("chat", 1), ("lobby", 2), ("ops", 1)]
        await rig.broker.quit("ops", alice)
        await rig.broker.quit("chat", bob)
        assert await rig.broker.list_rooms() == [("chat", 0), ("lobby", 2)]
        again = await rig.broker.enter("ops", alice)
        assert again.event.user_count == 1

    @pytest_twisted.ensureDeferred
    async def test_room_limit(self, make_rig):
        """A new room beyond max_rooms is refused and changes nothing; known rooms stay open."""
        rig = await make_rig(max_rooms=2)
        alice, bob = rig.member(1), rig.member(2)
        await rig.broker.enter("one", alice)
        await rig.broker.enter("two", alice)
        try:
            await rig.broker.enter("three", alice)
        except RoomLimitReached:
            pass
        else:
            raise AssertionError("a third room was made")
        assert sorted(await rig.broker.list_rooms()) == [("one", 1), ("two", 1)]
        entered = await rig.broker.enter("two", bob)
        assert entered.event.user_count == 2

    @pytest_twisted.ensureDeferred
    async def test_duplicate_after_history_moved_on(self, make_rig):
        """
        A resend whose original left history is still a duplicate: the
        original's id and time, the resend's text, nothing stored or
        published (brokers keep the cid's id, not the event).
        """
        rig = await make_rig(history_size=1)
        alice = rig.member(1)
        await rig.broker.subscribe("lobby")
        await rig.broker.enter("lobby", alice)
        original = await rig.broker.talk("lobby", alice, "first", cid="c-1")
        newer = await rig.broker.talk("lobby", alice, "second")
        retry = await rig.broker.talk("lobby", alice, "first", cid="c-1", ref="again")
        assert retry.duplicate is True
        assert (retry.event.id, retry.event.ts, retry.event.type) == (original.event.id, original.event.ts, "TALK")
        assert (retry.event.message, retry.event.sender, retry.event.room) == ("first", "User1", "lobby")
        marker = await rig.broker.talk("lobby", alice, "marker")
        await rig.fed(4)
        assert [d.event for d in rig.feed[1:]] == [original.event, newer.event, marker.event]
        late = await rig.broker.enter("lobby", rig.member(2), since=original.event.id)
        assert late.replay == (marker.event,)

    @pytest_twisted.ensureDeferred
    async def test_history_byte_budget(self, make_rig):
        """
        History keeps at most max_bytes of what the broker stores, the
        newest TALKs, the oldest dropped first.  A TALK costs at least its
        text's UTF-8 bytes: the embedded broker counts those, Redis the
        stored event (escaped JSON and envelope), so fewer fit there.
        """
        rig = await make_rig(max_bytes=4096)
        alice = rig.member(1)
        first = await rig.broker.enter("lobby", alice)
        said = [(await rig.broker.talk("lobby", alice, "\u00e9" * 150)).event for _ in range(20)]  # 300 bytes each
        back = await rig.broker.enter("lobby", rig.member(2), since=first.event.id)
        kept = back.replay
        assert 0 < len(kept) < len(said) and kept == tuple(said[-len(kept):]) and back.complete is False
        assert sum(len(e.message.encode("utf-8")) for e in kept) <= 4096
        recent = await rig.broker.enter("lobby", rig.member(3), since=said[-len(kept) - 1].id)
        assert recent.replay == kept and recent.complete is True
        huge = await rig.broker.talk("lobby", alice, "x" * 4097)
        assert not huge.duplicate
        after = await rig.broker.enter("lobby", rig.member(4), since=said[-1].id)
        assert after.replay == () and after.complete is False

    @pytest_twisted.ensureDeferred
    async def test_empty_room_expires_after_ttl(self, make_rig):
        """A room with no members is forgotten, history and all, ttl after its last event."""
        rig = await make_rig(ttl=1, max_rooms=2)
        alice, bob = rig.member(1), rig.member(2)
        await rig.broker.enter("kept", bob)
        first = await rig.broker.enter("lobby", alice)
        said = await rig.broker.talk("lobby", alice, "soon gone")
        await rig.broker.quit("lobby", alice)
        assert ("lobby", 0) in await rig.broker.list_rooms()
        await rig.elapse(1.5)
        assert await rig.broker.list_rooms() == [("kept", 1)]
        # Its slot is free again, and nothing of it is replayed.
        await rig.broker.enter("other", alice)
        await rig.broker.quit("other", alice)
        back = await rig.broker.enter("lobby", alice, since=first.event.id)
        assert back.replay == () and back.complete is False
        assert event_id_key(back.event.id) > event_id_key(said.event.id)

    @pytest_twisted.ensureDeferred
    async def test_new_rooms_per_user(self, make_rig):
        """One user makes at most max_new_rooms_per_user of the rooms held; others still can."""
        rig = await make_rig(max_new_rooms_per_user=2)
        alice, alice_again, bob = rig.member(1), rig.member(2, sub="user1"), rig.member(3)
        await rig.broker.enter("one", alice)
        await rig.broker.enter("two", alice_again)
        try:
            await rig.broker.enter("three", alice)
        except TooManyNewRooms as refused:
            assert refused.limit == 2
        else:
            raise AssertionError("a third room was made by one user")
        assert sorted(name for name, _ in await rig.broker.list_rooms()) == ["one", "two"]
        await rig.broker.enter("three", bob)
        entered = await rig.broker.enter("three", alice)
        assert entered.event.user_count == 2

    # --- the server API -------------------------------------------------------------

    @pytest_twisted.ensureDeferred
    async def test_publish_is_a_system_talk(self, make_rig):
        """publish stores and feeds a TALK marked system, from the given sender, replayed like any TALK."""
        rig = await make_rig()
        alice = rig.member(1)
        await rig.broker.subscribe("lobby")
        entered = await rig.broker.enter("lobby", alice)
        talked = await rig.broker.publish("lobby", "Bot", "maintenance at 22:00")
        assert not talked.duplicate
        event = talked.event
        assert (event.type, event.sender, event.message, event.system, event.user_count) == (
            "TALK", "Bot", "maintenance at 22:00", True, 1
        )
        own = await rig.broker.talk("lobby", alice, "ok")
        assert own.event.system is False
        assert_increasing([entered.event, event, own.event])
        await rig.fed(3)
        assert [d.event for d in rig.feed][1:] == [event, own.event]
        later = await rig.broker.enter("lobby", rig.member(2), since=entered.event.id)
        assert later.replay == (event, own.event)

    @pytest_twisted.ensureDeferred
    async def test_publish_cid_is_accepted_once(self, make_rig):
        """The same cid answers the original id and publishes nothing; a user's cid is another namespace."""
        rig = await make_rig()
        alice = rig.member(1, sub="system")
        await rig.broker.subscribe("lobby")
        await rig.broker.enter("lobby", alice)
        first = await rig.broker.publish("lobby", "system", "once", cid="n-1")
        again = await rig.broker.publish("lobby", "Other", "once more", cid="n-1")
        assert again.duplicate and again.event.id == first.event.id
        users = await rig.broker.talk("lobby", alice, "mine", cid="n-1")
        assert not users.duplicate
        await rig.fed(3)
        assert [d.event.message for d in rig.feed[1:]] == ["once", "mine"]

    @pytest_twisted.ensureDeferred
    async def test_publish_makes_the_room_within_the_limit(self, make_rig):
        """Publishing to an unknown room makes it (0 users, history); beyond max_rooms it is refused."""
        rig = await make_rig(max_rooms=2)
        await rig.broker.enter("one", rig.member(1))
        made = await rig.broker.publish("notices", "system", "first")
        assert made.event.user_count == 0
        assert await rig.broker.list_rooms() == [("notices", 0), ("one", 1)]
        assert await rig.broker.members("notices") == ()
        events, complete = await rig.broker.history("notices")
        assert events == (made.event,) and complete
        try:
            await rig.broker.publish("third", "system", "no room for it")
        except RoomLimitReached:
            pass
        else:
            raise AssertionError("a third room was made")
        await rig.broker.publish("one", "system", "known rooms stay open")
        assert await rig.broker.history("third") is None

    @pytest_twisted.ensureDeferred
    async def test_members_across_connections(self, make_rig):
        """members lists every connection in the room, sorted; None for a room the registry does not hold."""
        rig = await make_rig()
        a1, a2, bob = rig.member(1, sub="alice"), rig.member(2, sub="alice"), rig.member(3, sub="bob")
        for member in (bob, a2, a1):
            await rig.broker.enter("lobby", member)
        assert await rig.broker.members("lobby") == (a1, a2, bob)
        await rig.broker.quit("lobby", a2)
        assert await rig.broker.members("lobby") == (a1, bob)
        assert await rig.broker.members("nowhere") is None

    @pytest_twisted.ensureDeferred
    async def test_history_pages(self, make_rig):
        """history: the newest limit without since, the first limit after since, complete as for replay."""
        rig = await make_rig(history_size=4)
        alice = rig.member(1)
        entered = await rig.broker.enter("lobby", alice)
        said = [(await rig.broker.talk("lobby", alice, f"m{i}")).event for i in range(3)]
        assert await rig.broker.history("lobby") == (tuple(said), True)
        assert await rig.broker.history("lobby", limit=2) == (tuple(said[1:]), False)
        assert await rig.broker.history("lobby", since=entered.event.id, limit=2) == (tuple(said[:2]), True)
        assert await rig.broker.history("lobby", since=said[1].id, limit=2) == ((said[2],), True)
        assert await rig.broker.history("lobby", since=said[2].id) == ((), True)
        more = [(await rig.broker.talk("lobby", alice, f"n{i}")).event for i in range(3)]
        events, complete = await rig.broker.history("lobby", since=entered.event.id, limit=10)
        assert events == tuple(said[2:] + more) and complete is False
        assert await rig.broker.history("lobby") == (tuple(said[2:] + more), False)
        assert await rig.broker.history("nowhere") is None

    @pytest_twisted.ensureDeferred
    async def test_disconnect_voids_tickets_and_commands(self, make_rig):
        """disconnect voids the user's unredeemed tickets (only theirs) and sends DISCONNECT with the reason."""
        rig = await make_rig()
        alice = Principal(sub="alice", name="Alice", exp=2**40)
        bob = Principal(sub="bob", name="Bob", exp=2**40)
        await rig.broker.issue_ticket("a-1", alice, 30)
        await rig.broker.issue_ticket("a-2", alice, 30)
        await rig.broker.issue_ticket("b-1", bob, 30)
        await rig.broker.disconnect("alice", "banned")
        await rig.controlled(1)
        assert rig.controls == [Control(DISCONNECT, "alice", reason="banned")]
        assert await rig.broker.redeem_ticket("a-1") is None
        assert await rig.broker.redeem_ticket("a-2") is None
        assert await rig.broker.redeem_ticket("b-1") == bob
        await rig.broker.issue_ticket("a-3", alice, 30)  # a ticket after the disconnect works
        assert await rig.broker.redeem_ticket("a-3") == alice

    @pytest_twisted.ensureDeferred
    async def test_kick_commands(self, make_rig):
        """kick sends KICK for the user and room."""
        rig = await make_rig()
        await rig.broker.kick("lobby", "alice")
        await rig.controlled(1)
        assert rig.controls == [Control(KICK, "alice", room="lobby")]
