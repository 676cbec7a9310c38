"""
The server API and webhooks through real processes: `twistd chatd` on one
instance (embedded broker) and on two instances sharing a private
redis-server, real TLS, real WebSocket clients, and a webhook receiver
this test runs on loopback (a threaded HTTP server; every wait bounded).
"""

import contextlib
import hashlib
import hmac
import json
import queue
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from websockets.exceptions import InvalidStatus

from tests import rawws, support
from tests.support import RECV_TIMEOUT, http, wait_for, ws_refusal
from tests.test_broker_redis import redis_command

KEY = "test-api-key-" + "k" * 40
HOOK_SECRET = b"hook-secret-" + b"s" * 32
PRESENCE_TTL = 3


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "api.keys"
    path.write_text(f"# test key\n{KEY}\n")
    return str(path)


@pytest.fixture
def hook_secret_file(tmp_path):
    path = tmp_path / "hook.secret"
    path.write_bytes(HOOK_SECRET + b"\n")
    return str(path)


def api(server, method, path, body=None, key=KEY):
    """One server API call; returns (status, JSON body)."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["X-API-Key"] = key
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    status, _, answer = http(method, server.base + path, body=data, headers=headers)
    return status, answer


def next_of(client, kind, room=None):
    """The next frame of C{kind} (in C{room}), skipping others; bounded."""
    return client.recv_until(lambda f: f["type"] == kind and (room is None or f.get("room") == room))[-1]


# --- the webhook receiver ----------------------------------------------------------------


class Receiver:
    """
    A backend on loopback: records every POST (delivery id, signature,
    body) in arrival order and answers with the next scripted status (200
    once the script runs out); C{"hang"} holds the answer until released or
    the receiver stops.
    """

    def __init__(self, script=()):
        self.script = list(script)
        self.arrivals = queue.Queue()
        self.requests = []
        self.seen = set()  # delivery ids whose events events_until returned
        self.release = threading.Event()
        self.hanging = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                entry = (self.headers["X-Chatd-Delivery"], self.headers["X-Chatd-Signature"], body)
                receiver.requests.append(entry)
                status = receiver.script.pop(0) if receiver.script else 200
                receiver.arrivals.put(entry)
                if status == "hang":
                    receiver.hanging.set()
                    receiver.release.wait(30)
                    receiver.hanging.clear()
                    status = 200
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # chatd gave up on a hanging answer and closed the connection

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})
        self.thread.start()

    def next(self, timeout=10):
        return self.arrivals.get(timeout=timeout)

    def events_until(self, predicate, timeout=10):
        """Event dicts from arriving batches until C{predicate(all so far)} holds; bounded."""
        seen = []
        for _ in range(1000):
            delivery, signature, body = self.next(timeout)
            assert hmac.compare_digest(
                signature, "sha256=" + hmac.new(HOOK_SECRET, body, hashlib.sha256).hexdigest()
            )
            if delivery in self.seen:
                continue  # a retry of a batch already seen
            self.seen.add(delivery)
            seen += json.loads(body)["events"]
            if predicate(seen):
                return seen
        raise AssertionError("no end to the deliveries")

    def nothing_new(self, timeout=0.5):
        """True when no batch with a new delivery id arrives within C{timeout} (bounded)."""
        for _ in range(100):
            try:
                delivery, _, _ = self.next(timeout)
            except queue.Empty:
                return True
            if delivery not in self.seen:
                raise AssertionError(f"a new delivery {delivery} arrived")
        raise AssertionError("retries without end")

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def receiver():
    started = []

    def start(script=()):
        started.append(Receiver(script))
        return started[-1]

    yield start
    for r in started:
        r.stop()


# --- one instance ----------------------------------------------------------------------


def test_api_off_is_404(chatd):
    """Without [api] key_file every /api/ path answers 404, with a key or without."""
    for method, path in (("GET", "/api/rooms"), ("POST", "/api/publish"), ("GET", "/api/")):
        assert api(chatd, method, path, {"room": "lobby", "message": "x"})[0] == 404
        assert api(chatd, method, path, key=None)[0] == 404


def test_one_instance(start_chatd, key_file, clients):
    """
    Publish, presence, history, kick, disconnect and the refusals on the
    embedded broker; a wrong or missing key changes nothing.
    """
    server = start_chatd(api__key_file=key_file)
    alice = server.connect("alice", name="Alice")
    bob = server.connect("bob", name="Bob")
    clients += [alice, bob]
    alice.enter("lobby")
    bob.enter("lobby")
    next_of(alice, "ENTER")  # bob's

    for key in (None, "", "x" * 40, KEY[:-1]):
        status, answer = api(server, "POST", "/api/publish", {"room": "lobby", "message": "nope"}, key=key)
        assert (status, answer["error"]) == (401, "invalid_key")
        assert api(server, "POST", "/api/disconnect", {"sub": "alice"}, key=key)[0] == 401
    assert alice.quiet(0.3)

    status, answer = api(server, "POST", "/api/publish", {"room": "lobby", "message": "maintenance", "cid": "n1"})
    assert status == 200
    event = next_of(alice, "TALK")
    assert (event["id"], event["sender"], event["system"], event["message"]) == (
        answer["id"], "system", True, "maintenance"
    )
    assert api(server, "POST", "/api/publish", {"room": "lobby", "message": "again", "cid": "n1"}) == (200, answer)
    own = alice.talk("lobby", "after the notice")
    assert next_of(bob, "TALK") == event and next_of(bob, "TALK")["id"] == own["id"]
    status, answer = api(server, "POST", "/api/publish", {"room": "lobby", "message": 7})
    assert (status, answer) == (400, {"error": "bad_request", "message": "message must be a string, got number"})
    assert api(server, "POST", "/api/publish", b"{not json")[0] == 400
    status, answer = api(server, "POST", "/api/publish", {"room": "lobby", "message": "x" * 4001, "extra": 1})
    assert (status, answer["message"]) == (400, "message is longer than 4000 characters")
    status, made = api(server, "POST", "/api/publish", {"room": "notices", "message": "first", "sender": "Ops"})
    assert status == 200

    assert api(server, "GET", "/api/rooms") == (200, {"rooms": [
        {"name": "lobby", "users": 2}, {"name": "notices", "users": 0},
    ]})
    assert api(server, "GET", "/api/rooms/lobby") == (200, {"room": "lobby", "userCount": 2, "users": [
        {"sub": "alice", "name": "Alice", "connections": 1}, {"sub": "bob", "name": "Bob", "connections": 1},
    ]})
    assert api(server, "GET", "/api/rooms/ghost")[0] == 404
    status, history = api(server, "GET", "/api/rooms/lobby/history")
    assert status == 200 and [e["id"] for e in history["events"]] == [event["id"], own["id"]]
    assert history["complete"] is True
    status, page = api(server, "GET", f"/api/rooms/lobby/history?since={event['id']}&limit=1")
    assert [e["message"] for e in page["events"]] == ["after the notice"]
    assert api(server, "GET", "/api/rooms/notices/history")[1]["events"][0]["sender"] == "Ops"

    assert api(server, "POST", "/api/rooms/lobby/kick", {"sub": "bob"}) == (200, {"ok": True})
    assert next_of(bob, "ERROR") == {"type": "ERROR", "code": "forbidden", "message": "removed from lobby"}
    quit_ = next_of(alice, "QUIT")
    assert (quit_["sender"], quit_["userCount"]) == ("Bob", 1)
    assert bob.enter("ops")["type"] == "ENTER"  # still connected

    unused = server.ticket("alice")
    assert api(server, "POST", "/api/disconnect", {"sub": "alice", "reason": "banned"}) == (200, {"ok": True})
    assert alice.closed_with() == 4003
    assert ws_refusal(server.ws_base + "/ws?ticket=" + unused) == 401
    assert bob.talk("ops", "still here")["type"] == "TALK"
    assert KEY not in server.log_text()


def test_webhooks_one_instance(start_chatd, hook_secret_file, key_file, receiver, clients):
    """
    Every TALK (a publish included) reaches the webhook, signed; a 500 is
    retried with the same delivery id; a receiver that hangs does not hold
    chat up.
    """
    hook = receiver([500, "hang"])
    server = start_chatd(
        api__key_file=key_file, webhook__url=hook.url, webhook__secret_file=hook_secret_file,
        webhook__events="talk quit", webhook__timeout=2,
    )
    alice, bob = server.connect("alice", name="Alice"), server.connect("bob", name="Bob")
    clients += [alice, bob]
    alice.enter("lobby")
    bob.enter("lobby")
    first = alice.talk("lobby", "one")
    failed = hook.next()
    retried = hook.next()
    assert failed == retried  # same delivery id, same signed body
    assert hook.hanging.wait(10)  # the retry hangs now
    # Chat goes on while the webhook hangs.
    second = bob.talk("lobby", "two")
    assert next_of(alice, "TALK")["id"] == second["id"]
    assert hook.hanging.is_set()
    assert api(server, "POST", "/api/publish", {"room": "lobby", "message": "three"})[0] == 200
    hook.release.set()
    bob.close()
    hook.seen.add(failed[0])
    events = json.loads(failed[2])["events"] + hook.events_until(
        lambda seen: any(e["type"] == "QUIT" for e in seen)
    )
    assert [(e["type"], e["message"], e["sub"]) for e in events] == [
        ("TALK", "one", "alice"), ("TALK", "two", "bob"), ("TALK", "three", "system"), ("QUIT", "Bob left", "bob"),
    ]
    assert events[0]["id"] == first["id"] and events[2]["system"] is True


# --- two instances over Redis -------------------------------------------------------------


def two(start_chatd, start_redis, **overrides):
    redis = start_redis()
    settings = dict(redis__url=redis.url, redis__presence_ttl=PRESENCE_TTL, redis__timeout=1, **overrides)
    servers = [start_chatd(wait=False, **settings) for _ in range(2)]
    for server in servers:
        server.wait_ready()
        wait_for(lambda: http("GET", server.base + "/healthz", timeout=2)[0] == 200, 10, "healthy")
    return servers


def test_two_instances(start_chatd, start_redis, key_file, clients):
    """
    Over Redis: a publish on A reaches members on A and B in one order with
    the clients' TALKs; presence and history answer the same on both;
    a disconnect on A closes the user's connections on A and B with 4003
    while others stay; a kick on B takes a user on A out.
    """
    a, b = two(start_chatd, start_redis, api__key_file=key_file)
    alice_a = a.connect("alice", name="Alice")
    alice_b = b.connect("alice", name="Alice")
    bob_b = b.connect("bob", name="Bob")
    carol_a = a.connect("carol", name="Carol")
    clients += [alice_a, alice_b, bob_b, carol_a]
    for client in (alice_a, alice_b, bob_b, carol_a):
        client.enter("lobby")
    wait_for(lambda: api(a, "GET", "/api/rooms/lobby")[1].get("userCount") == 3, 10, "presence on A")

    bob_b.talk("lobby", "before")
    status, published = api(a, "POST", "/api/publish", {"room": "lobby", "message": "notice"})
    assert status == 200
    carol_a.talk("lobby", "after")
    orders = [
        [f["message"] for f in client.recv_until(lambda f: f.get("message") == "after") if f["type"] == "TALK"]
        for client in (alice_a, alice_b)  # on A and on B, neither talked
    ]
    assert orders[0] == orders[1] and orders[0][-3:] == ["before", "notice", "after"]

    for server in (a, b):
        assert api(server, "GET", "/api/rooms/lobby") == (200, {"room": "lobby", "userCount": 3, "users": [
            {"sub": "alice", "name": "Alice", "connections": 2},
            {"sub": "bob", "name": "Bob", "connections": 1},
            {"sub": "carol", "name": "Carol", "connections": 1},
        ]})
        status, history = api(server, "GET", "/api/rooms/lobby/history?limit=3")
        assert [e["message"] for e in history["events"]] == ["before", "notice", "after"]
        assert history["events"][1]["id"] == published["id"]

    assert api(b, "POST", "/api/rooms/lobby/kick", {"sub": "carol"}) == (200, {"ok": True})
    assert next_of(carol_a, "ERROR")["message"] == "removed from lobby"
    assert next_of(bob_b, "QUIT")["sender"] == "Carol"

    assert api(a, "POST", "/api/disconnect", {"sub": "alice", "reason": "banned"}) == (200, {"ok": True})
    assert alice_a.closed_with() == 4003
    assert alice_b.closed_with() == 4003
    quits = [next_of(bob_b, "QUIT"), next_of(bob_b, "QUIT")]
    assert [q["sender"] for q in quits] == ["Alice", "Alice"] and quits[-1]["userCount"] == 1
    assert bob_b.talk("lobby", "still here")["type"] == "TALK"
    assert carol_a.talk("lobby", "me too")["type"] == "ERROR"  # kicked: not in lobby
    wrong = api(b, "POST", "/api/disconnect", {"sub": "bob"}, key="wrong" * 10)
    assert wrong[0] == 401 and bob_b.talk("lobby", "unharmed")["type"] == "TALK"


def test_webhooks_two_instances_deliver_once(start_chatd, start_redis, hook_secret_file, receiver, clients):
    """Two instances on one Redis and one webhook: every TALK arrives once, from the instance that took it."""
    hook = receiver()
    a, b = two(start_chatd, start_redis, webhook__url=hook.url, webhook__secret_file=hook_secret_file)
    alice, bob = a.connect("alice"), b.connect("bob")
    clients += [alice, bob]
    alice.enter("lobby")
    bob.enter("lobby")
    sent = []
    for i in range(10):
        sent.append(alice.talk("lobby", f"a{i}")["id"])
        sent.append(bob.talk("lobby", f"b{i}")["id"])
    events = hook.events_until(lambda seen: len(seen) >= 20)
    assert sorted(e["id"] for e in events) == sorted(sent)
    assert {e["message"][0]: e["sub"] for e in events} == {"a": "alice", "b": "bob"}
    assert hook.nothing_new()


def test_broker_outage_is_503(start_chatd, start_redis, key_file, clients):
    """With Redis gone every API call that needs it answers 503 unavailable; back, it serves again."""
    redis = start_redis()
    server = start_chatd(api__key_file=key_file, redis__url=redis.url, redis__timeout=1,
                         redis__presence_ttl=PRESENCE_TTL)
    assert api(server, "POST", "/api/publish", {"room": "lobby", "message": "before"})[0] == 200
    port = redis.port
    redis.stop()
    wait_for(lambda: http("GET", server.base + "/healthz", timeout=3)[0] == 503, 10, "/healthz 503")
    for method, path, body in (
        ("POST", "/api/publish", {"room": "lobby", "message": "lost?"}),
        ("GET", "/api/rooms", None),
        ("GET", "/api/rooms/lobby", None),
        ("GET", "/api/rooms/lobby/history", None),
        ("POST", "/api/disconnect", {"sub": "alice"}),
        ("POST", "/api/rooms/lobby/kick", {"sub": "alice"}),
    ):
        status, answer = api(server, method, path, body)
        assert (status, answer["error"]) == (503, "unavailable"), (method, path, answer)
    assert api(server, "GET", "/api/rooms", key="wrong" * 10)[0] == 401  # the key is checked first
    start_redis(port=port)
    wait_for(lambda: http("GET", server.base + "/healthz", timeout=3)[0] == 200, 15, "/healthz 200")
    assert api(server, "POST", "/api/publish", {"room": "lobby", "message": "after"})[0] == 200
    assert "Traceback" not in server.log_text()


def test_admin_listener_serves_the_api_and_webhook_metrics(start_chatd, key_file, hook_secret_file, receiver, clients):
    """With [admin] endpoint set the API answers there too (keys checked), and /metrics counts the webhook."""
    from tests.support import free_port

    hook = receiver()
    admin_port = free_port()
    server = start_chatd(
        api__key_file=key_file, admin__endpoint=f"tcp:{admin_port}:interface=127.0.0.1",
        webhook__url=hook.url, webhook__secret_file=hook_secret_file,
    )
    admin = f"http://127.0.0.1:{admin_port}"
    status, _, answer = http("POST", admin + "/api/publish", body=json.dumps({"room": "ops", "message": "hi"}).encode(),
                             headers={"X-API-Key": KEY, "Content-Type": "application/json"})
    assert status == 200 and "id" in answer
    assert http("GET", admin + "/api/rooms")[0] == 401
    assert [e["message"] for e in hook.events_until(lambda seen: len(seen) >= 1)] == ["hi"]
    wait_for(lambda: b"chatd_webhook_delivered_events_total 1.0" in http("GET", admin + "/metrics")[2],
             10, "the delivery counted")


def test_webhooks_get_the_quits_of_a_stopping_instance(start_chatd, start_redis, hook_secret_file, receiver, clients):
    """
    An instance stopped with SIGTERM while its users are in a room: every
    QUIT the room's members on the other instance see reaches the webhook,
    once (from the stopping instance, which accepted them).
    """
    hook = receiver()
    a, b = two(start_chatd, start_redis, webhook__url=hook.url, webhook__secret_file=hook_secret_file,
               webhook__events="talk quit", server__drain_time="0.5")
    alice, carol, bob = a.connect("alice", name="Alice"), a.connect("carol", name="Carol"), b.connect("bob")
    clients += [alice, carol, bob]
    for client in (alice, carol, bob):
        client.enter("lobby")
    said = alice.talk("lobby", "bye soon")
    assert hook.events_until(lambda seen: any(e["id"] == said["id"] for e in seen))
    a.stop()
    seen_by_bob = [next_of(bob, "QUIT"), next_of(bob, "QUIT")]
    assert sorted(q["sender"] for q in seen_by_bob) == ["Alice", "Carol"]
    events = hook.events_until(lambda seen: len([e for e in seen if e["type"] == "QUIT"]) >= 2)
    subs = {"Alice": "alice", "Carol": "carol"}
    assert sorted((e["id"], e["sub"]) for e in events if e["type"] == "QUIT") == sorted(
        (q["id"], subs[q["sender"]]) for q in seen_by_bob)
    assert hook.nothing_new()


def test_webhooks_get_the_quits_of_a_stopping_instance_goodbye(start_chatd, start_redis, hook_secret_file,
                                                               receiver, clients):
    """
    A connection that does not finish the close handshake outlasts the
    drain of its instance (SIGTERM), so the instance's goodbye takes it out
    of its room in Redis: the QUIT the other instance's members see reaches
    the webhook too, once.
    """
    hook = receiver()
    a, b = two(start_chatd, start_redis, webhook__url=hook.url, webhook__secret_file=hook_secret_file,
               webhook__events="quit", server__drain_time="0.5")
    bob = b.connect("bob")
    clients.append(bob)
    bob.enter("lobby")
    silent = rawws.RawWebSocket(a.port)  # never answers the server's close frame
    try:
        status, head = silent.upgrade("/ws?ticket=" + a.ticket("dave", name="Dave"))
        assert status == 101, head
        assert silent.recv_json()["type"] == "WELCOME"
        silent.send_json({"type": "ENTER", "room": "lobby", "ref": "in"})
        assert silent.recv_json()["ref"] == "in"
        assert next_of(bob, "ENTER")["sender"] == "Dave"
        a.stop()
        left = next_of(bob, "QUIT")
        assert left["sender"] == "Dave"
        events = hook.events_until(lambda seen: any(e["type"] == "QUIT" for e in seen))
        assert [(e["type"], e["id"], e["sub"]) for e in events] == [("QUIT", left["id"], "dave")]
        assert hook.nothing_new()
        # The goodbye's QUIT, coming back to the stopping instance, is not
        # taken for a reap of a connection still there (no ENTER follows).
        assert bob.quiet(1.0)
        assert "putting it back" not in a.log_text()
    finally:
        silent.close()


def test_webhooks_get_the_quits_of_a_dead_instance(start_chatd, start_redis, hook_secret_file, receiver, clients):
    """
    An instance killed with SIGKILL says no goodbye: the instance that
    reaps its connections publishes their QUITs and hands them to the
    webhook, once, with each user's sub.
    """
    hook = receiver()
    a, b = two(start_chatd, start_redis, webhook__url=hook.url, webhook__secret_file=hook_secret_file,
               webhook__events="quit")
    alice, bob = a.connect("alice", name="Alice"), b.connect("bob")
    clients += [alice, bob]
    alice.enter("lobby")
    bob.enter("lobby")
    a.kill()
    left = bob.recv_until(lambda f: f["type"] == "QUIT", timeout=PRESENCE_TTL * 4 / 3 + 5)[-1]
    assert (left["sender"], left["userCount"]) == ("Alice", 1)
    events = hook.events_until(lambda seen: any(e["type"] == "QUIT" for e in seen))
    assert [(e["type"], e["id"], e["sub"]) for e in events] == [("QUIT", left["id"], "alice")]
    assert hook.nothing_new()


# --- disconnect against an upgrade in flight --------------------------------------------


class RedisLinkProxy:
    """
    A TCP proxy on loopback between one chatd and its Redis that can hold
    back Redis's replies on chatd's command link (the connection that never
    sent SUBSCRIBE) while its subscriber link keeps flowing: the order in
    which the two links deliver is the test's to choose.  One thread, a
    select loop with a bounded wait per round.
    """

    def __init__(self, redis_port):
        self._redis_port = redis_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pairs = {}  # socket -> its link's state (a dict shared by both ends)
        self._holding = threading.Event()
        self._stopping = threading.Event()
        self.subscriber_heard = bytearray()  # what Redis sent the subscriber links (bounded)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def hold_commands(self):
        self._holding.set()

    def release(self):
        self._holding.clear()

    def heard(self, text):
        with self._lock:
            return text in self.subscriber_heard

    def held(self):
        """Bytes of replies held back now."""
        with self._lock:
            return sum(len(link["held"]) for link in {id(v): v for v in self._pairs.values()}.values())

    def _run(self):
        while not self._stopping.is_set():
            readable, _, _ = select.select([self._listener, *self._pairs], [], [], 0.02)
            for sock in readable:
                if sock is self._listener:
                    client, _ = self._listener.accept()
                    server = socket.create_connection(("127.0.0.1", self._redis_port), timeout=5)
                    link = {"client": client, "server": server, "subscriber": False, "held": b""}
                    self._pairs[client] = self._pairs[server] = link
                    continue
                link = self._pairs.get(sock)
                if link is None:
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self._drop(link)
                    continue
                if sock is link["client"]:
                    link["subscriber"] = link["subscriber"] or b"SUBSCRIBE" in data.upper()
                    try:
                        link["server"].sendall(data)
                    except OSError:
                        self._drop(link)
                else:
                    with self._lock:
                        if link["subscriber"]:
                            self.subscriber_heard += data[-65536:]
                            del self.subscriber_heard[:-262144]
                        else:
                            link["held"] += data  # sent below unless holding
                    if link["subscriber"]:
                        try:
                            link["client"].sendall(data)
                        except OSError:
                            self._drop(link)
            for link in {id(v): v for v in self._pairs.values()}.values():
                if link["held"] and not self._holding.is_set():
                    with self._lock:
                        out, link["held"] = link["held"], b""
                    try:
                        link["client"].sendall(out)
                    except OSError:
                        self._drop(link)

    def _drop(self, link):
        for sock in (link["client"], link["server"]):
            self._pairs.pop(sock, None)
            with contextlib.suppress(OSError):
                sock.close()

    def stop(self):
        self._stopping.set()
        self._thread.join(5)
        assert not self._thread.is_alive()
        for link in {id(v): v for v in self._pairs.values()}.values():
            self._drop(link)
        self._listener.close()


def test_disconnect_refuses_an_upgrade_whose_redeem_is_in_flight(start_chatd, start_redis, key_file, clients):
    """
    Two instances over Redis.  Alice's upgrade on A is under way: Redis
    redeemed her ticket, but A has not read the reply yet (held back by a
    proxy on A's command link) when the server API disconnects her through
    B and A hears the disconnect.  A had no connection of hers to close
    then; the upgrade must still not get through (401), and a ticket
    issued after the disconnect works.
    """
    redis = start_redis()
    proxy = RedisLinkProxy(redis.port)
    try:
        settings = dict(redis__presence_ttl=PRESENCE_TTL, redis__timeout=5, api__key_file=key_file)
        a = start_chatd(wait=False, redis__url=proxy.url, **settings)
        b = start_chatd(wait=False, redis__url=redis.url, **settings)
        for server in (a, b):
            server.wait_ready()
            wait_for(lambda: http("GET", server.base + "/healthz", timeout=2)[0] == 200, 10, "healthy")
        ticket = a.ticket("alice", name="Alice")
        outcome = []

        def upgrade():
            try:
                outcome.append(support.ws_open(a.ws_base + "/ws?ticket=" + ticket))
            except InvalidStatus as refused:
                outcome.append(refused.response.status_code)
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                outcome.append(e)

        proxy.hold_commands()
        upgrading = threading.Thread(target=upgrade, daemon=True)
        upgrading.start()
        try:
            wait_for(lambda: redis_command(redis.port, "KEYS", "chatd:ticket:*") == [], 5, "the redeem in Redis")
            assert api(b, "POST", "/api/disconnect", {"sub": "alice", "reason": "banned"}) == (200, {"ok": True})
            wait_for(lambda: proxy.heard(b'"op":"disconnect"'), 5, "A to hear the disconnect")
            assert proxy.held() > 0 and not outcome  # the redeem's reply is still held back
        finally:
            proxy.release()
        upgrading.join(10)
        assert not upgrading.is_alive()
        if not isinstance(outcome[0], int):
            clients.append(support.Client(outcome[0]))
        assert outcome == [401], outcome
        again = a.connect("alice", name="Alice")  # a ticket issued after the disconnect
        clients.append(again)
        assert again.enter("lobby")["type"] == "ENTER"
    finally:
        proxy.stop()
