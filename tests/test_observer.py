"""L{chatd.observer}: one result, many waiters, once."""

import pytest
from twisted.python.failure import Failure

from chatd.observer import OneShotObserverList


def _result(d):
    box = []
    d.addBoth(box.append)
    return box


def test_waiters_before_and_after_fire_get_the_result():
    """Observers that came before and after L{fire} get the same value."""
    observers = OneShotObserverList()
    early = _result(observers.when_fired())
    assert early == [] and not observers.fired
    observers.fire("done")
    late = _result(observers.when_fired())
    assert early == ["done"] and late == ["done"] and observers.fired


def test_failure_reaches_every_waiter():
    """Each waiter receives the Failure and can consume it on its own."""
    observers = OneShotObserverList()
    first, second = observers.when_fired(), observers.when_fired()
    observers.fire(Failure(ValueError("no")))
    for d in (first, second, observers.when_fired()):
        box = _result(d)
        assert box[0].check(ValueError)


def test_fire_twice_is_an_error_unless_asked_not_to_care():
    """A second L{fire} raises; L{fire_if_not_fired} keeps the first result."""
    observers = OneShotObserverList()
    observers.fire(1)
    with pytest.raises(RuntimeError):
        observers.fire(2)
    observers.fire_if_not_fired(3)
    assert _result(observers.when_fired()) == [1]


def test_reset_makes_later_observers_wait_again():
    """After L{reset}, new observers wait for the next L{fire}."""
    observers = OneShotObserverList()
    observers.fire(1)
    observers.reset()
    waiting = _result(observers.when_fired())
    assert waiting == []
    observers.fire(2)
    assert waiting == [2]
