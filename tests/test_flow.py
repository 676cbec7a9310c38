"""
The whole single-instance path against a real `twistd chatd` over real TLS:
ticket, wss, ENTER/TALK/QUIT with user counts, replay, AUTH, and every
refusal that applies to one instance.
"""

import json
import time

from tests.support import http, ws_open, ws_refusal


def test_ticket_then_chat(chatd, clients):
    """Two users enter, talk and leave; both see the same events, counts and ids."""
    alice = chatd.connect("alice", name="Alice")
    clients.append(alice)
    assert alice.welcome["user"] == "Alice"
    assert alice.ws.subprotocol == "chatd.v1"

    entered = alice.enter("lobby")
    assert (entered["type"], entered["sender"], entered["userCount"]) == ("ENTER", "Alice", 1)

    bob = chatd.connect("bob")
    clients.append(bob)
    bob_enter = bob.enter("lobby")
    assert bob_enter["userCount"] == 2
    assert alice.recv() == {k: v for k, v in bob_enter.items() if k != "ref"}

    said = alice.talk("lobby", "hello {bob}", sender="mallory")
    assert said["sender"] == "Alice" and said["message"] == "hello {bob}"
    heard = bob.recv()
    assert heard["id"] == said["id"] and "ref" not in heard

    alice.close()
    quit_event = bob.recv()
    assert (quit_event["type"], quit_event["sender"], quit_event["userCount"]) == ("QUIT", "Alice", 1)
    ids = [entered["id"], bob_enter["id"], said["id"], quit_event["id"]]
    keys = [tuple(int(p) for p in i.split("-")) for i in ids]
    assert keys == sorted(keys) and len(set(keys)) == 4


def test_rooms_listing(chatd, clients):
    """GET /rooms lists rooms with user counts, filtered by the token's rooms claim."""
    alice = chatd.connect("alice")
    clients.append(alice)
    alice.enter("lobby")
    alice.enter("ops")
    status, _, body = http("GET", chatd.base + "/rooms", token=chatd.token("bob"))
    assert status == 200
    assert body == {"rooms": [{"name": "lobby", "users": 1}, {"name": "ops", "users": 1}]}
    status, _, body = http("GET", chatd.base + "/rooms", token=chatd.token("bob", rooms=["ops"]))
    assert body == {"rooms": [{"name": "ops", "users": 1}]}
    status, headers, body = http("GET", chatd.base + "/rooms")
    assert status == 401 and body["error"] == "invalid_token"


def test_replay_since(chatd, clients):
    """A reconnecting client gets what it missed, in order, then REPLAY, then live events."""
    alice = chatd.connect("alice")
    bob = chatd.connect("bob")
    clients.extend([alice, bob])
    alice.enter("lobby")
    bob.enter("lobby")
    alice.recv()  # bob's ENTER
    first = alice.talk("lobby", "one")
    bob.recv()
    bob.close()
    alice.recv()  # bob's QUIT
    missed = [alice.talk("lobby", f"m{i}")["id"] for i in range(3)]

    bob = chatd.connect("bob")
    clients.append(bob)
    bob.send({"type": "ENTER", "room": "lobby", "since": first["id"], "ref": "x"})
    frames = bob.recv_until(lambda f: f["type"] == "ENTER")
    assert [f["id"] for f in frames[:3]] == missed
    assert frames[3] == {"type": "REPLAY", "room": "lobby", "count": 3, "complete": True, "ref": "x"}
    assert frames[4]["sender"] == "bob" and frames[4]["ref"] == "x"

    # An id from another life of the server cannot vouch for completeness.
    carol = chatd.connect("carol")
    clients.append(carol)
    carol.send({"type": "ENTER", "room": "lobby", "since": "1-1"})
    frames = carol.recv_until(lambda f: f["type"] == "REPLAY")
    assert frames[-1]["complete"] is False and frames[-1]["count"] == 4


def test_errors_keep_the_connection(chatd, clients):
    """Each bad message gets its ERROR and the connection stays usable."""
    alice = chatd.connect("alice", rooms=["lobby"])
    clients.append(alice)
    cases = [
        ("not json", "bad_request"),
        ("[1,2]", "bad_request"),
        (json.dumps({"type": "SHOUT"}), "bad_request"),
        (json.dumps({"type": "ENTER", "room": "no spaces"}), "bad_request"),
        (json.dumps({"type": "ENTER", "room": "x" * 65}), "bad_request"),
        (json.dumps({"type": "ENTER", "room": "secret"}), "forbidden"),
        (json.dumps({"type": "TALK", "room": "lobby", "message": "hi"}), "not_member"),
        (json.dumps({"type": "QUIT", "room": "lobby"}), "not_member"),
        (json.dumps({"type": "TALK", "room": "lobby", "message": 5}), "bad_request"),
        (json.dumps({"type": "AUTH", "token": "nope"}), "unauthorized"),
        (json.dumps({"type": "AUTH", "token": chatd.token("mallory")}), "unauthorized"),
    ]
    for frame, code in cases:
        alice.send(frame)
        answer = alice.recv()
        assert (answer["type"], answer["code"]) == ("ERROR", code), (frame, answer)
    alice.enter("lobby")
    too_long = alice.talk("lobby", "x" * 4001)
    assert too_long["code"] == "too_large"
    assert alice.talk("lobby", "still here")["type"] == "TALK"


def test_auth_renews_and_expiry_closes(chatd, clients):
    """AUTH with a fresh token extends expiry (new WELCOME); without it, close 4001."""
    alice = chatd.connect("alice", ttl=2)
    clients.append(alice)
    renewed = alice.request({"type": "AUTH", "token": chatd.token("alice", ttl=3)})
    assert renewed["type"] == "WELCOME" and renewed["expires"] > alice.welcome["expires"]
    started = time.monotonic()
    assert alice.closed_with(timeout=10) == 4001
    assert time.monotonic() - started >= 1.5


def test_handshake_refusals(chatd):
    """Missing, unknown, reused tickets are 401; a foreign Origin is 403; no upgrade."""
    ws = chatd.ws_base + "/ws"
    assert ws_refusal(ws) == 401
    assert ws_refusal(ws + "?ticket=") == 401
    assert ws_refusal(ws + "?ticket=unknown") == 401
    ticket = chatd.ticket("alice")
    assert ws_refusal(ws + "?ticket=" + ticket, origin="https://evil.example") == 403
    # The 403 did not spend the ticket; using it does, once.
    ws_open(ws + "?ticket=" + ticket, origin=f"https://localhost:{chatd.port}").close()
    assert ws_refusal(ws + "?ticket=" + ticket) == 401


def test_ticket_endpoint_refusals(chatd):
    """Bad JWTs get 401 JSON with WWW-Authenticate; GET is 405."""
    url = chatd.base + "/auth/ticket"
    for token in (None, "garbage", chatd.token("alice", ttl=-10)):
        status, headers, body = http("POST", url, token=token)
        assert status == 401 and body["error"] == "invalid_token"
        assert headers["www-authenticate"].startswith("Bearer")
    status, _, body = http("GET", url)
    assert status == 405
    status, _, body = http("POST", url, token=chatd.token("alice"))
    assert status == 200 and body["expires_in"] == 30 and len(body["ticket"]) >= 22


def test_binary_frame_closes_1003(chatd):
    alice = chatd.connect("alice")
    alice.ws.send(b"\x01\x02")
    assert alice.closed_with() == 1003


def test_oversized_message_closes_1009(start_chatd):
    server = start_chatd(limits__max_message_bytes=1024)
    alice = server.connect("alice")
    alice.send("x" * 2048)
    assert alice.closed_with() == 1009


def test_shutdown_closes_1001(chatd):
    """SIGTERM closes clients with 1001, then twistd exits as killed by SIGTERM (systemd: clean)."""
    alice = chatd.connect("alice")
    chatd.proc.terminate()
    assert alice.closed_with(timeout=10) == 1001
    assert chatd.proc.wait(10) == -15
    assert "Server Shut Down." in chatd.log_text()


def test_secrets_never_logged(chatd, clients):
    """Tickets, JWTs and query strings stay out of the log."""
    token = chatd.token("alice")
    ticket = chatd.ticket("alice")
    alice = chatd.connect(ticket=ticket)
    clients.append(alice)
    alice.request({"type": "AUTH", "token": token})
    ws_refusal(chatd.ws_base + "/ws?ticket=wrong-" + ticket[:8])
    http("GET", chatd.base + "/healthz?token=" + token)
    alice.close()
    chatd.stop()
    text = chatd.log_text()
    assert "websocket" in text and "/healthz?[redacted]" in text
    for secret in (token, ticket, ticket[:8], token.split(".")[2]):
        assert secret not in text
