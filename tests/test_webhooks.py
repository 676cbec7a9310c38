"""
chatd.webhooks: signed batches, retries with the same delivery id, a
bounded queue that never holds chat up.

The first part drives the service on a Clock with a fake HTTP client; the
second sends real HTTP(S) over loopback to a small receiver this test runs.
"""

import json
import os

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web import resource, server
from zope.interface import implementer

from chatd import config
from chatd.messages import RoomEvent
from chatd.tls import certificate_options
from chatd.webhooks import (
    DELIVERY_HEADER, SIGNATURE_HEADER, AgentClient, IWebhookClient, WebhookService, sign, verify,
)

SECRET = b"w" * 32
URL = "https://backend.example/hook"
TIMEOUT = 10.0


def talk(n, room="lobby", kind="TALK"):
    """The n-th event of a room."""
    return RoomEvent(type=kind, id=f"{n}-0", room=room, sender="Alice", message=f"m{n}", user_count=1, ts=1000 + n)


@implementer(IWebhookClient)
class FakeClient:
    """Records every POST; each answer is fired by the test (or never)."""

    def __init__(self):
        self.posts = []  # (url, body, headers, Deferred)
        self.cancelled = []

    def post(self, url, body, headers):
        d = defer.Deferred(lambda d: self.cancelled.append(headers[DELIVERY_HEADER]))
        self.posts.append((url, body, headers, d))
        return d

    def answer(self, status, index=-1):
        self.posts[index][3].callback(status)

    def events(self, index=-1):
        return json.loads(self.posts[index][1])["events"]


@pytest.fixture
def logged():
    """Formatted log lines emitted during the test."""
    lines = []

    def observe(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def make(client=None, clock=None, **kw):
    """A started service on a Clock, delivery ids d1, d2, ... and a 1 s, 2 s, 3 s backoff."""
    ids = iter(f"d{n}" for n in range(1, 10000))
    kw.setdefault("backoff", lambda failures: failures + 1.0)
    service = WebhookService(
        URL, SECRET, clock or task.Clock(), client or FakeClient(), new_delivery_id=lambda: next(ids), **kw
    )
    service.startService()
    return service


# --- signing --------------------------------------------------------------------


def test_sign_is_hex_hmac_sha256():
    """The signature is sha256= and the hex HMAC-SHA256 of the exact body bytes."""
    import hashlib
    import hmac

    body = b'{"events":[]}'
    assert sign(SECRET, body) == "sha256=" + hmac.new(SECRET, body, hashlib.sha256).hexdigest()


@pytest.mark.parametrize("body, secret, header", [
    (b'{"events":[1]}', SECRET, None),  # the body changed
    (b'{"events":[]}', b"x" * 32, None),  # another secret
    (b'{"events":[]}', SECRET, "sha256=zz"),
    (b'{"events":[]}', SECRET, "sha256=\u00e9"),
    (b'{"events":[]}', SECRET, 7),
])
def test_verify_refuses_anything_else(body, secret, header):
    """verify() is false for a changed body, another secret or a malformed header."""
    signature = sign(SECRET, b'{"events":[]}') if header is None else header
    assert verify(secret, body, signature) is False
    assert verify(SECRET, b'{"events":[]}', sign(SECRET, b'{"events":[]}')) is True


# --- the service on a clock --------------------------------------------------------


def test_event_is_posted_signed_with_sub():
    """An accepted TALK is POSTed at once as {"events": [wire + sub]}, signed, with a delivery id."""
    client = FakeClient()
    make(client).accepted(talk(1), "alice-sub")
    [(url, body, headers, _)] = client.posts
    assert url == URL
    assert json.loads(body) == {"events": [dict(talk(1).to_wire(), sub="alice-sub")]}
    assert verify(SECRET, body, headers[SIGNATURE_HEADER])
    assert headers[DELIVERY_HEADER] == "d1"
    assert headers["Content-Type"].startswith("application/json")


def test_only_configured_events_are_sent():
    """With events = talk, ENTER and QUIT are not queued; with enter quit they are."""
    client = FakeClient()
    service = make(client)
    service.accepted(talk(1, kind="ENTER"), "a")
    service.accepted(talk(2, kind="QUIT"), "a")
    assert client.posts == [] and service.queued_events == 0
    other = FakeClient()
    make(other, events={"enter", "quit"}).accepted(talk(1, kind="ENTER"), "a")
    assert [e["type"] for e in other.events()] == ["ENTER"]


def test_events_behind_a_post_go_in_one_batch_in_order():
    """While a POST is out, new events wait and then go together, in the order accepted."""
    client = FakeClient()
    service = make(client)
    service.accepted(talk(1), "a")
    for n in range(2, 6):
        service.accepted(talk(n, room="ops" if n % 2 else "lobby"), "a")
    assert len(client.posts) == 1
    client.answer(200)
    assert len(client.posts) == 2
    assert [e["id"] for e in client.events()] == ["2-0", "3-0", "4-0", "5-0"]
    assert client.posts[1][2][DELIVERY_HEADER] == "d2"
    client.answer(204)
    assert service.delivered_events == 5 and service.queued_events == 0


def test_batches_are_capped():
    """A backlog goes out in batches of at most max_batch events."""
    client = FakeClient()
    service = make(client, max_batch=3)
    for n in range(1, 9):
        service.accepted(talk(n), "a")
    sizes = []
    while client.posts and not client.posts[-1][3].called:
        sizes.append(len(client.events()))
        client.answer(200)
    assert sizes == [1, 3, 3, 1]
    assert service.delivered_events == 8


@pytest.mark.parametrize("status", [500, 404, 302, 100])
def test_non_2xx_is_retried_with_same_id_and_body(status, logged):
    """A non-2xx answer retries after the backoff with the same delivery id and body, then goes on."""
    clock = task.Clock()
    client = FakeClient()
    service = make(client, clock)
    service.accepted(talk(1), "a")
    client.answer(status)
    service.accepted(talk(2), "a")
    assert len(client.posts) == 1  # waiting for the retry, in order
    clock.advance(0.99)
    assert len(client.posts) == 1
    clock.advance(0.01)
    assert len(client.posts) == 2
    assert client.posts[1][1] == client.posts[0][1]
    assert client.posts[1][2][DELIVERY_HEADER] == client.posts[0][2][DELIVERY_HEADER] == "d1"
    client.answer(200)
    assert [e["id"] for e in client.events()] == ["2-0"]
    assert service.failed_attempts == 1
    assert any(f"HTTP {status}" in line and "retry in 1.0s" in line for line in logged)


def test_backoff_grows_per_attempt():
    """Each failed attempt of the same batch waits backoff(attempts) seconds."""
    clock = task.Clock()
    client = FakeClient()
    service = make(client, clock)
    service.accepted(talk(1), "a")
    for attempt in (1, 2, 3):
        client.answer(503)
        clock.advance(attempt - 0.01)
        assert len(client.posts) == attempt
        clock.advance(0.01)
        assert len(client.posts) == attempt + 1
    assert service.failed_attempts == 3


def test_hanging_backend_times_out_and_is_retried():
    """A POST without an answer is cancelled after timeout and retried; chat calls never wait."""
    clock = task.Clock()
    client = FakeClient()
    service = make(client, clock, timeout=5.0)
    service.accepted(talk(1), "a")
    clock.advance(4.9)
    assert client.cancelled == []
    clock.advance(0.1)
    assert client.cancelled == ["d1"] and service.failed_attempts == 1
    for n in range(2, 50):
        service.accepted(talk(n), "a")  # returns at once: nothing to wait for
    clock.advance(1.0)
    assert len(client.posts) == 2 and client.posts[1][2][DELIVERY_HEADER] == "d1"
    client.answer(200)
    assert len(client.events()) == 48


def test_timeout_is_named_whatever_the_cancel_fails_with(logged):
    """Agent fails a cancelled request with ResponseNeverReceived; the log still says it timed out."""
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseNeverReceived

    class AgentLike(FakeClient):
        def post(self, url, body, headers):
            d = defer.Deferred(lambda d: d.errback(ResponseNeverReceived([Failure(defer.CancelledError())])))
            self.posts.append((url, body, headers, d))
            return d

    clock = task.Clock()
    service = make(AgentLike(), clock, timeout=5.0)
    service.accepted(talk(1), "a")
    clock.advance(5.0)
    assert service.failed_attempts == 1
    assert any("attempt 1 failed (no answer in 5.0s); retry in 1.0s" in line for line in logged)


def test_wrapped_reasons_are_unwrapped(logged):
    """A connection error inside Agent's wrapper is logged by its own message."""
    from twisted.internet.error import ConnectionRefusedError
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseNeverReceived

    client = FakeClient()
    make(client).accepted(talk(1), "a")
    client.posts[0][3].errback(ResponseNeverReceived([Failure(ConnectionRefusedError("nobody home"))]))
    assert any("failed (Connection was refused by other side: nobody home.)" in line for line in logged)


def test_full_queue_drops_oldest_batch_counts_and_logs(logged):
    """Past max_queue events the oldest batch (the one being retried) is dropped, counted and logged."""
    clock = task.Clock()
    client = FakeClient()
    service = make(client, clock, max_queue=4, max_batch=2)
    service.accepted(talk(1), "a")
    client.answer(500)  # d1 = [1] waits for its retry
    for n in range(2, 6):
        service.accepted(talk(n), "a")  # d2 = [2, 3], d3 = [4, 5]: 5 events > 4
    assert (service.dropped_batches, service.dropped_events, service.queued_events) == (1, 1, 4)
    assert any("webhook queue full (4 events): dropped batch d1 of 1 events after 1 attempts" in l for l in logged)
    # The retry of d1 does not happen; d2 goes out at once.
    assert [e["id"] for e in client.events()] == ["2-0", "3-0"]
    clock.advance(5)  # past d1's backoff, within the timeout
    assert len(client.posts) == 2
    client.answer(200)
    client.answer(200)
    assert service.delivered_events == 4 and service.queued_events == 0


def test_dropping_the_batch_in_flight():
    """A batch dropped while its POST is out is not retried when that POST fails."""
    clock = task.Clock()
    client = FakeClient()
    service = make(client, clock, max_queue=2, max_batch=1)
    service.accepted(talk(1), "a")
    service.accepted(talk(2), "a")
    service.accepted(talk(3), "a")  # drops d1, in flight
    assert service.dropped_events == 1
    client.answer(500, index=0)
    assert [e["id"] for e in client.events()] == ["2-0"]
    client.answer(200)
    assert [e["id"] for e in client.events()] == ["3-0"]


def fired(d):
    results = []
    d.addBoth(results.append)
    return results


def test_stop_sends_what_is_queued(logged):
    """Stopping sends the queue out first (its Deferred fires once it is acknowledged); nothing is lost."""
    clock = task.Clock()
    client = FakeClient()
    service = make(client, clock)
    service.accepted(talk(1), "a")
    service.accepted(talk(2), "a")
    stopped = fired(service.stopService())
    assert stopped == [] and len(client.posts) == 1
    client.answer(200)
    assert [e["id"] for e in client.events()] == ["2-0"]
    assert stopped == []
    client.answer(200)
    assert stopped == [None] and service.delivered_events == 2
    assert not any("not delivered" in line for line in logged)


def test_stop_gives_up_after_timeout(logged):
    """A backend that does not answer holds shutdown for timeout at most; then the loss is logged."""
    clock = task.Clock()
    client = FakeClient()
    service = make(client, clock, timeout=5.0)
    service.accepted(talk(1), "a")
    service.accepted(talk(2), "a")
    stopped = fired(service.stopService())
    clock.advance(4.9)
    assert stopped == []
    clock.advance(0.1)
    assert stopped == [None] and client.cancelled == ["d1"]
    assert any("webhook: 2 events not delivered at shutdown" in line for line in logged)
    clock.advance(60)
    assert len(client.posts) == 1  # and no retry after stop
    assert not any("retry" in line for line in logged)


def test_stop_tries_a_waiting_retry_once(logged):
    """A batch waiting for its retry is tried once more at once on stop; a failure ends the shutdown."""
    clock = task.Clock()
    client = FakeClient()
    service = make(client, clock)
    service.accepted(talk(1), "a")
    client.answer(500)
    stopped = fired(service.stopService())
    assert len(client.posts) == 2 and client.posts[1][2][DELIVERY_HEADER] == "d1"
    client.answer(500)
    assert stopped == [None]
    assert any("webhook: 1 events not delivered at shutdown" in line for line in logged)
    clock.advance(60)
    assert len(client.posts) == 2


def test_stop_with_nothing_queued_is_immediate():
    """With an empty queue stopping fires at once and sends nothing."""
    client = FakeClient()
    assert fired(defer.maybeDeferred(make(client).stopService)) == [None]
    assert client.posts == []


def test_nothing_is_sent_before_start():
    """Events accepted before start wait in the queue and go out on start."""
    client = FakeClient()
    service = WebhookService(URL, SECRET, task.Clock(), client)
    service.accepted(talk(1), "a")
    assert client.posts == []
    service.startService()
    assert len(client.posts) == 1


def test_from_settings():
    """No [webhook] url: no service; with one, its keys are used."""
    assert WebhookService.from_settings(config.defaults(), task.Clock(), FakeClient()) is None
    settings = config.defaults(webhook__url=URL, webhook__max_queue=7, webhook__events=frozenset({"quit"}))
    service = WebhookService.from_settings(settings, task.Clock(), FakeClient())
    assert service.wants("QUIT") and not service.wants("TALK")
    assert service._max_queue == 7 and service._url == URL


# --- real HTTP over loopback ------------------------------------------------------------


class Receiver(resource.Resource):
    """
    A backend: answers each POST with the next of C{statuses} (200 when
    they run out); C{"hang"} never answers.
    """

    isLeaf = True

    def __init__(self, statuses=(), answer=b"ok"):
        super().__init__()
        self.answer = answer
        self.statuses = list(statuses)
        self.requests = []  # (delivery id, signature, body)
        self.arrived = defer.DeferredQueue()

    def render_POST(self, request):
        body = request.content.read()
        entry = (
            request.getHeader(DELIVERY_HEADER), request.getHeader(SIGNATURE_HEADER), body,
        )
        self.requests.append(entry)
        self.arrived.put(entry)
        status = self.statuses.pop(0) if self.statuses else 200
        if status == "hang":
            return server.NOT_DONE_YET
        request.setResponseCode(status)
        return self.answer


@pytest.fixture
def receiver_at():
    """C{receiver_at(resource, tls=None)}: listen on loopback, give the URL; stopped afterwards."""
    from twisted.internet import reactor

    ports = []

    def listen(receiver, tls=None):
        site = server.Site(receiver)
        if tls is None:
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
            scheme = "http"
        else:
            port = reactor.listenSSL(0, site, tls, interface="127.0.0.1")
            scheme = "https"
        ports.append(port)
        return f"{scheme}://127.0.0.1:{port.getHost().port}/hook"

    yield listen
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def real_service(url, **kw):
    from twisted.internet import reactor

    service = WebhookService(url, SECRET, reactor, AgentClient(reactor), backoff=lambda n: 0.05, **kw)
    service.startService()
    return service


def arrival(receiver):
    from twisted.internet import reactor

    return receiver.arrived.get().addTimeout(TIMEOUT, reactor)


@pytest_twisted.ensureDeferred
async def test_real_delivery_signature_verifies(receiver_at):
    """Over real HTTP every TALK arrives, in order, with a signature the backend can verify."""
    receiver = Receiver()
    service = real_service(receiver_at(receiver))
    try:
        for n in range(1, 6):
            service.accepted(talk(n), "alice")
        seen = []
        while len(seen) < 5:
            delivery, signature, body = await arrival(receiver)
            assert verify(SECRET, body, signature)
            seen += [e["id"] for e in json.loads(body)["events"]]
        assert seen == [f"{n}-0" for n in range(1, 6)]
        assert len({r[0] for r in receiver.requests}) == len(receiver.requests)
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_real_retry_after_500_carries_same_delivery_id(receiver_at):
    """A 500 is retried with the same X-Chatd-Delivery and the same signed body."""
    receiver = Receiver([500, 500])
    service = real_service(receiver_at(receiver))
    try:
        service.accepted(talk(1), "alice")
        first, second, third = [await arrival(receiver) for _ in range(3)]
        assert first == second == third
        assert verify(SECRET, third[2], third[1])
        assert service.failed_attempts == 2
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_real_hanging_receiver_is_timed_out(receiver_at, logged):
    """A receiver that never answers holds the queue up for timeout only; then the retry lands."""
    receiver = Receiver(["hang"])
    service = real_service(receiver_at(receiver), timeout=0.5)
    try:
        service.accepted(talk(1), "alice")
        hung = await arrival(receiver)
        service.accepted(talk(2), "alice")  # returns at once
        assert service.queued_events == 2
        retried = await arrival(receiver)
        assert retried == hung and service.failed_attempts == 1
        assert any("attempt 1 failed (no answer in 0.5s)" in line for line in logged)
        after = await arrival(receiver)
        assert [e["id"] for e in json.loads(after[2])["events"]] == ["2-0"]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_real_tls_verification_is_on(receiver_at, dev_dir, logged):
    """An https receiver with a self-signed certificate is never trusted: nothing is delivered."""
    from twisted.internet import reactor

    tls = certificate_options(config.defaults(
        tls__certificate=os.path.join(dev_dir[0], "fullchain.pem"),
        tls__private_key=os.path.join(dev_dir[0], "privkey.pem"),
    ))
    receiver = Receiver()
    url = receiver_at(receiver, tls=tls).replace("127.0.0.1", "localhost")
    service = real_service(url)
    try:
        service.accepted(talk(1), "alice")
        deadline = reactor.seconds() + TIMEOUT
        while service.failed_attempts < 2 and reactor.seconds() < deadline:
            await task.deferLater(reactor, 0.05)
        assert service.failed_attempts >= 2
        assert receiver.requests == [] and service.delivered_events == 0
        assert any("certificate verify failed" in line for line in logged)
    finally:
        await service.stopService()


def test_default_backoff_is_twisted_policy_from_one_second():
    """Without an injected policy the first retry comes after 1 s plus under 1 s of jitter."""
    clock = task.Clock()
    client = FakeClient()
    service = WebhookService(URL, SECRET, clock, client)
    service.startService()
    service.accepted(talk(1), "a")
    client.answer(500)
    clock.advance(0.999)
    assert len(client.posts) == 1
    clock.advance(1.0)
    assert len(client.posts) == 2


# --- the accepting instance ----------------------------------------------------------


class Hooks:
    def __init__(self):
        self.accepted_events = []

    def accepted(self, event, sub):
        self.accepted_events.append((event.type, event.message, sub))


def test_accepting_broker_reports_what_this_instance_accepted():
    """ENTER, TALK, QUIT and publish through the AcceptingBroker reach the webhook once each, with the sub."""
    from twisted.internet import task
    from zope.interface.verify import verifyObject

    from chatd.broker.interfaces import IBroker, Member
    from chatd.broker.memory import MemoryBroker
    from chatd.webhooks import AcceptingBroker

    clock = task.Clock()
    clock.advance(1_700_000_000)
    real = MemoryBroker(clock, instance_id="i1")
    hooks = Hooks()
    broker = AcceptingBroker(real, hooks)
    assert verifyObject(IBroker, broker) and broker.instance_id == "i1"
    alice = Member("i1:1", "alice-sub", "Alice")
    broker.enter("lobby", alice)
    broker.talk("lobby", alice, "hi", cid="c")
    broker.talk("lobby", alice, "hi again", cid="c")  # duplicate: not reported
    broker.publish("lobby", "Bot", "notice")
    broker.quit("lobby", alice)
    real.talk("lobby", Member("i2:1", "bob", "Bob"), "accepted elsewhere")  # not through us
    assert hooks.accepted_events == [
        ("ENTER", "Alice entered", "alice-sub"), ("TALK", "hi", "alice-sub"),
        ("TALK", "notice", "system"), ("QUIT", "Alice left", "alice-sub"),
    ]


@pytest_twisted.ensureDeferred
async def test_real_huge_answer_is_not_kept(receiver_at):
    """A backend answering 200 with a 2 MB body: acknowledged (the body is read past, not kept), and the next batch goes."""
    from twisted.internet import reactor

    receiver = Receiver(answer=b"x" * (2 * 1024 * 1024))
    service = real_service(receiver_at(receiver))
    try:
        service.accepted(talk(1), "alice")
        await arrival(receiver)
        service.accepted(talk(2), "alice")
        await arrival(receiver)
        deadline = reactor.seconds() + TIMEOUT
        while service.delivered_events < 2 and reactor.seconds() < deadline:
            await task.deferLater(reactor, 0.05)
        assert service.delivered_events == 2 and service.failed_attempts == 0
    finally:
        await service.stopService()
