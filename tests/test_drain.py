# -*- test-case-name: tests.test_drain -*-
"""chatd.drain: closes spread over drain_time, the exit deadline, and the probes' state."""

import random

from twisted.internet import defer
from twisted.internet.task import Clock

from chatd import admin, drain


def test_close_times_spread_over_drain_time():
    """1000 connections: batches across the whole drain time, none at or after its end."""
    times = drain.close_times(1000, 5.0, random.Random(1))
    assert len(times) == 1000 and times == sorted(times)
    assert 0 <= times[0] < 0.1 and 4.8 < times[-1] < 5.0
    batches = sorted(set(times))
    assert len(batches) == 50  # one per BATCH_INTERVAL
    # Spread evenly: no batch holds more than its share (20) plus one.
    assert max(times.count(t) for t in batches) <= 21


def test_close_times_are_jittered():
    """Two drains do not close in lock-step: the batch offsets are random."""
    a = drain.close_times(100, 5.0, random.Random(1))
    b = drain.close_times(100, 5.0, random.Random(2))
    assert a != b


def test_close_times_few_connections_and_zero_drain():
    """Fewer connections than slots: one batch each; drain_time 0: all at once."""
    assert len(set(drain.close_times(3, 5.0, random.Random(1)))) == 3
    assert drain.close_times(4, 0, random.Random(1)) == [0.0] * 4
    assert drain.close_times(0, 5.0, random.Random(1)) == []


class Connections:
    """Open connections; the last one to close fires the waiters."""

    def __init__(self, count):
        self.open = set(range(count))
        self.closed_at = {}
        self.waiters = []

    def when_empty(self):
        d = defer.Deferred()
        if not self.open:
            d.callback(None)
        else:
            self.waiters.append(d)
        return d

    def close(self, clock, connection):
        self.closed_at[connection] = clock.seconds()
        self.open.discard(connection)
        if not self.open:
            for waiter in self.waiters:
                waiter.callback(None)


def test_drain_closes_over_time_and_fires_when_empty():
    """Every connection is closed within drain_time; the drain ends when the last leaves."""
    clock = Clock()
    conns = Connections(200)
    result = []
    d = drain.drain(sorted(conns.open), lambda c: conns.close(clock, c), 5.0, clock,
                    conns.when_empty, random.Random(3))
    d.addCallback(result.append)
    clock.advance(2.5)
    assert 50 < len(conns.closed_at) < 150  # about half, not all at once
    for _ in range(30):
        clock.advance(0.1)
    assert result == [True]
    assert max(conns.closed_at.values()) < 5.0


def test_drain_gives_up_after_grace():
    """Clients that never leave: the drain ends at drain_time + 2 s, pending closes cancelled."""
    clock = Clock()
    closed = []
    never = defer.Deferred()
    result = []
    d = drain.drain(range(10), closed.append, 1.0, clock, lambda: never, random.Random(4))
    d.addCallback(result.append)
    clock.advance(2.9)
    assert result == [] and len(closed) == 10
    clock.advance(0.1)
    assert result == [False]
    assert clock.getDelayedCalls() == []


def test_drain_with_no_clients_ends_at_once():
    """Nobody connected: done immediately."""
    clock = Clock()
    result = []
    drain.drain([], None, 5.0, clock, lambda: defer.succeed(None)).addCallback(result.append)
    assert result == [True]


def test_readiness():
    """ready; unavailable while the broker is down; draining wins over both."""
    up = [True]
    state = drain.DrainState(lambda: up[0])
    assert state.readiness() == admin.READY
    up[0] = False
    assert state.readiness() == admin.UNAVAILABLE
    state.draining = True
    assert state.readiness() == admin.DRAINING
