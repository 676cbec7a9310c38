# -*- test-case-name: tests.test_limits -*-
"""chatd.limits: the token bucket, on a Clock."""

import gc

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from chatd.limits import SendBudget, TokenBucket
from chatd.observer import OneShotObserverList


def takes(bucket, n):
    return [bucket.take() for _ in range(n)]


def test_starts_full():
    """A quiet client may send burst messages at once, then no more."""
    bucket = TokenBucket(rate=1, burst=5, clock=Clock())
    assert takes(bucket, 5) == [True] * 5
    assert bucket.take() is False


def test_refills_at_rate():
    """Tokens come back at rate per second."""
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=2, clock=clock)
    takes(bucket, 2)
    clock.advance(0.05)
    assert bucket.take() is False
    clock.advance(0.05)
    assert bucket.take() is True
    assert bucket.take() is False


def test_never_more_than_burst():
    """A long silence saves up at most burst tokens."""
    clock = Clock()
    bucket = TokenBucket(rate=100, burst=3, clock=clock)
    takes(bucket, 3)
    clock.advance(3600)
    assert takes(bucket, 4) == [True, True, True, False]


def test_fractional_rate():
    """rate below 1: one token every 1/rate seconds."""
    clock = Clock()
    bucket = TokenBucket(rate=0.5, burst=1, clock=clock)
    assert bucket.take() is True
    clock.advance(1.5)
    assert bucket.take() is False
    clock.advance(0.5)
    assert bucket.take() is True


def test_refused_takes_cost_nothing():
    """Refusals do not dig a hole: the next token still comes after 1/rate."""
    clock = Clock()
    bucket = TokenBucket(rate=1, burst=1, clock=clock)
    bucket.take()
    assert takes(bucket, 50) == [False] * 50
    clock.advance(1)
    assert bucket.take() is True


def test_sustained_rate():
    """Over a minute of steady sending, about rate*60 + burst messages pass."""
    clock = Clock()
    bucket = TokenBucket(rate=20, burst=40, clock=clock)
    passed = 0
    for _ in range(6000):  # 100 attempts a second for 60 s
        passed += bucket.take()
        clock.advance(0.01)
    assert 20 * 60 + 40 - 2 <= passed <= 20 * 60 + 40 + 1


def test_send_budget_when_drained():
    """when_drained fires at once while not paused, else on resume or when the connection stops."""
    budget = SendBudget(100, lambda unsent: None)
    assert budget.when_drained().called
    budget.pauseProducing()
    waiting = budget.when_drained()
    assert not waiting.called
    budget.resumeProducing()
    assert waiting.called and budget.when_drained().called
    budget.pauseProducing()
    stopped = budget.when_drained()
    budget.stopProducing()
    assert stopped.called


class _EagerBudget(SendBudget):
    """SendBudget as it was: a fired OneShotObserverList from the start, replaced once fired and paused."""

    __slots__ = ()

    def __init__(self, limit, overflow):
        super().__init__(limit, overflow)
        self._drained = OneShotObserverList()
        self._drained.fire(None)

    def when_drained(self):
        return self._drained.when_fired()

    def pauseProducing(self):
        self.paused = True
        if self._drained.fired:
            self._drained = OneShotObserverList()

    def resumeProducing(self):
        self.paused = False
        self.unsent = 0
        self._drained.fire_if_not_fired(None)

    def stopProducing(self):
        self.paused = False
        self._drained.fire_if_not_fired(None)


@given(st.lists(st.sampled_from(["pause", "resume", "stop", "wrote", "wait", "wait in callback"]), max_size=30))
@settings(max_examples=300, deadline=None)
def test_send_budget_drains_as_an_eager_observer_list_does(steps):
    """
    SendBudget keeps no observer list while the buffer is not full; over
    any sequence of pauses, resumes, stops, writes and waits (some waiting
    again from inside a waiter's callback) its waiters fire when those of
    the budget with a fired list from the start fire, with the same
    results, and it overflows alike.
    """
    overflows = ([], [])
    budgets = (SendBudget(10, overflows[0].append), _EagerBudget(10, overflows[1].append))
    heard = ([], [])
    waits = ([], [])
    for step in steps:
        for budget, log, waiting in zip(budgets, heard, waits):
            if step == "pause":
                budget.pauseProducing()
            elif step == "resume":
                budget.resumeProducing()
            elif step == "stop":
                budget.stopProducing()
            elif step == "wrote":
                budget.wrote(6)
            else:
                d = budget.when_drained()
                if step == "wait in callback":
                    d.addCallback(lambda result, b=budget, log=log: log.append(b.when_drained().called) or result)
                d.addCallback(log.append)
                waiting.append(d)
        assert heard[0] == heard[1]
        assert [d.called for d in waits[0]] == [d.called for d in waits[1]]
        assert overflows[0] == overflows[1]
        assert [(b.paused, b.unsent, b.over) for b in budgets[:1]] == [(b.paused, b.unsent, b.over) for b in budgets[1:]]


def test_send_budget_keeps_no_observer_list_at_rest():
    """A budget whose buffer never filled, or has drained again, holds no observer list (less for the collector)."""
    budget = SendBudget(100, lambda unsent: None)
    assert not any(isinstance(o, OneShotObserverList) for o in gc.get_referents(budget))
    budget.pauseProducing()
    waiting = budget.when_drained()
    budget.resumeProducing()
    assert waiting.called
    assert not any(isinstance(o, OneShotObserverList) for o in gc.get_referents(budget))
