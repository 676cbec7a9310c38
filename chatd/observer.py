# -*- test-case-name: tests.test_observer -*-
"""
One-shot observers: many callers wait for one thing to happen once.

The same shape as magic-wormhole's C{OneShotObserverList} (and Twisted's
own private one), so that the hub (a room's subscription), the WebSocket
factory (the last client gone) and the Redis link (the connection usable)
do not each keep a hand-written list of waiters.
"""

from twisted.internet import defer
from twisted.python.failure import Failure

_UNFIRED = object()


class OneShotObserverList:
    """
    Hands out Deferreds that all fire with the same result, once.

    Observers that arrive after L{fire} get an already-fired Deferred.  A
    Failure is given to every observer (each gets its own copy to consume).
    """

    def __init__(self):
        self._result = _UNFIRED
        self._observers = []

    @property
    def fired(self):
        """Whether L{fire} was called."""
        return self._result is not _UNFIRED

    def when_fired(self):
        """
        @return: a Deferred that fires with the result given to L{fire}.
        """
        if self._result is _UNFIRED:
            d = defer.Deferred()
            self._observers.append(d)
            return d
        if isinstance(self._result, Failure):
            return defer.fail(self._result)
        return defer.succeed(self._result)

    def fire(self, result):
        """
        Fire every waiting observer with C{result} (a value or a Failure).

        @raise RuntimeError: when called twice; use L{reset} to reuse it.
        """
        if self._result is not _UNFIRED:
            raise RuntimeError("OneShotObserverList fired twice")
        self._result = result
        observers, self._observers = self._observers, []
        for d in observers:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def fire_if_not_fired(self, result):
        """L{fire}, unless it already fired."""
        if self._result is _UNFIRED:
            self.fire(result)

    def reset(self):
        """Unfire, so later observers wait for the next L{fire}."""
        self._result = _UNFIRED
