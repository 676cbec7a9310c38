# -*- test-case-name: tests.test_limits -*-
"""chatd.limits: the token bucket, on a Clock."""

from twisted.internet.task import Clock

from chatd.limits import SendBudget, TokenBucket


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
