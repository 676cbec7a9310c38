# -*- test-case-name: tests.test_timers -*-
"""
Autobahn's per-connection timers (the opening and closing handshake
timeouts, the auto-ping and its timeout), batched as txaio batches them,
for a fraction of the memory.

Autobahn asks its factory's C{_batched_timer} for every such timer.
txaio's wraps each call in a C{_BatchedCall} holding a closure over the
function and its arguments, about 500 bytes per timer; every idle
connection keeps its auto-ping timer armed for its whole life
(docs/performance.md).  L{BatchedTimer} keeps a slotted handle per call in
a dict per second (so a cancel is a dict deletion, not txaio's list
search), and runs on the factory's injected clock.
"""

from functools import partial
from itertools import islice
from math import ceil

from twisted.logger import Logger

log = Logger()

_GONE = object()


class _Call:
    """One pending call: what Autobahn holds and may C{cancel()}."""

    __slots__ = ("_calls", "_func", "_args")

    def __init__(self, calls, func, args):
        self._calls = calls
        self._func = func
        self._args = args

    def cancel(self):
        """Do not run it (a no-op once it ran or was cancelled)."""
        calls, self._calls = self._calls, None
        if calls is not None:
            calls.pop(self, None)
            if not calls:
                calls.emptied()


class _Second(dict):
    """
    The calls due at one whole second, in order (C{{_Call: None}}), with
    the clock call that runs them next (L{None} while they run).
    """

    __slots__ = ("_seconds", "_due", "wake")

    def __init__(self, seconds, due):
        super().__init__()
        self._seconds = seconds  # the timer's due second -> _Second, while it waits
        self._due = due
        self.wake = None

    def emptied(self):
        """Its last call was cancelled: no clock call for it, and no entry."""
        wake, self.wake = self.wake, None
        if wake is not None:
            wake.cancel()
        if self._seconds.get(self._due) is self:
            del self._seconds[self._due]


class BatchedTimer:
    """
    txaio's C{IBatchedTimer} (C{call_later(delay, func, *args, **kwargs)},
    returning an object with C{cancel()}), batched as txaio batches: a
    call is due at a whole second, one clock call per such second runs all
    its calls, in the order they were made, C{chunk_size} at a time spread
    over C{chunk_seconds} (so a second holding many thousand pings does not
    write them all in one reactor turn).  Unlike txaio's, that second is
    C{ceil(now + delay)}, not C{int(now + delay)}: Autobahn's timeouts are
    what a peer is promised at least (C{[websocket] handshake_timeout} from
    the request, C{ping_timeout}, the close timeout), so a call may run up
    to a second late, never early (with txaio's, a C{handshake_timeout} of
    1 could fail an upgrade after a few milliseconds).

    A call that raises is logged and the others still run.
    """

    def __init__(self, clock, chunk_size=1000, chunk_seconds=0.2):
        """
        @param clock: an C{IReactorTime}.
        @param chunk_size: calls run per reactor turn, at most.
        @param chunk_seconds: what the chunks of one second are spread over.
        """
        self._clock = clock
        self._chunk_size = chunk_size
        self._chunk_seconds = chunk_seconds
        self._seconds = {}  # due second -> its _Second, until it runs

    def call_later(self, delay, func, *args, **kwargs):
        """
        IBatchedTimer API: run C{func(*args, **kwargs)} at the whole second
        C{ceil(now + delay)}: never early, up to a second late.

        @return: a handle whose C{cancel()} unschedules it.
        """
        if kwargs:
            func = partial(func, **kwargs)
        now = self._clock.seconds()
        due = ceil(now + delay)
        calls = self._seconds.get(due)
        if calls is None:
            calls = self._seconds[due] = _Second(self._seconds, due)
            calls.wake = self._clock.callLater(max(0.0, due - now), self._run_second, due)
        call = _Call(calls, func, args)
        calls[call] = None
        return call

    def pending(self):
        """How many calls are waiting (for tests and the curious)."""
        return sum(len(calls) for calls in self._seconds.values())

    def _run_second(self, due):
        calls = self._seconds.pop(due)
        chunks = -(-len(calls) // self._chunk_size)
        self._run_chunk(calls, self._chunk_seconds / max(1, chunks))

    def _run_chunk(self, calls, pause):
        calls.wake = None
        for call in list(islice(calls, self._chunk_size)):
            # One an earlier call of this chunk cancelled has left the dict.
            if calls.pop(call, _GONE) is _GONE:
                continue
            call._calls = None
            try:
                call._func(*call._args)
            except Exception:
                log.failure("timer call {call!r} failed", call=call._func)
        if calls:
            calls.wake = self._clock.callLater(pause, self._run_chunk, calls, pause)
