# -*- test-case-name: tests.test_drain -*-
"""
Graceful drain on SIGTERM.

When a drain starts, L{DrainState} says so at once, and everything that
admits new work asks it: C{/healthz} and C{/readyz} answer 503
C{{"status": "draining"}}, new WebSocket upgrades get 503.  Then every open
WebSocket is closed with 1001, spread over C{[server] drain_time}
(L{close_times}): thousands of clients closed in the same millisecond would
all reconnect to the other instances in the same millisecond.  The process
exits once the last client is gone, or at C{drain_time} + L{GRACE}.
"""

import random as _random

from twisted.internet import defer
from twisted.logger import Logger

from chatd import admin

log = Logger()

GRACE = 2.0  # seconds after drain_time before the process exits regardless
BATCH_INTERVAL = 0.1  # seconds between batches of closes


def close_times(count, drain_time, random, interval=BATCH_INTERVAL):
    """
    When to close each of C{count} connections, in seconds from the start
    of the drain: batches every C{interval} across C{drain_time}, each batch
    at a random offset within its slot, and the connections spread evenly
    over the batches.  Sorted; the last is below C{drain_time}.

    @param random: a C{random.Random} (tests pass a seeded one).
    """
    if count == 0:
        return []
    slots = max(1, min(count, int(drain_time / interval)))
    width = drain_time / slots
    starts = [slot * width + random.uniform(0, width * 0.9) for slot in range(slots)]
    return [starts[i * slots // count] for i in range(count)]


class DrainState:
    """Whether a drain has started, and the readiness probes' answer."""

    draining = False

    def __init__(self, broker_available=lambda: True):
        """
        @param broker_available: returns whether the broker can serve.
        """
        self._broker_available = broker_available

    def readiness(self):
        """L{chatd.admin.ReadyResource}'s answer."""
        if self.draining:
            return admin.DRAINING
        if not self._broker_available():
            return admin.UNAVAILABLE
        return admin.READY


def drain(connections, close, drain_time, clock, when_empty, random=None):
    """
    Close C{connections} over C{drain_time}; a Deferred that fires once
    C{when_empty()} fires or C{drain_time} + L{GRACE} has passed.

    @param connections: the open connections, snapshot by the caller.
    @param close: called with each connection when its turn comes.
    @param when_empty: returns a Deferred that fires when none is left.
    @return: a Deferred firing with C{True} when every client left in time,
        C{False} when the grace period ran out first.
    """
    random = random or _random.Random()
    connections = list(connections)
    random.shuffle(connections)
    calls = [
        clock.callLater(delay, close, connection)
        for delay, connection in zip(close_times(len(connections), drain_time, random), connections)
    ]
    log.info(
        "draining: closing {count} websocket connections over {drain_time} s",
        count=len(connections), drain_time=drain_time,
    )
    done = when_empty()
    done.addTimeout(drain_time + GRACE, clock)

    def finished(result):
        for call in calls:
            if call.active():
                call.cancel()
        if isinstance(result, defer.Failure):
            result.trap(defer.TimeoutError)
            log.warn("drain time over; exiting with clients still connected")
            return False
        return True

    done.addBoth(finished)
    return done
