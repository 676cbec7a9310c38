"""
chatd.api_backend: the server API's backend over a real MemoryBroker on a
Clock, and the control commands carried out on one instance.
"""

import pytest
from twisted.internet import defer, task

from chatd import errors
from chatd.api import Disconnect, HistoryQuery, Kick, Publish, RoomPresence, UnknownRoom, UserPresence
from chatd.api_backend import BrokerApiBackend, ControlDispatcher
from chatd.broker.interfaces import DISCONNECT, KICK, Control, Member
from chatd.broker.memory import MemoryBroker
from chatd.webhooks import AcceptingBroker


def result(d):
    """The result of an already-fired Deferred (the memory broker answers at once)."""
    results = []
    d.addBoth(results.append)
    assert results, "not fired"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


class Hooks:
    """A webhook service stand-in: what it was handed."""

    def __init__(self):
        self.accepted_events = []

    def accepted(self, event, sub):
        self.accepted_events.append((event, sub))


@pytest.fixture
def broker():
    clock = task.Clock()
    clock.advance(1_700_000_000)
    return MemoryBroker(clock, history_size=10, instance_id="i1", max_rooms=3)


def test_publish_answers_the_id_and_feeds_the_webhook_once(broker):
    """publish answers the event id; through the AcceptingBroker the webhook gets it once, as sub "system"."""
    hooks = Hooks()
    backend = BrokerApiBackend(AcceptingBroker(broker, hooks))
    first = result(backend.publish(Publish("lobby", "hello", "Bot", "c1")))
    again = result(backend.publish(Publish("lobby", "hello", "Bot", "c1")))
    assert first == again
    [(event, sub)] = hooks.accepted_events
    assert (event.id, event.sender, event.system, sub) == (first, "Bot", True, "system")


def test_publish_beyond_the_room_limit(broker):
    """A publish that would make a room beyond max_rooms fails with RoomLimitReached."""
    backend = BrokerApiBackend(broker)
    for room in ("a", "b", "c"):
        result(backend.publish(Publish(room, "x")))
    with pytest.raises(errors.RoomLimitReached):
        result(backend.publish(Publish("d", "x")))


def test_room_presence_groups_connections_by_user(broker):
    """Users are listed once, sorted by sub, with their connection counts."""
    backend = BrokerApiBackend(broker)
    for n, (sub, name) in enumerate([("bob", "Bob"), ("alice", "Alice"), ("alice", "Alice")]):
        result(broker.enter("lobby", Member(f"i1:{n}", sub, name)))
    presence = result(backend.room_presence("lobby"))
    assert presence == RoomPresence("lobby", (UserPresence("alice", "Alice", 2), UserPresence("bob", "Bob", 1)))
    assert presence.to_json()["userCount"] == 2


def test_unknown_room(broker):
    """Presence, history and kick of a room the registry does not hold raise UnknownRoom."""
    backend = BrokerApiBackend(broker)
    for call in (
        lambda: backend.room_presence("ghost"),
        lambda: backend.history(HistoryQuery("ghost")),
        lambda: backend.kick(Kick("ghost", "alice")),
    ):
        with pytest.raises(UnknownRoom):
            result(call())


def test_history(broker):
    """history passes since and limit through and answers a History."""
    backend = BrokerApiBackend(broker)
    ids = [result(backend.publish(Publish("lobby", f"m{i}"))) for i in range(3)]
    page = result(backend.history(HistoryQuery("lobby", since=ids[0], limit=1)))
    assert [e.id for e in page.events] == [ids[1]] and page.complete


def test_disconnect_and_kick_go_through_the_broker(broker):
    """disconnect and kick become control commands (the memory broker carries them out at once)."""
    controls = []
    broker.set_control(controls.append)
    backend = BrokerApiBackend(broker)
    result(broker.enter("lobby", Member("i1:1", "alice", "Alice")))
    result(backend.disconnect(Disconnect("alice", "bye")))
    result(backend.kick(Kick("lobby", "alice")))
    assert controls == [Control(DISCONNECT, "alice", reason="bye"), Control(KICK, "alice", room="lobby")]


class Connection:
    def __init__(self, sub):
        self.sub = sub
        self.closes = []

    def close(self, code, reason):
        self.closes.append((code, reason))


def test_dispatcher_disconnect_closes_only_that_users_connections():
    """DISCONNECT closes every local connection of the user with 4003 and the reason; others stay."""
    alice1, alice2, bob = Connection("alice"), Connection("alice"), Connection("bob")
    every = [alice1, bob, alice2]
    dispatch = ControlDispatcher(lambda sub: [c for c in every if c.sub == sub], kick=None)
    dispatch(Control(DISCONNECT, "alice", reason="banned"))
    assert alice1.closes == alice2.closes == [(4003, "banned")]
    assert bob.closes == []


def test_dispatcher_kick_calls_the_hub(logged_failures):
    """KICK hands room and sub to the hub; a broker outage there is a warning, a bug a logged failure."""
    kicked = []
    dispatch = ControlDispatcher(lambda sub: [], kick=lambda room, sub: kicked.append((room, sub)))
    dispatch(Control(KICK, "alice", room="lobby"))
    assert kicked == [("lobby", "alice")]
    ControlDispatcher(lambda sub: [], kick=lambda r, s: defer.fail(errors.BrokerUnavailable()))(
        Control(KICK, "alice", room="lobby")
    )
    logged_failures.expect("api: kick of alice from lobby failed")
    ControlDispatcher(lambda sub: [], kick=lambda r, s: 1 / 0)(Control(KICK, "alice", room="lobby"))
    assert len(logged_failures.events) == 1
