"""
Scale-out through real processes: two `twistd chatd` instances on one
private redis-server behave as one chat, and keep their WebSocket clients
through Redis failures (stop and restart on the same port, SIGSTOP), a
kill -9 of an instance, and a restart of every instance.

Each test starts its own redis-server and chatd processes (stopped by PID
by the fixtures); presence_ttl is 3 s and the Redis timeout 1 s so that
failures show quickly.
"""

import os
import signal
import time

from tests import rawws
from tests.support import http, wait_for, ws_refusal
from tests.test_broker_redis import redis_command

PRESENCE_TTL = 3
REDIS_TIMEOUT = 1


def start_instances(start_chatd, redis, count=2, **overrides):
    """C{count} chatd instances on C{redis}, started side by side, each healthy."""
    settings = dict(
        redis__url=redis.url, redis__presence_ttl=PRESENCE_TTL, redis__timeout=REDIS_TIMEOUT
    )
    settings.update(overrides)
    servers = [start_chatd(wait=False, **settings) for _ in range(count)]
    for server in servers:
        server.wait_ready()
        wait_health(server, 200)
    return servers


def alice_and_bob_in_lobby(start_chatd, redis, clients):
    """
    Instances A and B on C{redis}, alice on A and bob on B, both in the
    lobby (alice has read bob's ENTER).  Returns a, b, alice, bob and bob's
    ENTER event.
    """
    a, b = start_instances(start_chatd, redis)
    alice, bob = a.connect("alice", name="Alice"), b.connect("bob", name="Bob")
    clients.extend([alice, bob])
    alice.enter("lobby")
    bob_in = bob.enter("lobby")
    alice.recv()
    return a, b, alice, bob, bob_in


def health(server):
    try:
        return http("GET", server.base + "/healthz", timeout=2)[0]
    except OSError:
        return None


def wait_health(server, status, timeout=10):
    wait_for(lambda: health(server) == status, timeout, f"/healthz {status} on {server.port}")


def room_users(server, room):
    status, _, body = http("GET", server.base + "/rooms", token=server.token("observer"))
    assert status == 200, (status, body)
    return {r["name"]: r["users"] for r in body["rooms"]}.get(room)


def talks(client, count):
    """The next C{count} TALK events a client receives (other frames skipped)."""
    seen = []
    while len(seen) < count:
        frame = client.recv()
        if frame["type"] == "TALK":
            seen.append(frame)
    return seen


def subscribers(redis, room):
    """How many connections (one per instance) are subscribed to the room's channel."""
    return redis_command(redis.port, "PUBSUB", "NUMSUB", f"chatd:0:events:{room}")[1]


def _stored_messages(redis, room):
    """The texts of the TALKs in a room's history, read from Redis directly."""
    import json

    entries = redis_command(redis.port, "XRANGE", f"chatd:room:{room}:history", "-", "+")
    return [json.loads(fields[1].split(" ", 3)[3])["message"] for _, fields in entries]


def key(event_id):
    return tuple(int(p) for p in event_id.split("-"))


def without_ref(frame):
    return {k: v for k, v in frame.items() if k != "ref"}


def test_instances_are_one_chat(start_redis, start_chatd, clients):
    """
    Two instances: tickets work once on any instance, users on either see
    the same events in the same order with the same counts, a cid retry on
    the other instance gets the original, `since` replays across instances,
    and a kill -9 of one instance makes its users leave within the bound.
    """
    redis = start_redis()
    a, b = start_instances(start_chatd, redis)

    ticket = b.ticket("alice", name="Alice")
    alice = a.connect(ticket=ticket)
    clients.append(alice)
    assert ws_refusal(b.ws_base + "/ws?ticket=" + ticket) == 401
    assert ws_refusal(a.ws_base + "/ws?ticket=" + ticket) == 401
    bob = b.connect("bob", name="Bob")
    clients.append(bob)

    alice_in = alice.enter("lobby")
    bob_in = bob.enter("lobby")
    assert (alice_in["userCount"], bob_in["userCount"]) == (1, 2)
    assert alice.recv() == without_ref(bob_in)

    # Both talk at once: one order for everyone, ids increasing.
    for i in range(6):
        alice.send({"type": "TALK", "room": "lobby", "message": f"a{i}"})
        bob.send({"type": "TALK", "room": "lobby", "message": f"b{i}"})
    heard_a, heard_b = talks(alice, 12), talks(bob, 12)
    assert [without_ref(f) for f in heard_a] == [without_ref(f) for f in heard_b]
    assert [key(f["id"]) for f in heard_a] == sorted(key(f["id"]) for f in heard_a)
    assert {f["userCount"] for f in heard_a} == {2}
    assert room_users(a, "lobby") == room_users(b, "lobby") == 2

    # A retry with the same cid, from bob's second connection on the other
    # instance, gets the original event and publishes nothing.
    original = bob.talk("lobby", "once", cid="c-42")
    assert alice.recv()["id"] == original["id"]
    bob_again = a.connect("bob", name="Bob")
    clients.append(bob_again)
    assert bob_again.enter("lobby")["userCount"] == 3
    alice.recv(), bob.recv()  # bob_again's ENTER
    retry = bob_again.talk("lobby", "once", cid="c-42")
    assert retry["id"] == original["id"] and retry["message"] == "once"
    marker = alice.talk("lobby", "marker")
    assert bob.recv()["id"] == marker["id"]  # nothing in between: no duplicate went out

    # A latecomer on the other instance catches up from alice's ENTER.
    carol = b.connect("carol", name="Carol")
    clients.append(carol)
    carol.send({"type": "ENTER", "room": "lobby", "since": alice_in["id"], "ref": "c"})
    frames = carol.recv_until(lambda f: f["type"] == "ENTER")
    assert [f["id"] for f in frames[:-2]] == [f["id"] for f in heard_a] + [original["id"], marker["id"]]
    assert frames[-2] == {"type": "REPLAY", "room": "lobby", "count": 14, "complete": True, "ref": "c"}
    assert frames[-1]["userCount"] == 4

    # kill -9 of B: bob and carol leave, seen from A, within presence_ttl
    # plus one upkeep period (presence_ttl / 3), plus slack.
    alice.recv()  # carol's ENTER
    b.kill()
    killed = time.monotonic()
    quits = alice.recv_until(
        lambda f: f["type"] == "QUIT" and f["userCount"] == 2, timeout=PRESENCE_TTL * 4
    )
    elapsed = time.monotonic() - killed
    assert sorted(f["sender"] for f in quits if f["type"] == "QUIT") == ["Bob", "Carol"]
    assert elapsed <= PRESENCE_TTL * (1 + 1 / 3) + 2, elapsed
    print(f"\npresence: users of a kill -9'd instance left after {elapsed:.2f}s "
          f"(presence_ttl {PRESENCE_TTL}s)")
    assert room_users(a, "lobby") == 2
    assert "stopped sending heartbeats" in a.log_text()


def test_redis_restart_keeps_clients(start_redis, start_chatd, clients):
    """
    Redis stops: the instances and their WebSocket connections stay, TALK
    gets ERROR unavailable, tickets 503, /healthz 503.  Redis comes back on
    the same port, empty: /healthz 200 again, live delivery resumes on the
    same connections, presence is rebuilt, and `since` reports the loss.
    """
    redis = start_redis()
    a, b, alice, bob, _ = alice_and_bob_in_lobby(start_chatd, redis, clients)
    before = alice.talk("lobby", "before")
    assert bob.recv()["id"] == before["id"]
    unused_ticket = a.ticket("carol")
    assert subscribers(redis, "lobby") == 2  # one subscription per instance, not per member

    redis.stop()
    wait_health(a, 503)
    wait_health(b, 503)
    refused = alice.talk("lobby", "lost", cid="lost-1")
    assert (refused["type"], refused["code"]) == ("ERROR", "unavailable")
    status, _, body = http("POST", a.base + "/auth/ticket", token=a.token("carol"))
    assert (status, body["error"]) == (503, "unavailable")
    assert ws_refusal(b.ws_base + "/ws?ticket=" + unused_ticket) == 503

    start_redis(port=redis.port)
    wait_health(a, 200)
    wait_health(b, 200)
    wait_for(lambda: room_users(a, "lobby") == 2, PRESENCE_TTL * 2, "presence rebuilt")
    assert subscribers(redis, "lobby") == 2  # both subscribed again by themselves
    after = alice.talk("lobby", "after")
    # Presence was rebuilt with an ENTER for each connection put back.
    frames = bob.recv_until(lambda f: f["type"] == "TALK")
    assert {(f["type"], f["sender"]) for f in frames[:-1]} <= {("ENTER", "Alice"), ("ENTER", "Bob")}
    heard = frames[-1]
    assert (heard["id"], heard["message"], heard["userCount"]) == (after["id"], "after", 2)
    assert key(after["id"]) > key(before["id"])

    carol = b.connect("carol", name="Carol")
    clients.append(carol)
    carol.send({"type": "ENTER", "room": "lobby", "since": before["id"]})
    frames = carol.recv_until(lambda f: f["type"] == "REPLAY")
    assert [f["id"] for f in frames[:-1]] == [after["id"]]
    assert frames[-1]["complete"] is False  # "lost" was never stored; "before" went with Redis's data
    # The last local member leaving B unsubscribes B; carol keeps it.
    bob.request({"type": "QUIT", "room": "lobby"})
    assert subscribers(redis, "lobby") == 2
    carol.request({"type": "QUIT", "room": "lobby"})
    wait_for(lambda: subscribers(redis, "lobby") == 1, 5, "B unsubscribed")
    for log_text in (a.log_text(), b.log_text()):
        assert "Unhandled" not in log_text and "Traceback" not in log_text


def test_stopped_redis_is_unavailable_not_stuck(start_redis, start_chatd, clients):
    """SIGSTOP of redis-server: ERROR unavailable and 503 within the timeout, then recovery."""
    redis = start_redis()
    a, b, alice, bob, bob_in = alice_and_bob_in_lobby(start_chatd, redis, clients)

    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        refused = alice.talk("lobby", "stuck?", cid="s-1")
        waited = time.monotonic() - started
        assert (refused["type"], refused["code"]) == ("ERROR", "unavailable")
        assert waited < REDIS_TIMEOUT + 1.5, waited
        wait_health(a, 503, timeout=REDIS_TIMEOUT + 2)
        started = time.monotonic()
        status, _, body = http("POST", b.base + "/auth/ticket", token=b.token("carol"))
        assert (status, body["error"]) == (503, "unavailable")
        assert time.monotonic() - started < REDIS_TIMEOUT + 1.5
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    print(f"\nSIGSTOP: ERROR unavailable after {waited:.2f}s (timeout {REDIS_TIMEOUT}s)")
    wait_health(a, 200)
    wait_health(b, 200)
    # Redis may have run the timed-out TALK late from its socket buffer (and
    # published it while the subscribers were reconnecting); a resend with
    # the same cid is safe either way: it is stored once.
    resent = alice.talk("lobby", "stuck?", cid="s-1")
    assert resent["type"] == "TALK"
    back = alice.talk("lobby", "back")
    heard = bob.recv_until(lambda f: f.get("id") == back["id"])  # live on the same connection
    assert [f["message"] for f in heard if f["type"] == "TALK"] in (["stuck?", "back"], ["back"])
    carol = b.connect("carol", name="Carol")
    clients.append(carol)
    carol.send({"type": "ENTER", "room": "lobby", "since": bob_in["id"]})
    frames = carol.recv_until(lambda f: f["type"] == "REPLAY")
    assert [f["message"] for f in frames[:-1]] == ["stuck?", "back"]
    assert frames[-1]["complete"] is True


def test_what_a_client_sends_while_a_stopped_redis_holds_its_ticket_waits(start_redis, start_chatd, clients):
    """
    SIGSTOP of redis-server while a client upgrades: the bytes it sends
    behind its request while the redemption hangs (here a blank line, then
    a frame) are not read as another request; the answer is one 503 when
    Redis times out, nothing is logged as unhandled, and the instance
    serves again after SIGCONT.  (Before, Autobahn answered the second
    "request" with a 400 while the redemption was still due.)
    """
    redis = start_redis()
    a, b, alice, bob, bob_in = alice_and_bob_in_lobby(start_chatd, redis, clients)
    ticket = a.ticket("dave")
    silent = rawws.RawWebSocket(a.port)
    os.kill(redis.proc.pid, signal.SIGSTOP)
    try:
        head = (
            f"GET /ws?ticket={ticket} HTTP/1.1\r\nHost: localhost:{a.port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chatd.v1\r\n\r\n"
        )
        silent.send_raw(head.encode("latin-1"))
        silent.send_raw(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n" + rawws.frame(1, b"early"))
        answer = silent._read_until(b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        # The whole answer, to the close: one status line, no second request's 400.
        silent.sock.settimeout(REDIS_TIMEOUT + 5)
        for _ in range(64):
            try:
                data = silent.sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            silent._buffer += data
        everything = answer + silent._buffer
        assert everything.count(b"HTTP/1.1 ") == 1, everything[:400]
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
        silent.sock.close()
    wait_health(a, 200)
    dave = a.connect("dave")
    clients.append(dave)
    assert dave.welcome["user"] == "dave"
    assert "Unhandled" not in a.log_text() and "Traceback" not in a.log_text()


def test_full_restart_keeps_rooms_history_and_tickets_expire(start_redis, start_chatd, clients):
    """
    Every instance restarts, Redis stays: GET /rooms still lists the room,
    `since` replays completely across the restart, ids keep increasing;
    tickets expire after ticket_ttl.
    """
    redis = start_redis()
    a, b = start_instances(start_chatd, redis, auth__ticket_ttl=1)
    alice, bob = a.connect("alice", name="Alice"), b.connect("bob", name="Bob")
    clients.extend([alice, bob])
    entered = alice.enter("lobby")
    bob.enter("lobby")
    bob.enter("ops")
    said = [alice.talk("lobby", f"m{i}") for i in range(2)]
    assert room_users(b, "lobby") == 2 and room_users(b, "ops") == 1

    # A stops first: bob, on B, sees alice leave exactly once (her QUIT went
    # through the broker before its goodbye, which found nobody left).
    a.stop()
    assert alice.closed_with() == 1001
    bob.send({"type": "TALK", "room": "lobby", "message": "marker", "ref": "marker"})
    frames = bob.recv_until(lambda f: f.get("ref") == "marker")
    marker = frames[-1]
    assert [(f["sender"], f["userCount"]) for f in frames if f["type"] == "QUIT"] == [("Alice", 1)]
    assert "0 connections left their rooms on shutdown" in a.log_text()
    assert "not recorded" not in a.log_text()
    b.stop()  # now every instance is down
    assert bob.closed_with() == 1001
    for server in (a, b):
        server.start(wait=False)
    for server in (a, b):
        server.wait_ready()
        wait_health(server, 200)

    # lobby has history, so it stays; ops had none and nobody is left in it.
    status, _, body = http("GET", b.base + "/rooms", token=b.token("observer"))
    assert body == {"rooms": [{"name": "lobby", "users": 0}]}
    carol = b.connect("carol", name="Carol")
    clients.append(carol)
    carol.send({"type": "ENTER", "room": "lobby", "since": entered["id"]})
    frames = carol.recv_until(lambda f: f["type"] == "ENTER")
    assert [f["id"] for f in frames[:3]] == [s["id"] for s in said] + [marker["id"]]
    assert frames[3] == {"type": "REPLAY", "room": "lobby", "count": 3, "complete": True}
    assert key(frames[4]["id"]) > key(marker["id"]) and frames[4]["userCount"] == 1

    ticket = a.ticket("dave")
    time.sleep(1.3)  # the property under test is the passing of ticket_ttl itself
    assert ws_refusal(b.ws_base + "/ws?ticket=" + ticket) == 401


def test_stalled_instance_keeps_its_users(start_redis, start_chatd, clients):
    """
    kill -STOP of instance A for longer than presence_ttl x 4/3: B takes A
    for dead and reaps alice (bob sees her QUIT).  After kill -CONT, A puts
    alice back and the room is told so with an ENTER of the right count;
    alice never receives a QUIT she did not send, can still TALK, and her
    real departure later is one QUIT that leaves both counts right.
    """
    redis = start_redis()
    a, b, alice, bob, _ = alice_and_bob_in_lobby(start_chatd, redis, clients)
    os.kill(a.proc.pid, signal.SIGSTOP)
    try:
        stalled = time.monotonic()
        reaped = bob.recv(timeout=PRESENCE_TTL * 4 / 3 + 5)
        assert (reaped["type"], reaped["sender"], reaped["userCount"]) == ("QUIT", "Alice", 1)
        assert room_users(b, "lobby") == 1
        # Stay stopped a little longer than the reap took (the case).
        time.sleep(max(0.0, PRESENCE_TTL * 4 / 3 + 0.5 - (time.monotonic() - stalled)))
    finally:
        os.kill(a.proc.pid, signal.SIGCONT)
    back = bob.recv(timeout=PRESENCE_TTL * 2)
    assert (back["type"], back["sender"], back["userCount"]) == ("ENTER", "Alice", 2)
    alice.send({"type": "TALK", "room": "lobby", "message": "still here", "ref": "s"})
    heard = alice.recv_until(lambda f: f.get("ref") == "s")
    assert [f["type"] for f in heard if f.get("sender") == "Alice"] in (["TALK"], ["ENTER", "TALK"])
    said = heard[-1]
    assert said["type"] == "TALK", heard
    assert bob.recv()["id"] == said["id"]
    wait_for(lambda: room_users(a, "lobby") == room_users(b, "lobby") == 2, PRESENCE_TTL * 2,
             "both count alice and bob")
    alice.close()
    gone = bob.recv()
    assert (gone["type"], gone["sender"], gone["userCount"]) == ("QUIT", "Alice", 1)
    wait_for(lambda: room_users(a, "lobby") == room_users(b, "lobby") == 1, PRESENCE_TTL * 2,
             "both count bob only")


def test_frozen_redis_answers_each_talk_once(start_redis, start_chatd, clients):
    """
    redis-server SIGSTOPped for 5 s while alice keeps talking, a TALK every
    10 ms from before the stop (each with a cid and a ref, so some are in
    every stage of a call when Redis stops): every TALK gets exactly one
    answer, its event or ERROR unavailable, never both, in either order.
    Both instances have the default presence_ttl (heartbeats 5 s apart), so
    no upkeep PING drops a connection during the freeze.  B, an instance
    with no call in flight, reports /healthz 503 within [redis] timeout +
    1 s: it PINGs Redis itself.
    """
    redis = start_redis()
    (a,) = start_instances(start_chatd, redis, count=1, redis__presence_ttl=15,
                           limits__rate=500, limits__burst=1000)
    (b,) = start_instances(start_chatd, redis, count=1, redis__presence_ttl=15)
    alice = a.connect("alice", name="Alice")
    clients.append(alice)
    alice.enter("lobby")
    refs, stopped, unhealthy_after = [], None, None
    started = time.monotonic()
    try:
        for _ in range(1000):  # bounded: 5.5 s in steps of about 10 ms
            elapsed = time.monotonic() - started
            if elapsed >= 5.5:
                break
            if stopped is None and elapsed >= 0.5:
                os.kill(redis.proc.pid, signal.SIGSTOP)
                stopped = time.monotonic()
            ref = f"r{len(refs)}"
            refs.append(ref)
            alice.send({"type": "TALK", "room": "lobby", "message": f"m {ref}",
                        "cid": f"c-{ref}", "ref": ref})
            if stopped is not None and unhealthy_after is None and len(refs) % 5 == 0 \
                    and health(b) == 503:
                unhealthy_after = time.monotonic() - stopped
            time.sleep(0.01)  # pacing the sender: the freeze's length is what is tested
    finally:
        os.kill(redis.proc.pid, signal.SIGCONT)
    wait_health(a, 200)
    alice.send({"type": "TALK", "room": "lobby", "message": "end", "ref": "end"})
    frames = alice.recv_until(lambda f: f.get("ref") == "end" and f["type"] == "TALK",
                              timeout=15, limit=5000)
    answers = {ref: [f["type"] for f in frames if f.get("ref") == ref] for ref in refs}
    late = [f["message"] for f in frames if f["type"] == "TALK" and "ref" not in f]
    contradictions = sum(1 for kinds in answers.values() if len(kinds) > 1)
    stored = {m.split(" ", 1)[1] for m in _stored_messages(redis, "lobby") if m.startswith("m ")}
    acked = {ref for ref, kinds in answers.items() if "TALK" in kinds}
    print(f"\nfrozen Redis: {len(refs)} TALKs, {len(stored)} stored, {len(stored - acked)} of "
          f"those answered unavailable; {contradictions} answered twice, "
          f"{sum(1 for k in answers.values() if k == ['ERROR'])} unavailable "
          f"({len(late)} stored anyway, sent without ref), /healthz 503 after "
          f"{unhealthy_after if unhealthy_after is None else round(unhealthy_after, 2)}s on B")
    assert all(len(kinds) == 1 for kinds in answers.values()), \
        {ref: kinds for ref, kinds in answers.items() if len(kinds) != 1}
    assert unhealthy_after is not None and unhealthy_after <= REDIS_TIMEOUT + 1.0, unhealthy_after
