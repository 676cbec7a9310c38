# -*- test-case-name: tests.test_replay -*-
"""
Catch-up against a real twistd: a replay far larger than the send-buffer
cap streams at the reader's pace (issue 8 item 2), with the seam to the
live events unchanged; a reader that really stops is still cut with 4008.
"""

from tests import rawws
from tests.support import RECV_TIMEOUT

TALKS = 500
TEXT = "\u4e2d" * 5461  # 16383 bytes of UTF-8
LIVE = 10


def busy_server(start_chatd, **overrides):
    return start_chatd(
        limits__rate="100000", limits__burst="100000", limits__max_talk_chars="6000",
        history__size=str(TALKS), history__max_bytes=str(32 * 1024 * 1024), **overrides,
    )


def fill(server, clients):
    """A talker in room r that said TALKS long messages; returns it and the id before them."""
    talker = server.connect("talker")
    clients.append(talker)
    entered = talker.enter("r")
    for i in range(TALKS):
        acked = talker.talk("r", f"{i}:{TEXT}")
        assert acked["type"] == "TALK", acked
    return talker, entered["id"]


def test_large_catch_up_streams_to_a_reading_client(start_chatd, clients):
    """
    500 x 16 KiB of replay (8 MiB, twice the default 4 MiB send-buffer cap)
    reaches a client that keeps reading: every TALK once and in order, the
    REPLAY marker, its own ENTER, then the TALKs sent during the replay,
    and no 4008.
    """
    server = busy_server(start_chatd)
    talker, since = fill(server, clients)
    reader = server.connect("reader")
    clients.append(reader)
    reader.send({"type": "ENTER", "room": "r", "since": since, "ref": "catch-up"})
    for i in range(LIVE):  # published while the replay is on its way
        talker.send({"type": "TALK", "room": "r", "message": f"live{i}"})
    frames = reader.recv_until(
        lambda f: f.get("message") == f"live{LIVE - 1}" or f["type"] == "ERROR",
        timeout=4 * RECV_TIMEOUT, limit=TALKS + LIVE + 10,
    )
    kinds = [f["type"] for f in frames]
    assert kinds == ["TALK"] * TALKS + ["REPLAY", "ENTER"] + ["TALK"] * LIVE, kinds[-20:]
    assert [f["message"].split(":", 1)[0] for f in frames[:TALKS]] == [str(i) for i in range(TALKS)]
    assert frames[TALKS] == {"type": "REPLAY", "room": "r", "count": TALKS, "complete": True, "ref": "catch-up"}
    assert (frames[TALKS + 1]["sender"], frames[TALKS + 1]["ref"]) == ("reader", "catch-up")
    assert [f["message"] for f in frames[TALKS + 2:]] == [f"live{i}" for i in range(LIVE)]
    ids = [f["id"] for f in frames if "id" in f]
    assert len(set(ids)) == len(ids)
    assert reader.quiet()
    assert "is not reading" not in server.log_text()


def test_catch_up_to_a_client_that_stops_reading_is_cut(start_chatd, clients):
    """
    A client that asks for the same replay and then never reads gets no
    more than about a buffer's worth; once the room's events pile up for
    it past the cap it is cut with 4008, and the room sees it leave.
    """
    server = busy_server(start_chatd, limits__max_send_buffer_bytes="1048576")
    talker, since = fill(server, clients)
    stalled = rawws.RawWebSocket(server.port, rcvbuf=8192)
    status, head = stalled.upgrade("/ws?ticket=" + server.ticket("stalled"))
    assert status == 101, head
    assert stalled.recv_json()["type"] == "WELCOME"
    stalled.send_json({"type": "ENTER", "room": "r", "since": since})
    # The room goes on; what it says piles up for the stalled client.
    quit_seen = None
    for i in range(200):
        talker.send({"type": "TALK", "room": "r", "message": f"{i}:{TEXT}"})
        for frame in talker.recv_until(lambda f: f.get("message", "").startswith(f"{i}:"), limit=10):
            if frame["type"] == "QUIT" and frame["sender"] == "stalled":
                quit_seen = i
        if quit_seen is not None:
            break
    assert quit_seen is not None, "the stalled client was never cut"
    assert stalled.close_code(limit=100000) == 4008
    stalled.close()
    assert "is not reading its catch-up of r" in server.log_text()
