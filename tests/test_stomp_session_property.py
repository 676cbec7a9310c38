# -*- test-case-name: tests.test_stomp_session_property -*-
"""
chatd.stomp.session's shared MESSAGE frames over arbitrary sequences of
SUBSCRIBE, UNSUBSCRIBE, DISCONNECT and TALK: STOMP sessions of every
version, with ids alike and their own (escaped or not), on two
destinations of one room and in two rooms, get for every event of a room
they are subscribed to exactly the bytes the one-receiver framing writes
(C{frames.encode(frames.message(...), version)}), in order, and nothing
else.  On a real Hub and the embedded broker, on a Clock.
"""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.auth import Principal
from chatd.messages import RoomEvent
from chatd.stomp import frames, mapping
from chatd.stomp.frames import Frame
from tests.test_stomp_session import EXP, World

SESSIONS = 4
ROOMS = ("a", "b")
PREFIXES = ("/topic/", "/sub/chat/room/")
# Ids alike (stomp.js's sub-0) and of their own; 1.1 and 1.2 escape some.
IDS = {
    frames.V10: ["sub-0", "sub-1", "x:y"],  # written as it is
    frames.V11: ["sub-0", "sub-1", "x:y", "back\\slash", "new\nline"],
    frames.V12: ["sub-0", "sub-1", "x:y", "back\\slash", "new\nline", "c\rr"],
}

versions = st.lists(st.sampled_from(frames.VERSIONS), min_size=SESSIONS, max_size=SESSIONS)
session_index = st.integers(0, SESSIONS - 1)
actions = st.lists(
    st.one_of(
        st.tuples(st.just("subscribe"), session_index, st.sampled_from(ROOMS), st.sampled_from(PREFIXES),
                  st.integers(0, 5)),
        st.tuples(st.just("unsubscribe"), session_index, st.sampled_from(ROOMS)),
        st.tuples(st.just("disconnect"), session_index),
        st.tuples(st.just("talk"), st.sampled_from(ROOMS), st.text(max_size=30)),
    ),
    max_size=25,
)


def send(session, version, command, **headers):
    """One frame from a client of C{version}, encoded as that client writes it."""
    session.received(frames.encode(Frame(command, tuple(headers.items())), version))


def expected(event, subscriptions, version):
    """The MESSAGE a subscriber of C{version} gets for C{event}, framed for it alone."""
    destination, sub_id = subscriptions[event.room]
    return frames.encode(frames.message(destination, sub_id, event.id, mapping.event_body(event)), version)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(versions, actions)
def test_shared_frames_are_the_frames_of_one_receiver(versions, actions):
    """Every STOMP member gets each event of its rooms exactly as framed for it alone, and nothing else."""
    world = World()
    heard, talker = world.json(Principal(sub="talker", name="Talker", exp=EXP))  # in every room
    members = []
    for i, version in enumerate(versions):
        principal = Principal(sub=f"u{i}", name=f"User {i}", exp=EXP)
        connection, session = world.stomp(principal, accept_version=version)
        members.append(dict(connection=connection, session=session, version=version, subscriptions={},
                            open=True))
    for room in ROOMS:
        talker.received(json.dumps({"type": "ENTER", "room": room}))
    heard.take()
    for member in members:
        member["connection"].raw.clear()  # CONNECTED
    for action in actions:
        kind = action[0]
        if kind == "talk":
            _, room, message = action
            talker.received(json.dumps({"type": "TALK", "room": room, "message": message or "-"}))
            leaving = None
        else:
            member = members[action[1]]
            if not member["open"]:
                continue
            session, version, subscriptions = member["session"], member["version"], member["subscriptions"]
            leaving = None
            if kind == "subscribe":
                _, _, room, prefix, n = action
                sub_id = IDS[version][n % len(IDS[version])]
                if room in subscriptions or sub_id in {s for _, s in subscriptions.values()}:
                    continue  # refused with ERROR: not what this test is about
                subscriptions[room] = (prefix + room, sub_id)
                send(session, version, "SUBSCRIBE", destination=prefix + room, id=sub_id)
            elif kind == "unsubscribe":
                room = action[2]
                if room not in subscriptions:
                    continue
                send(session, version, "UNSUBSCRIBE", id=subscriptions.pop(room)[1])
            else:
                member["open"] = False
                leaving = member
                send(session, version, "DISCONNECT")
        world.clock.advance(0)
        events = [RoomEvent.from_wire({k: v for k, v in wire.items() if k != "ref"})
                  for wire in heard.take() if wire["type"] in ("ENTER", "TALK", "QUIT")]
        for member in members:
            raw = member["connection"].raw
            got, raw[:] = list(raw), []
            if member is leaving:
                continue  # what DISCONNECT answers: test_stomp_session.test_disconnect
            want = [expected(event, member["subscriptions"], member["version"])
                    for event in events if member["open"] and event.room in member["subscriptions"]]
            assert got == want, (kind, member["version"], member["subscriptions"])

