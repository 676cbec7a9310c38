# -*- test-case-name: tests.test_session -*-
"""
chatd.session on a Clock with a fake connection: WELCOME, expiry close
4001, renewal by AUTH, the rate limit and its 1008, the rooms limits.
"""

import gc
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock

from chatd import config, errors
from chatd.auth import Principal
from chatd.broker.memory import MemoryBroker
from chatd.hub import Hub
from chatd.limits import TokenBucket
from chatd.session import STRIKES_FORGIVEN_PER_SECOND, Expiries, Session
from tests.fakes import FakeConnection, FakeVerifier, RecordingBroker

START = 1000.0
EXP = 1100


ALICE = Principal(sub="alice", name="Alice", exp=EXP)


def make(principal=ALICE, tokens=None, hub_class=Hub, broker=None, **limits):
    clock = Clock()
    clock.advance(START)
    settings = config.defaults(**{f"limits__{k}": v for k, v in limits.items()})
    hub = hub_class(broker(clock) if broker else MemoryBroker(clock, instance_id="i"))
    connection = FakeConnection()
    session = Session(principal, connection, hub, FakeVerifier(tokens or {}), settings.limits, clock)
    session.open()
    return clock, connection, session


def send(session, frame):
    d = session.received(json.dumps(frame))
    assert d.called  # the embedded broker answers at once
    return d


def test_welcome():
    """Opening sends WELCOME with the display name and the token's exp."""
    _, connection, _ = make()
    assert connection.take() == [{"type": "WELCOME", "user": "Alice", "expires": EXP}]


def test_expiry_closes_4001():
    """When exp passes without AUTH the connection is closed with 4001."""
    clock, connection, _ = make()
    clock.advance(EXP - START - 0.001)
    assert connection.closes == []
    clock.advance(0.001)
    assert connection.closes == [(errors.CLOSE_TOKEN_EXPIRED, "token expired")]


def test_auth_renews_and_reschedules():
    """AUTH with a fresh token for the same sub answers WELCOME and moves the expiry."""
    fresh = Principal(sub="alice", name="Someone Else", exp=EXP + 500)
    clock, connection, session = make(tokens={"fresh": fresh})
    connection.take()
    send(session, {"type": "AUTH", "token": "fresh", "ref": "a"})
    # The name stays: members already know the connection by it.
    assert connection.take() == [{"type": "WELCOME", "user": "Alice", "expires": EXP + 500, "ref": "a"}]
    clock.advance(EXP - START + 10)
    assert connection.closes == []
    clock.advance(490)
    assert connection.closes == [(errors.CLOSE_TOKEN_EXPIRED, "token expired")]
    assert len(clock.getDelayedCalls()) == 0


def test_auth_for_another_user():
    """AUTH with another sub's token is ERROR unauthorized; the old expiry stands."""
    mallory = Principal(sub="mallory", name="Mallory", exp=EXP + 500)
    clock, connection, session = make(tokens={"other": mallory})
    connection.take()
    send(session, {"type": "AUTH", "token": "other", "ref": 1})
    (error,) = connection.take()
    assert (error["type"], error["code"], error["ref"]) == ("ERROR", errors.UNAUTHORIZED, 1)
    clock.advance(EXP - START)
    assert connection.closes == [(errors.CLOSE_TOKEN_EXPIRED, "token expired")]


def test_auth_bad_token():
    """AUTH with a token the verifier refuses is ERROR unauthorized with its reason."""
    _, connection, session = make()
    connection.take()
    send(session, {"type": "AUTH", "token": "garbage"})
    (error,) = connection.take()
    assert (error["code"], error["message"]) == (errors.UNAUTHORIZED, "bad signature")
    assert connection.closes == []


def test_bad_frame_keeps_connection():
    """A malformed frame gets ERROR bad_request and the session goes on."""
    _, connection, session = make()
    connection.take()
    send(session, {"type": "NOPE", "ref": "z"})
    send(session, {"type": "ENTER", "room": "lobby", "ref": "e"})
    frames = connection.take()
    assert (frames[0]["code"], frames[0]["ref"]) == (errors.BAD_REQUEST, "z")
    assert (frames[1]["type"], frames[1]["ref"]) == ("ENTER", "e")


def test_rate_limited_then_1008():
    """Over the burst: ERROR rate_limited, and after abuse_strikes of them close 1008."""
    _, connection, session = make(rate=1.0, burst=2, abuse_strikes=3)
    connection.take()
    for i in range(2):
        send(session, {"type": "QUIT", "room": "lobby", "ref": i})
    assert [f["code"] for f in connection.take()] == [errors.NOT_MEMBER] * 2
    send(session, {"type": "QUIT", "room": "lobby", "ref": "x"})
    send(session, {"type": "QUIT", "room": "lobby"})
    frames = connection.take()
    assert [f["code"] for f in frames] == [errors.RATE_LIMITED] * 2
    assert connection.closes == []
    send(session, {"type": "QUIT", "room": "lobby"})
    assert connection.take() == []
    assert connection.closes == [(errors.CLOSE_POLICY_VIOLATION, "rate limit exceeded")]


def test_strikes_are_forgiven_over_time():
    """Occasional bursts over the limit, spread out in time, never add up to 1008."""
    clock, connection, session = make(rate=1.0, burst=1, abuse_strikes=3)
    for _ in range(20):
        send(session, {"type": "QUIT", "room": "lobby"})
        send(session, {"type": "QUIT", "room": "lobby"})
        send(session, {"type": "QUIT", "room": "lobby"})
        clock.advance(5)
    codes = [f.get("code") for f in connection.take()[1:]]
    assert codes.count(errors.RATE_LIMITED) == 40
    assert errors.CLOSE_POLICY_VIOLATION not in [code for code, _ in connection.closes]


def test_rate_limited_message_not_delivered():
    """A TALK refused by the rate limit is not published."""
    _, connection, session = make(rate=1.0, burst=2)
    send(session, {"type": "ENTER", "room": "lobby"})
    send(session, {"type": "TALK", "room": "lobby", "message": "one"})
    send(session, {"type": "TALK", "room": "lobby", "message": "two", "ref": "t"})
    frames = connection.take()
    assert [f["type"] for f in frames] == ["WELCOME", "ENTER", "TALK", "ERROR"]
    assert (frames[-1]["code"], frames[-1].get("ref")) == (errors.RATE_LIMITED, None)


@given(
    rate=st.sampled_from([0.5, 1.0, 3.0]), burst=st.integers(1, 4), strikes=st.integers(1, 4),
    steps=st.lists(st.tuples(st.floats(0, 5), st.integers(0, 5)), max_size=12),
)
@settings(max_examples=200, deadline=None)
def test_rate_limit_as_buckets_made_at_open(rate, burst, strikes, steps):
    """
    The session makes its token buckets when first needed; over any
    pattern of waits and bursts (the first wait before any message) it
    answers as two buckets made when it opened would: NOT_MEMBER for a
    QUIT let through, RATE_LIMITED over the rate, 1008 after the strikes.
    """
    clock, connection, session = make(rate=rate, burst=burst, abuse_strikes=strikes)
    connection.take()
    bucket = TokenBucket(rate, burst, clock)
    patience = TokenBucket(STRIKES_FORGIVEN_PER_SECOND, strikes - 1, clock)
    expected = []
    for wait, messages in steps:
        clock.advance(wait)
        for _ in range(messages):
            if connection.closes:
                break
            send(session, {"type": "QUIT", "room": "lobby"})
            if bucket.take():
                expected.append(errors.NOT_MEMBER)
            elif patience.take():
                expected.append(errors.RATE_LIMITED)
            else:
                expected.append("closed")
            answers = [f["code"] for f in connection.take()] or [
                "closed" for close in connection.closes if close[0] == errors.CLOSE_POLICY_VIOLATION
            ]
            assert answers == expected[-1:]


def test_an_idle_session_holds_no_token_bucket():
    """Until its first message a session makes no token bucket (less for the collector per idle connection)."""
    _, connection, session = make()
    assert not any(isinstance(o, TokenBucket) for o in gc.get_referents(session))
    send(session, {"type": "QUIT", "room": "lobby"})
    assert any(isinstance(o, TokenBucket) for o in gc.get_referents(session))


def test_rate_recovers():
    """After waiting 1/rate seconds a client may send again."""
    clock, connection, session = make(rate=1.0, burst=1)
    send(session, {"type": "QUIT", "room": "a"})
    send(session, {"type": "QUIT", "room": "a"})
    clock.advance(1)
    send(session, {"type": "QUIT", "room": "a"})
    codes = [f.get("code") for f in connection.take()[1:]]
    assert codes == [errors.NOT_MEMBER, errors.RATE_LIMITED, errors.NOT_MEMBER]


def test_max_rooms_per_connection():
    """ENTER beyond max_rooms_per_connection is ERROR forbidden."""
    _, connection, session = make(max_rooms_per_connection=2)
    for room in ("a", "b", "c"):
        send(session, {"type": "ENTER", "room": room, "ref": room})
    frames = connection.take()
    assert [f["type"] for f in frames] == ["WELCOME", "ENTER", "ENTER", "ERROR"]
    assert (frames[-1]["code"], frames[-1]["ref"]) == (errors.FORBIDDEN, "c")
    send(session, {"type": "QUIT", "room": "a"})
    send(session, {"type": "ENTER", "room": "c", "ref": "c2"})
    assert connection.take()[-1]["ref"] == "c2"


def test_rooms_claim():
    """ENTER of a room the token's rooms claim does not list is ERROR forbidden."""
    limited = Principal(sub="alice", name="Alice", exp=EXP, rooms=frozenset({"ops"}))
    _, connection, session = make(principal=limited)
    send(session, {"type": "ENTER", "room": "lobby", "ref": 1})
    send(session, {"type": "ENTER", "room": "ops", "ref": 2})
    frames = connection.take()
    assert (frames[1]["code"], frames[1]["ref"]) == (errors.FORBIDDEN, 1)
    assert (frames[2]["type"], frames[2]["ref"]) == ("ENTER", 2)


def test_talk_too_large():
    """A TALK over max_talk_chars is ERROR too_large."""
    _, connection, session = make(max_talk_chars=5)
    send(session, {"type": "ENTER", "room": "lobby"})
    send(session, {"type": "TALK", "room": "lobby", "message": "123456", "ref": "big"})
    error = connection.take()[-1]
    assert (error["code"], error["ref"]) == (errors.TOO_LARGE, "big")


def test_closed_cancels_expiry_and_leaves_rooms():
    """closed() cancels the expiry timer and quits the rooms; nothing is sent after."""
    clock, connection, session = make()
    send(session, {"type": "ENTER", "room": "lobby"})
    connection.take()
    d = session.closed()
    assert d.called
    assert clock.getDelayedCalls() == []
    clock.advance(EXP)
    assert connection.closes == [] and connection.take() == []


@pytest.mark.parametrize("how", ["raises", "fails"])
def test_unexpected_error_is_unavailable(logged_failures, how):
    """
    An unexpected error handling a command becomes ERROR unavailable with
    the ref, and is logged: raised by the hub's TALK (a plain call) or
    failing its Deferred.
    """
    logged_failures.expect("boom")
    class BrokenHub(Hub):
        def talk(self, *args, **kwargs):
            if how == "raises":
                raise RuntimeError("boom")
            return defer.fail(RuntimeError("boom"))

    _, connection, session = make(hub_class=BrokenHub)
    connection.take()
    d = send(session, {"type": "TALK", "room": "lobby", "message": "x", "ref": "r"})
    results = []
    d.addBoth(results.append)
    assert not isinstance(results[0], defer.Failure)
    (error,) = connection.take()
    assert (error["code"], error["ref"]) == (errors.UNAVAILABLE, "r")
    assert logged_failures.events


@pytest.mark.parametrize("exp_offset", [0, -50])
def test_expired_at_open(exp_offset):
    """A principal already at or past exp is closed as soon as the reactor turns."""
    principal = Principal(sub="alice", name="Alice", exp=int(START) + exp_offset)
    clock, connection, _ = make(principal=principal)
    assert connection.closes == []
    clock.advance(0)
    assert connection.closes == [(errors.CLOSE_TOKEN_EXPIRED, "token expired")]


def test_sessions_expiring_together_share_one_clock_call():
    """
    Sessions on one Expiries whose tokens expire at the same time have one
    clock call between them, cancelled once the last of them closes; each
    is closed 4001 at its exp.
    """
    clock = Clock()
    clock.advance(START)
    hub = Hub(MemoryBroker(clock, instance_id="i"))
    expiries = Expiries(clock)
    limits = config.defaults().limits
    connections = [FakeConnection(f"i:{n}") for n in range(3)]
    sessions = [
        Session(Principal(sub=f"u{n}", name=f"U{n}", exp=EXP + (n == 2)), connection, hub, FakeVerifier({}),
                limits, clock, expiries=expiries)
        for n, connection in enumerate(connections)
    ]
    for session in sessions:
        session.open()
    assert len(clock.getDelayedCalls()) == 2
    sessions[0].closed()
    assert len(clock.getDelayedCalls()) == 2
    clock.advance(EXP - START)
    assert [c.closes for c in connections] == [[], [(errors.CLOSE_TOKEN_EXPIRED, "token expired")], []]
    sessions[2].closed()
    assert clock.getDelayedCalls() == []


@given(
    exps=st.lists(st.sampled_from([START - 5, START, START + 1, START + 1.5, START + 7]), min_size=1, max_size=5),
    steps=st.lists(
        st.tuples(st.sampled_from(["advance", "renew", "close"]), st.integers(0, 4),
                  st.sampled_from([0, 0.5, 1, 3, START + 1, START + 4])),
        max_size=15,
    ),
)
@settings(max_examples=200, deadline=None)
def test_shared_expiries_close_as_a_clock_call_each(exps, steps):
    """
    Sessions sharing one Expiries are closed 4001 at the same clock times
    as sessions that each have their own (a clock call per session), over
    any pattern of waits, renewals by AUTH (to later or earlier exps) and
    closes.
    """
    def world(shared):
        clock = Clock()
        clock.advance(START)
        hub = Hub(MemoryBroker(clock, instance_id="i"))
        expiries = Expiries(clock) if shared else None
        tokens = {f"{n}-{exp}": Principal(sub=f"u{n}", name="x", exp=exp)
                  for n in range(len(exps)) for exp in (START + 1, START + 4)}
        connections = [FakeConnection(f"i:{n}") for n in range(len(exps))]
        sessions = [
            Session(Principal(sub=f"u{n}", name="x", exp=exp), connection, hub, FakeVerifier(tokens),
                    config.defaults().limits, clock, expiries=expiries)
            for n, (exp, connection) in enumerate(zip(exps, connections))
        ]
        for session in sessions:
            session.open()
        return clock, connections, sessions

    worlds = [world(True), world(False)]
    for kind, index, value in steps:
        for clock, connections, sessions in worlds:
            index %= len(sessions)
            if kind == "advance":
                clock.advance(value)
            elif kind == "close":
                sessions[index].closed()
            elif value > START and not sessions[index]._closed:
                send(sessions[index], {"type": "AUTH", "token": f"{index}-{value}"})
            for connection in connections:
                # each close with the clock time it was made at
                connection.closes[:] = [close if len(close) == 3 else (*close, clock.seconds())
                                        for close in connection.closes]
        assert [c.closes for c in worlds[0][1]] == [c.closes for c in worlds[1][1]]
    for clock, connections, sessions in worlds:
        clock.advance(10)
    assert [c.closes for c in worlds[0][1]] == [c.closes for c in worlds[1][1]]
    assert [c.frames for c in worlds[0][1]] == [c.frames for c in worlds[1][1]]


BOB = Principal(sub="bob", name="Bob", exp=EXP)


def join(session, principal, connection_id):
    """A second session on the same hub and clock (another member)."""
    connection = FakeConnection(connection_id)
    other = Session(principal, connection, session._hub, FakeVerifier({}), session._limits, session._clock)
    other.open()
    connection.take()
    return connection, other


@pytest.mark.parametrize("step", ["enter", "subscribe"])
def test_unexpected_enter_failure_leaves_no_seat(step, logged_failures):
    """
    Any failure during ENTER (not only unavailable or the room limit) is
    ERROR unavailable, logged once, and leaves no seat: a retry enters, and
    the others never see a QUIT for a member that never entered.
    """
    _, connection, session = make(broker=RecordingBroker)
    broker = session._hub._broker
    broker.broken[step] = RuntimeError("boom")
    logged_failures.expect("boom")
    connection.take()
    send(session, {"type": "ENTER", "room": "lobby", "ref": "e"})
    (error,) = connection.take()
    assert (error["type"], error["code"], error["ref"]) == ("ERROR", errors.UNAVAILABLE, "e")
    assert len(logged_failures.events) == 1
    assert session._hub.rooms_of("i:1") == frozenset()
    send(session, {"type": "TALK", "room": "lobby", "message": "x", "ref": "t"})
    assert connection.take()[0]["code"] == errors.NOT_MEMBER
    del broker.broken[step]
    send(session, {"type": "ENTER", "room": "lobby", "ref": "again"})
    (entered,) = connection.take()
    assert (entered["type"], entered["ref"]) == ("ENTER", "again")


def test_failed_enter_sends_no_quit_on_close(logged_failures):
    """A connection whose ENTER failed unexpectedly closes without a QUIT reaching the room."""
    logged_failures.expect("boom")
    _, connection, session = make(broker=RecordingBroker)
    bob, other = join(session, BOB, "i:2")
    send(other, {"type": "ENTER", "room": "lobby"})
    bob.take()
    session._hub._broker.broken["enter"] = RuntimeError("boom")
    send(session, {"type": "ENTER", "room": "lobby"})
    session.closed()
    send(other, {"type": "TALK", "room": "lobby", "message": "anyone?"})
    assert [f["type"] for f in bob.take()] == ["TALK"]
    assert session._hub.local_users("lobby") == 1


def test_auth_with_narrower_rooms_leaves_them():
    """
    AUTH with a token whose rooms claim no longer lists a room the
    connection is in: it leaves that room (the room sees a QUIT) and gets
    ERROR forbidden naming it; the rooms still allowed are kept.
    """
    narrower = Principal(sub="alice", name="Alice", exp=EXP + 500, rooms=frozenset({"ops"}))
    _, connection, session = make(tokens={"narrower": narrower})
    bob, other = join(session, BOB, "i:2")
    send(other, {"type": "ENTER", "room": "lobby"})
    for room in ("lobby", "ops"):
        send(session, {"type": "ENTER", "room": room})
    connection.take()
    bob.take()
    send(session, {"type": "AUTH", "token": "narrower", "ref": "a"})
    welcome, error = connection.take()
    assert (welcome["type"], welcome["ref"]) == ("WELCOME", "a")
    assert (error["type"], error["code"], error["ref"]) == ("ERROR", errors.FORBIDDEN, "a")
    assert "lobby" in error["message"]
    (quit,) = bob.take()
    assert (quit["type"], quit["sender"], quit["userCount"]) == ("QUIT", "Alice", 1)
    assert session._hub.rooms_of("i:1") == frozenset({"ops"})
    send(other, {"type": "TALK", "room": "lobby", "message": "gone?"})
    assert connection.take() == []
    send(session, {"type": "TALK", "room": "ops", "message": "still here", "ref": 1})
    assert [f["message"] for f in connection.take()] == ["still here"]
