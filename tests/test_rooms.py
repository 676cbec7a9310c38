# -*- test-case-name: tests.test_rooms -*-
"""
chatd.rooms: ids, user counts, the history window with its C{complete}
rule, and TALK deduplication by (sub, cid).
"""

import gc

import pytest

from chatd import messages
from chatd.broker.interfaces import Member
from chatd.messages import event_id_key
from chatd.rooms import DEDUP_MAX, DEDUP_WINDOW, Room, id_counter

EPOCH = 1700000000000
ALICE = Member("i:1", "alice", "Alice")
ALICE2 = Member("i:2", "alice", "Alice")  # the same user on a second connection
BOB = Member("i:3", "bob", "Bob")


def room(history_size=500, counter=None, name="lobby"):
    return Room(name, EPOCH, counter or id_counter(), history_size)


def talks(r, n, member=ALICE, now=0.0):
    return [r.talk(member, f"m{i}", None, now)[0] for i in range(n)]


def test_event_fields():
    """Events carry type, room, sender name, text, count and ms timestamp."""
    r = room()
    entered, replay, complete = r.enter(ALICE, None, 12.5)
    assert (replay, complete) == ((), True)
    assert (entered.type, entered.room, entered.sender, entered.message) == (
        messages.ENTER, "lobby", "Alice", "Alice entered"
    )
    assert (entered.user_count, entered.ts) == (1, 12500)
    said, duplicate = r.talk(ALICE, "hi", None, 13.0)
    assert (said.type, said.message, duplicate) == (messages.TALK, "hi", False)
    left = r.quit(ALICE, 14.0)
    assert (left.type, left.message, left.user_count) == (messages.QUIT, "Alice left", 0)


def test_ids_increase_with_epoch_prefix():
    """Every event's id starts with the epoch and increases, across event types."""
    r = room()
    events = [r.enter(ALICE, None, 0)[0], *talks(r, 3), r.enter(BOB, None, 0)[0], r.quit(ALICE, 0)]
    keys = [event_id_key(e.id) for e in events]
    assert all(k[0] == EPOCH for k in keys)
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_counter_shared_between_rooms():
    """Rooms of one broker share the counter, so a room made again keeps increasing."""
    counter = id_counter()
    first = room(counter=counter).enter(ALICE, None, 0)[0]
    other = room(counter=counter, name="ops").enter(ALICE, None, 0)[0]
    again = room(counter=counter).enter(ALICE, None, 0)[0]
    assert event_id_key(first.id) < event_id_key(other.id) < event_id_key(again.id)


def test_user_counts():
    """userCount is the number of connections after the event; the same user twice counts twice."""
    r = room()
    assert r.enter(ALICE, None, 0)[0].user_count == 1
    assert r.enter(ALICE2, None, 0)[0].user_count == 2
    assert r.enter(BOB, None, 0)[0].user_count == 3
    assert r.talk(BOB, "x", None, 0)[0].user_count == 3
    assert r.quit(ALICE, 0).user_count == 2
    assert r.users == 2


def test_quit_of_non_member_keeps_count():
    """A QUIT for a connection not in the room changes no count."""
    r = room()
    r.enter(ALICE, None, 0)
    assert r.quit(BOB, 0).user_count == 1


def test_history_keeps_only_talk():
    """History holds TALK events only, in order."""
    r = room()
    r.enter(ALICE, None, 0)
    said = talks(r, 2)
    r.quit(ALICE, 0)
    assert list(r.history) == said


def test_history_is_not_tracked_by_the_garbage_collector():
    """
    Kept events are plain tuples of strings and numbers, which the collector
    stops tracking once they survive a collection: a long history costs
    full collections nothing.  Read back, they are RoomEvents again.
    """
    r = room()
    r.enter(ALICE, None, 0)
    said = talks(r, 3)
    gc.collect()
    assert len(r._history) == 3
    assert not any(gc.is_tracked(kept) for kept in r._history)
    assert r.history_page(None, 10)[0] == tuple(said)
    assert all(isinstance(e, messages.RoomEvent) for e in r.history_page(None, 10)[0])


def test_replay_since():
    """ENTER with since gives the TALKs after it, in order, and complete."""
    r = room()
    r.enter(ALICE, None, 0)
    first, *rest = talks(r, 4)
    entered, replay, complete = r.enter(BOB, first.id, 0)
    assert list(replay) == rest and complete is True
    assert event_id_key(entered.id) > event_id_key(rest[-1].id)


def test_replay_since_latest_is_empty_and_complete():
    """since = the newest id: nothing to replay, nothing missed."""
    r = room()
    last = talks(r, 3)[-1]
    assert r.replay_since(last.id) == ((), True)


def test_history_cap():
    """Only the newest history_size TALKs stay; older since ids are incomplete."""
    r = room(history_size=3)
    said = talks(r, 6)
    assert list(r.history) == said[3:]
    # since = the newest dropped one: everything after it is still there.
    assert r.replay_since(said[2].id) == (tuple(said[3:]), True)
    # since older than that: said[2] is gone.
    assert r.replay_since(said[1].id) == (tuple(said[3:]), False)
    assert r.replay_since(said[4].id) == ((said[5],), True)


def test_history_size_zero():
    """With no history nothing is replayed, and an older since is incomplete."""
    r = room(history_size=0)
    r.enter(ALICE, None, 0)
    said = talks(r, 2)
    assert len(r.history) == 0
    assert r.replay_since(said[0].id) == ((), False)
    assert r.replay_since(said[1].id) == ((), True)


def test_history_size_zero_before_any_talk():
    """No TALK yet: nothing was missed."""
    r = room(history_size=0)
    entered = r.enter(ALICE, None, 0)[0]
    assert r.replay_since(entered.id) == ((), True)


@pytest.mark.parametrize("since", [f"{EPOCH - 1}-99999", f"{EPOCH + 1}-1", "5", "0-0-0"])
def test_since_from_another_epoch(since):
    """An id from another life of the broker cannot vouch for completeness."""
    r = room()
    said = talks(r, 2)
    replay, complete = r.replay_since(since)
    assert complete is False
    assert all(event_id_key(e.id) > event_id_key(since) for e in replay)
    assert set(replay) <= set(said)


def test_since_from_earlier_epoch_replays_all_history():
    """After a restart, since from before it replays all the history there is."""
    r = room()
    said = talks(r, 2)
    assert r.replay_since(f"{EPOCH - 1}-5") == (tuple(said), False)


def test_cid_dedup():
    """A repeated (sub, cid) returns the original event, stores and numbers nothing new."""
    r = room()
    first, dup = r.talk(ALICE, "hi", "c1", 0)
    assert dup is False
    again, dup = r.talk(ALICE2, "hi (resent)", "c1", 60)
    assert (again, dup) == (first, True)
    assert list(r.history) == [first]
    nxt = r.talk(ALICE, "next", None, 61)[0]
    assert event_id_key(nxt.id) == (EPOCH, event_id_key(first.id)[1] + 1)


def test_cid_is_per_user():
    """Another user's cid of the same value is not a duplicate."""
    r = room()
    a = r.talk(ALICE, "hi", "c1", 0)[0]
    b, dup = r.talk(BOB, "hi", "c1", 0)
    assert dup is False and b.id != a.id


def test_cid_window():
    """A cid is remembered for just under ten minutes, then forgotten."""
    r = room()
    first = r.talk(ALICE, "hi", "c1", 0)[0]
    assert r.talk(ALICE, "hi", "c1", DEDUP_WINDOW - 0.001) == (first, True)
    later, dup = r.talk(ALICE, "hi", "c1", DEDUP_WINDOW)
    assert dup is False and later.id != first.id
    assert DEDUP_WINDOW == 600.0


def test_cid_expiry_is_in_acceptance_order():
    """Old cids expire while newer ones are still remembered."""
    r = room()
    r.talk(ALICE, "a", "old", 0)
    newer = r.talk(ALICE, "b", "new", 300)[0]
    assert r.talk(ALICE, "a", "old", 650)[1] is False
    assert r.talk(ALICE, "b", "new", 650) == (newer, True)


def test_no_cid_no_dedup():
    """Without a cid the same text twice is two events."""
    r = room()
    a, b = talks(r, 1)[0], r.talk(ALICE, "m0", None, 0)[0]
    assert a.id != b.id


def test_forgettable():
    """A room is forgettable only with no members, no history and nothing dropped."""
    r = room()
    assert r.forgettable
    r.enter(ALICE, None, 0)
    assert not r.forgettable
    r.quit(ALICE, 0)
    assert r.forgettable
    talks(r, 1)
    assert not r.forgettable


def test_forgettable_history_zero():
    """With history size 0 a room that saw a TALK is kept, so later replays say incomplete."""
    r = room(history_size=0)
    talks(r, 1)
    assert not r.forgettable


def test_history_byte_budget():
    """History keeps at most max_bytes of TALK text (UTF-8); older since ids are incomplete."""
    r = Room("lobby", EPOCH, id_counter(), 500, max_bytes=1000)
    said = [r.talk(ALICE, "\u00e9" * 150, None, 0)[0] for _ in range(4)]  # 300 bytes each
    assert list(r.history) == said[1:] and r.history_bytes == 900
    assert r.replay_since(said[0].id) == (tuple(said[1:]), True)
    assert r.replay_since(f"{EPOCH}-0") == (tuple(said[1:]), False)


def test_text_over_the_budget_is_not_kept():
    """A TALK longer than max_bytes is numbered and returned but not kept; replay says so."""
    r = Room("lobby", EPOCH, id_counter(), 500, max_bytes=1024)
    small = r.talk(ALICE, "small", None, 0)[0]
    huge, duplicate = r.talk(ALICE, "x" * 1025, None, 0)
    assert not duplicate and huge.message == "x" * 1025
    assert list(r.history) == [small]
    assert r.replay_since(small.id) == ((), False)


def test_duplicate_after_eviction_answers_with_the_id():
    """The cid keeps only id and time: once the original left history, the answer has the resend's text."""
    r = room(history_size=1)
    first = r.talk(ALICE, "original", "c1", 5.0)[0]
    r.talk(ALICE, "pushes it out", None, 6.0)
    again, duplicate = r.talk(ALICE2, "resent", "c1", 7.0)
    assert duplicate is True
    assert (again.id, again.ts, again.message, again.sender) == (first.id, 5000, "resent", "Alice")
    assert [e.message for e in r.history] == ["pushes it out"]


def test_cid_bound_per_user():
    """At most DEDUP_MAX cids per user and room; the oldest is forgotten first, other users unaffected."""
    r = room(history_size=0)
    bobs = r.talk(BOB, "b", "bob-1", 0)[0]
    for i in range(DEDUP_MAX + 1):
        r.talk(ALICE, "a", f"c{i}", 0)
    assert r.cids == DEDUP_MAX + 1  # Alice's DEDUP_MAX and Bob's one
    assert r.talk(ALICE, "a", "c0", 1)[1] is False  # forgotten: stored again
    assert r.talk(ALICE, "a", "c2", 1)[1] is True
    assert r.talk(BOB, "b", "bob-1", 1)[0].id == bobs.id


def test_expire_cids_without_a_talk():
    """expire_cids (the broker's timer) forgets stale cids with no TALK needed."""
    r = room()
    for i in range(3):
        r.talk(ALICE, "a", f"c{i}", 0)
    r.talk(BOB, "b", "late", 300)
    r.expire_cids(DEDUP_WINDOW + 1)
    assert r.cids == 1
    r.expire_cids(DEDUP_WINDOW + 301)
    assert r.cids == 0


def test_expired():
    """Only a room with no members and no event for ttl seconds is expired."""
    r = room()
    assert not r.expired(10**9, 60)  # never used: nothing to time
    r.enter(ALICE, None, 100)
    assert not r.expired(1000, 60)  # a member is in
    r.quit(ALICE, 200)
    assert not r.expired(259.9, 60) and r.expired(260, 60)


def test_since_from_before_the_room_was_made_again():
    """A room made again (after it expired) cannot vouch for ids of its earlier life."""
    counter = id_counter()
    old = room(counter=counter)
    said = old.talk(ALICE, "gone with the room", None, 0)[0]
    new = room(counter=counter)
    new.enter(ALICE, None, 1)
    assert new.replay_since(said.id) == ((), False)
