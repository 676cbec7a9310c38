# -*- test-case-name: tests.test_broker_memory -*-
"""
chatd.broker.memory beyond the shared contract (tests/broker_contract.py):
what its timer does, on a Clock.
"""

from twisted.internet.task import Clock

from chatd.broker.interfaces import DEDUP_WINDOW, Member
from chatd.broker.memory import SWEEP_INTERVAL, MemoryBroker

ALICE = Member("i:1", "alice", "Alice")


def started(**kwargs):
    clock = Clock()
    clock.advance(1_700_000_000)
    broker = MemoryBroker(clock, instance_id="i", **kwargs)
    broker.startService()
    return clock, broker


def test_cids_expire_on_the_timer():
    """Remembered cids go with the sweep after their window, with no TALK in the room."""
    clock, broker = started(history_size=0)
    broker.enter("lobby", ALICE)
    for i in range(1000):
        broker.talk("lobby", ALICE, "x", cid=f"c{i}")
    assert broker._rooms["lobby"].cids == 1000
    clock.advance(DEDUP_WINDOW + SWEEP_INTERVAL)
    assert broker._rooms["lobby"].cids == 0
    broker.stopService()


def test_sweep_forgets_quiet_empty_rooms():
    """The sweep forgets a room ttl after it emptied, and frees its maker's count; a room with members stays."""
    clock, broker = started(ttl=600, max_new_rooms_per_user=2)
    broker.enter("lobby", ALICE)
    broker.talk("lobby", ALICE, "kept a while")
    broker.quit("lobby", ALICE)
    broker.enter("ops", ALICE)
    clock.advance(600 + SWEEP_INTERVAL)
    assert sorted(broker._rooms) == ["ops"]
    assert broker._made == {"alice": {"ops"}}
    broker.stopService()
