"""
chatd.timers: Autobahn's batched timers on an injected clock, and on a
real Autobahn connection (its auto-ping and ping timeout).
"""

import txaio
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from chatd.timers import BatchedTimer
from tests.fakes import MemoryClient
from tests.test_ws import World, clocked  # noqa: F401 - the fixture


def test_call_runs_at_the_whole_second_of_its_due_time():
    """Due at ceil(now + delay), not before (txaio: int(now + delay)), and once."""
    clock = Clock()
    clock.advance(100.5)
    timer = BatchedTimer(clock)
    ran = []
    timer.call_later(2, ran.append, "a")
    clock.advance(2.4)  # 102.9
    assert ran == []
    clock.advance(0.1)  # 103.0 = ceil(102.5)
    assert ran == ["a"]
    clock.advance(10)
    assert ran == ["a"] and timer.pending() == 0


def test_cancel_unschedules_once():
    """A cancelled call never runs; cancelling again, or after it ran, does nothing."""
    clock = Clock()
    timer = BatchedTimer(clock)
    ran = []
    cancelled = timer.call_later(1, ran.append, "cancelled")
    kept = timer.call_later(1, ran.append, "kept")
    cancelled.cancel()
    cancelled.cancel()
    assert timer.pending() == 1
    clock.advance(1)
    kept.cancel()
    assert ran == ["kept"]


def test_calls_of_one_second_run_in_order_in_chunks():
    """Calls due the same second share one clock call and run in order, chunk by chunk."""
    clock = Clock()
    timer = BatchedTimer(clock, chunk_size=2, chunk_seconds=0.3)
    ran = []
    for i in range(5):
        timer.call_later(1, ran.append, i)
    timer.call_later(1, lambda **kw: ran.append(kw), word="kw")
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1)
    assert ran == [0, 1]
    clock.advance(0.1)  # three chunks over 0.3 s
    assert ran == [0, 1, 2, 3]
    clock.advance(0.1)
    assert ran == [0, 1, 2, 3, 4, {"word": "kw"}]
    assert clock.getDelayedCalls() == []


def test_a_call_cancelled_by_an_earlier_one_does_not_run():
    """Closing one connection in a timer may cancel another's call in the same chunk."""
    clock = Clock()
    timer = BatchedTimer(clock)
    ran = []
    later = []
    timer.call_later(1, lambda: later[0].cancel())
    later.append(timer.call_later(1, ran.append, "cancelled"))
    timer.call_later(1, ran.append, "third")
    clock.advance(1)
    assert ran == ["third"]


def test_a_second_whose_calls_are_all_cancelled_leaves_no_clock_call():
    """
    Cancelling every call of a second cancels its clock call too (the
    reactor keeps no call that would do nothing); a later call for that
    second gets a clock call of its own and runs.
    """
    clock = Clock()
    timer = BatchedTimer(clock)
    ran = []
    calls = [timer.call_later(delay, ran.append, "cancelled") for delay in (0.2, 0.7, 1.0)]
    other = timer.call_later(2, ran.append, "cancelled")
    assert len(clock.getDelayedCalls()) == 2
    for call in calls:
        call.cancel()
    assert [c.getTime() for c in clock.getDelayedCalls()] == [2.0]
    other.cancel()
    assert clock.getDelayedCalls() == [] and timer.pending() == 0
    timer.call_later(1, ran.append, "again")
    clock.advance(1)
    assert ran == ["again"] and clock.getDelayedCalls() == []


def test_calls_cancelled_between_chunks_leave_no_clock_call():
    """Once a second has started, cancelling the rest of its calls cancels its next chunk's clock call."""
    clock = Clock()
    timer = BatchedTimer(clock, chunk_size=1)
    ran = []
    calls = [timer.call_later(1, ran.append, i) for i in range(3)]
    clock.advance(1)
    assert ran == [0] and len(clock.getDelayedCalls()) == 1
    calls[1].cancel()
    assert len(clock.getDelayedCalls()) == 1  # the third is still due
    calls[2].cancel()
    assert clock.getDelayedCalls() == []
    clock.advance(1)
    assert ran == [0]


def test_a_failing_call_is_logged_and_the_others_run(logged_failures):
    """One connection's timer failing does not keep the others' from running."""
    clock = Clock()
    timer = BatchedTimer(clock)
    ran = []
    timer.call_later(1, lambda: 1 / 0)
    timer.call_later(1, ran.append, "after")
    logged_failures.expect("ZeroDivisionError")
    clock.advance(1)
    assert ran == ["after"]
    assert [e["log_failure"].type for e in logged_failures.events] == [ZeroDivisionError]


class _Deaf(MemoryClient):
    """A client that never answers a ping."""

    pings = 0

    def onPing(self, payload):
        self.pings += 1


def test_auto_ping_and_its_timeout_run_on_the_factory_clock(clocked):  # noqa: F811
    """
    The server pings an idle client every ping_interval and drops one that
    does not answer within ping_timeout, on the clock the factory was given
    (not txaio's global loop).
    """
    world = World(websocket__ping_interval=5, websocket__ping_timeout=3)
    txaio.config.loop = MemoryReactorClock()  # not the factory's clock
    client = world.connect(client_class=_Deaf)
    assert client.state == client.STATE_OPEN
    [server] = world.servers
    world.reactor.advance(5)
    world.pumps.flush()
    assert client.pings == 1 and server.state == server.STATE_OPEN
    world.reactor.advance(3)
    world.pumps.flush()
    assert server.state == server.STATE_CLOSED
    assert world.factory._batched_timer.pending() == 0


def test_a_client_that_answers_pings_stays(clocked):  # noqa: F811
    """A client that answers is pinged again, not dropped."""
    world = World(websocket__ping_interval=5, websocket__ping_timeout=3)
    txaio.config.loop = MemoryReactorClock()
    client = world.connect()
    [server] = world.servers
    for _ in range(3):
        world.reactor.advance(5)
        world.pumps.flush()
    assert server.state == server.STATE_OPEN and client.state == client.STATE_OPEN
    assert world.factory._batched_timer.pending() == 1  # the next ping


@given(
    start=st.floats(min_value=0, max_value=2e9, allow_nan=False),
    delays=st.lists(st.floats(min_value=0.001, max_value=40, allow_nan=False), min_size=1, max_size=20),
)
@hypothesis_settings(max_examples=200, deadline=None)
def test_no_call_runs_before_its_delay(start, delays):
    """
    Autobahn's timeouts are minimums a peer is promised (handshake_timeout
    from the request, ping_timeout, the close timeout): no call runs before
    C{delay} has passed, and each runs within a second after (before: at
    int(now + delay), up to a second early, as txaio's, so a
    handshake_timeout of 1 could fail an upgrade after a few ms).
    """
    clock = Clock()
    clock.advance(start)
    timer = BatchedTimer(clock)
    ran = {}
    due = {}
    for i, delay in enumerate(delays):
        due[i] = clock.seconds() + delay
        timer.call_later(delay, lambda i=i: ran.setdefault(i, clock.seconds()))
    for _ in range(int(max(delays) + 3) * 10):
        if not clock.getDelayedCalls():
            break
        clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
    assert sorted(ran) == list(range(len(delays)))
    for i, at in ran.items():
        # (1e-6: the clock's float sum now + (second - now) may fall an ulp short)
        assert due[i] - 1e-6 <= at < due[i] + 1, (i, due[i], at)
