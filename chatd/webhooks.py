# -*- test-case-name: tests.test_webhooks -*-
"""
Outgoing webhooks: room events POSTed, signed and batched, to the
application's backend.

The instance that accepted an event (the one whose client or API call caused
it) hands it to L{WebhookService.accepted}, so each event is sent by exactly
one instance.  Delivery is at least once: a batch that gets no 2xx within
C{[webhook] timeout} seconds is sent again, with the same body and the same
C{X-Chatd-Delivery} id, after a backoff (Twisted's C{backoffPolicy}).  One
batch is in flight at a time, so events reach the backend in the order they
were accepted (room order within a batch, and across batches).

Chat never waits for the webhook: L{WebhookService.accepted} only appends to
a bounded queue.  When a new event would make it hold more than C{[webhook]
max_queue} events, the oldest batch (the one being retried, while the
backend is down) is dropped, counted and logged.

docs/api.md is the contract for backend authors.
"""

import hashlib
import hmac
import io
import json
import uuid
from collections import deque

from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from zope.interface import Interface, implementer

from chatd.broker.interfaces import IBroker
from chatd.logs import redact, redact_uri

log = Logger()

SIGNATURE_HEADER = "X-Chatd-Signature"
DELIVERY_HEADER = "X-Chatd-Delivery"
MAX_BATCH_EVENTS = 100  # events in one POST
MAX_RESPONSE_BYTES = 64 * 1024  # read from an answer, then the rest is dropped


def sign(secret, body):
    """
    The C{X-Chatd-Signature} value of C{body}: C{sha256=} and the hex
    HMAC-SHA256 of the exact bytes with the secret.
    """
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret, body, signature):
    """Whether C{signature} (the header's value) is C{body}'s, compared in constant time."""
    if not isinstance(signature, str):
        return False
    return hmac.compare_digest(sign(secret, body).encode("ascii"), signature.encode("ascii", "replace"))


def event_body(event, sub):
    """One event as the backend sees it: the wire form clients get, plus the sender's C{sub}."""
    wire = event.to_wire()
    wire["sub"] = sub
    return wire


class IWebhookClient(Interface):
    """The one HTTP call the webhook service makes; injected so tests need no network."""

    def post(url, body, headers):
        """
        POST C{body} (bytes) to C{url} with C{headers} (a dict of str).

        @return: a Deferred firing with the response status code once the
            answer is read; cancelling it aborts the request.
        """


class _Discard(Protocol):
    """Reads an answer's body (so the connection can be reused) up to a cap, keeping none of it."""

    def __init__(self, done):
        self._done = done
        self._seen = 0

    def dataReceived(self, data):
        self._seen += len(data)
        if self._seen > MAX_RESPONSE_BYTES:
            self.transport.stopProducing()

    def connectionLost(self, reason):
        self._done.callback(None)


@implementer(IWebhookClient)
class AgentClient:
    """
    L{IWebhookClient} over Twisted's C{Agent}.  Certificates are verified
    (C{BrowserLikePolicyForHTTPS}: the system's trust roots and the URL's
    host name), unless C{tls_policy} names other trust roots.
    """

    def __init__(self, reactor, tls_policy=None):
        # A new connection per batch: a backend (or a proxy in front) that
        # closes idle keep-alive connections would otherwise fail the next
        # POST on a reused one, and Twisted retries only idempotent requests.
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self._agent = Agent(reactor, contextFactory=tls_policy or BrowserLikePolicyForHTTPS(), pool=self._pool)

    def post(self, url, body, headers):
        """IWebhookClient API"""
        raw = Headers({name.encode("ascii"): [value.encode("ascii")] for name, value in headers.items()})
        d = self._agent.request(b"POST", url.encode("ascii"), raw, FileBodyProducer(io.BytesIO(body)))

        def read(response):
            done = defer.Deferred()
            response.deliverBody(_Discard(done))
            return done.addCallback(lambda _: response.code)

        return d.addCallback(read)

    def close(self):
        """Close the kept-alive connections (on stop)."""
        return self._pool.closeCachedConnections()


class _Batch:
    """Events sent together, under one delivery id, until some answer is a 2xx."""

    def __init__(self, delivery_id):
        self.delivery_id = delivery_id
        self.events = []
        self.body = None  # fixed when first sent, so a retry sends the same bytes
        self.attempts = 0
        self.dropped = False

    def seal(self):
        if self.body is None:
            self.body = json.dumps({"events": self.events}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        return self.body


class WebhookService(Service):
    """
    Queues accepted room events and POSTs them in batches, one batch at a
    time, retrying each until a 2xx.

    @ivar delivered_events: events the backend acknowledged.
    @ivar dropped_events: events dropped because the queue was full.
    @ivar dropped_batches: batches dropped because the queue was full.
    @ivar failed_attempts: POSTs that got no 2xx in time.
    """

    def __init__(self, url, secret, clock, client, events=frozenset({"talk"}), timeout=10.0,
                 max_queue=10000, backoff=None, new_delivery_id=None, max_batch=MAX_BATCH_EVENTS):
        """
        @param url: where to POST.
        @param secret: the HMAC key (bytes).
        @param clock: an C{IReactorTime} for timeouts and backoff.
        @param client: an L{IWebhookClient}.
        @param events: which event types to send, lower case.
        @param timeout: seconds an attempt may take.
        @param max_queue: events held at most, the one in flight included.
        @param backoff: C{failures before this one -> seconds} before a retry
            (Twisted's C{backoffPolicy}: 1 s, doubling up to 60 s, plus jitter).
        @param new_delivery_id: C{() -> str}, unique per batch.
        """
        self._url = url
        self._secret = secret
        self._clock = clock
        self._client = client
        self._kinds = frozenset(kind.upper() for kind in events)
        self._timeout = timeout
        self._max_queue = max_queue
        self._max_batch = max(1, min(max_batch, max_queue))
        self._backoff = backoff or backoffPolicy(initialDelay=1.0, maxDelay=60.0, factor=2.0)
        self._new_delivery_id = new_delivery_id or (lambda: uuid.uuid4().hex)
        self._queue = deque()  # of _Batch, oldest first; the head may be in flight
        self._queued_events = 0
        self._in_flight = None  # the Deferred of the attempt under way
        self._retry = None  # the DelayedCall of the next attempt
        self._sending = None  # the _Batch being sent or waiting for its retry
        self._flushing = None  # while stopping: fires once the queue is sent (or a try failed)
        self.delivered_events = 0
        self.dropped_events = 0
        self.dropped_batches = 0
        self.failed_attempts = 0

    @classmethod
    def from_settings(cls, settings, reactor, client=None):
        """The service for C{[webhook]}, or L{None} when no url is set."""
        hook = settings.webhook
        if not hook.url:
            return None
        return cls(
            hook.url, settings.webhook_secret, reactor, client or AgentClient(reactor),
            events=hook.events, timeout=hook.timeout, max_queue=hook.max_queue,
        )

    @property
    def queued_events(self):
        """Events accepted and not yet acknowledged or dropped."""
        return self._queued_events

    def wants(self, kind):
        """Whether events of type C{kind} (C{"TALK"}, ...) are sent at all."""
        return kind in self._kinds

    def accepted(self, event, sub):
        """
        Queue C{event} (a L{chatd.messages.RoomEvent} this instance accepted)
        with its sender's C{sub}; never blocks and never fails.
        """
        if event.type not in self._kinds:
            return
        tail = self._queue[-1] if self._queue else None
        if tail is None or tail.body is not None or len(tail.events) >= self._max_batch:
            tail = _Batch(self._new_delivery_id())
            self._queue.append(tail)
        tail.events.append(event_body(event, sub))
        self._queued_events += 1
        while self._queued_events > self._max_queue:
            self._drop_oldest()
        self._next()

    def _drop_oldest(self):
        batch = self._queue.popleft()
        batch.dropped = True
        self._queued_events -= len(batch.events)
        self.dropped_events += len(batch.events)
        self.dropped_batches += 1
        log.warn(
            "webhook queue full ({limit} events): dropped batch {delivery} of {count} events"
            " after {attempts} attempts",
            limit=self._max_queue, delivery=batch.delivery_id, count=len(batch.events),
            attempts=batch.attempts,
        )
        if batch is self._sending and self._retry is not None:
            # Waiting for a retry that will not happen: go on with the next.
            self._retry.cancel()
            self._retry = None
            self._sending = None

    def _next(self):
        if self._sending is not None:
            return
        if not self._queue:
            if self._flushing is not None:
                self._flushing.callback(None)
            return
        if self.running or self._flushing is not None:
            self._sending = self._queue[0]
            self._attempt(self._sending)

    def _attempt(self, batch):
        self._retry = None
        batch.attempts += 1
        body = batch.seal()
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            SIGNATURE_HEADER: sign(self._secret, body),
            DELIVERY_HEADER: batch.delivery_id,
            "User-Agent": "chatd-webhook",
        }
        d = defer.maybeDeferred(self._client.post, self._url, body, headers)
        # Whatever cancelling the request fails with (Agent: ResponseNeverReceived), it timed out.
        d.addTimeout(self._timeout, self._clock, onTimeoutCancel=self._timed_out)
        self._in_flight = d
        d.addCallbacks(self._answered, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))
        d.addErrback(self._bug)

    @staticmethod
    def _timed_out(result, timeout):
        return Failure(defer.TimeoutError(f"no answer in {timeout}s"))

    def _answered(self, status, batch):
        self._in_flight = None
        if not 200 <= status < 300:
            return self._failed(Failure(_Refused(status)), batch)
        if not batch.dropped:
            self._queue.popleft()
            self._queued_events -= len(batch.events)
            self.delivered_events += len(batch.events)
        self._sending = None
        self._next()

    def _failed(self, failure, batch):
        self._in_flight = None
        if failure.check(defer.CancelledError) and not self.running:
            return  # stopped
        self.failed_attempts += 1
        why = _why(failure)
        if self._flushing is not None:
            # Shutting down: no retries; what is left is logged as lost.
            self._sending = None
            self._flushing.callback(None)
            return
        if batch.dropped or not self.running:
            self._sending = None
            self._next()
            return
        delay = self._backoff(batch.attempts - 1)
        log.warn(
            "webhook {url} delivery {delivery} attempt {attempts} failed ({why}); retry in {delay}s",
            url=redact_uri(self._url), delivery=batch.delivery_id, attempts=batch.attempts,
            why=redact(why), delay=round(delay, 2),
        )
        self._retry = self._clock.callLater(delay, self._attempt, batch)

    def _bug(self, failure):
        log.failure("webhook delivery bookkeeping failed", failure)

    def startService(self):
        super().startService()
        self._next()

    def stopService(self):
        """
        Send what is queued, one attempt per batch and at most C{timeout}
        seconds in all, then stop: an attempt still under way is cancelled
        and what is left is logged as lost (the process is going away).
        """
        super().stopService()
        if not self._queue:
            return self._stopped(None)
        self._flushing = defer.Deferred()
        flushed = self._flushing
        flushed.addTimeout(self._timeout, self._clock)
        if self._retry is not None:
            self._retry.cancel()
            self._attempt(self._sending)  # its retry, now
        else:
            self._next()
        return flushed.addBoth(self._stopped)

    def _stopped(self, _):
        self._flushing = None
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._in_flight is not None:
            self._in_flight.cancel()
        self._sending = None
        if self._queued_events:
            log.warn(
                "webhook: {count} events not delivered at shutdown", count=self._queued_events
            )
        close = getattr(self._client, "close", None)
        return close() if close is not None else None


SYSTEM_SUB = "system"  # the "sub" of a server API publish


@implementer(IBroker)
class AcceptingBroker:
    """
    The broker as this instance's hub and server API use it: every event
    their calls produce (ENTER, TALK, QUIT, a publish) was accepted by this
    instance, so this instance, and no other, hands it to the webhook.
    Everything else passes through to C{broker}.
    """

    def __init__(self, broker, webhooks):
        self._broker = broker
        self._webhooks = webhooks
        broker.set_own_events(webhooks.accepted)  # reaped QUITs and the like: ours too

    def __getattr__(self, name):
        return getattr(self._broker, name)

    def enter(self, room, member, since=None, ref=None):
        """IBroker API"""
        d = defer.maybeDeferred(self._broker.enter, room, member, since, ref)
        return d.addCallback(self._report, member.sub, lambda entered: entered.event)

    def talk(self, room, member, text, cid=None, ref=None):
        """IBroker API"""
        d = defer.maybeDeferred(self._broker.talk, room, member, text, cid, ref)
        return d.addCallback(self._report, member.sub, lambda talked: None if talked.duplicate else talked.event)

    def quit(self, room, member, ref=None):
        """IBroker API"""
        d = defer.maybeDeferred(self._broker.quit, room, member, ref)
        return d.addCallback(self._report, member.sub, lambda event: event)

    def publish(self, room, sender, text, cid=None):
        """IBroker API"""
        d = defer.maybeDeferred(self._broker.publish, room, sender, text, cid)
        return d.addCallback(self._report, SYSTEM_SUB, lambda talked: None if talked.duplicate else talked.event)

    def _report(self, result, sub, event_of):
        event = event_of(result)
        if event is not None:
            self._webhooks.accepted(event, sub)
        return result


def _why(failure):
    """A short reason for a failed attempt; Agent wraps the real ones in a list."""
    reasons = getattr(failure.value, "reasons", None)
    if isinstance(reasons, list) and reasons:
        return "; ".join(_why(reason) for reason in reasons if isinstance(reason, Failure))
    return failure.getErrorMessage() or failure.type.__name__


class _Refused(Exception):
    """The backend answered with a status other than 2xx."""

    def __init__(self, status):
        super().__init__(f"HTTP {status}")
        self.status = status
