# -*- test-case-name: tests.test_metrics -*-
"""
The Prometheus metrics of one chatd process (docs/operations.md lists them
with suggested alerts).

Cost on the hot path: counters are plain integers in dicts, bumped with
C{+= 1} (no lock, no label lookup: one reactor thread does all the
counting), and turned into Prometheus families only when C{/metrics} is
scraped, by L{_Collector}.  Frames written, the one count made per member
per event, are counted on each connection only and summed at scrape time.  Gauges (connections, rooms, broker up) are not
kept at all: they are read from the objects that know them, at scrape time,
through the callables given to L{Metrics.watch}.  The fan-out histogram,
observed once per event delivered (not per member), is a list of bucket
counts too (prometheus-client's C{Histogram} takes a lock and several calls
per observation, a measurable share of a small room's TALK).

Labels are bounded: message types, ERROR codes, HTTP statuses and close
codes are each mapped onto a fixed set (anything else is C{other}), so a
client that sends made-up types or close codes cannot grow the label space.
No user, room or connection ever becomes a label.

Each L{Metrics} has its own C{CollectorRegistry}, not prometheus-client's
global one, so several services (and tests) can live in one process.
"""

import bisect
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

import chatd
from chatd import errors, messages

OTHER = "other"
MESSAGE_TYPES = frozenset({messages.ENTER, messages.TALK, messages.QUIT, messages.AUTH})
REJECTED_STATUSES = frozenset({
    errors.HTTP_UNAUTHORIZED, errors.HTTP_FORBIDDEN, errors.HTTP_TOO_MANY_REQUESTS,
    errors.HTTP_UNAVAILABLE,
})
# Close codes chatd sends, and the standard ones a client or Autobahn may.
CLOSE_CODES = frozenset({
    1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011,
    errors.CLOSE_TOKEN_EXPIRED, errors.CLOSE_SLOW_CONSUMER,
})
# Fan-out is a few microseconds per member to a few hundred milliseconds for
# a large room on a loaded host.
FANOUT_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)


def _bounded(value, allowed):
    return str(value) if value in allowed else OTHER


class Metrics:
    """
    What the process counts, and its C{/metrics} page.

    The C{count_*} methods are what the adapters call; they cost a dict
    update each.
    """

    def __init__(self, version=chatd.__version__, timer=time.perf_counter):
        """
        @param timer: a monotonic clock in seconds, for the fan-out timing.
        """
        self.registry = CollectorRegistry()
        self.timer = timer
        self.version = version
        self.events_sent = 0  # frames of closed connections; open ones are read at scrape time
        self.messages_received = dict.fromkeys(sorted(MESSAGE_TYPES) + [OTHER], 0)
        self.handshakes_rejected = dict.fromkeys(sorted(map(str, REJECTED_STATUSES)) + [OTHER], 0)
        self.closes = {}
        self.errors = dict.fromkeys(sorted(errors.ERROR_CODES) + [OTHER], 0)
        self.certificate_expiry = None  # seconds since the epoch, when TLS is on
        self._connections = lambda: 0
        self._rooms = lambda: 0
        self._broker_up = lambda: True
        self._webhooks = None  # the WebhookService, when [webhook] url is set
        self._sent_by_open = lambda: 0
        # chatd_fanout_seconds: observations per bucket (not cumulative; the
        # last is over the largest bound) and their sum.
        self.fanout_counts = [0] * (len(FANOUT_BUCKETS) + 1)
        self.fanout_sum = 0.0
        self.registry.register(_Collector(self))

    def watch(self, connections=None, rooms=None, broker_up=None, webhooks=None, sent_by_open=None):
        """
        Callables read at scrape time for the gauges.

        @param connections: returns the number of open WebSockets.
        @param rooms: returns the number of rooms with a local member.
        @param broker_up: returns whether the broker can serve.
        @param webhooks: the L{chatd.webhooks.WebhookService}, whose counters
            are read at scrape time (the C{chatd_webhook_*} families appear
            only with it).
        @param sent_by_open: returns the frames written to the open
            connections not yet counted with L{count_sent} (the adapter
            counts per connection, the cheapest place on the fan-out path).
        """
        if webhooks is not None:
            self._webhooks = webhooks
        if connections is not None:
            self._connections = connections
        if rooms is not None:
            self._rooms = rooms
        if broker_up is not None:
            self._broker_up = broker_up
        if sent_by_open is not None:
            self._sent_by_open = sent_by_open

    # --- the hot path -----------------------------------------------------------

    def count_received(self, kind):
        """One client message of type C{kind} (as sent; unknown ones count as other)."""
        key = kind if kind in MESSAGE_TYPES else OTHER
        self.messages_received[key] += 1

    def count_sent(self, frames=1):
        """C{frames} frames written to clients."""
        self.events_sent += frames

    def count_rejected(self, status):
        key = _bounded(status, REJECTED_STATUSES)
        self.handshakes_rejected[key] += 1

    def count_close(self, code):
        key = _bounded(code, CLOSE_CODES) if code is not None else "none"
        self.closes[key] = self.closes.get(key, 0) + 1

    def count_error(self, code):
        key = code if code in errors.ERROR_CODES else OTHER
        self.errors[key] += 1

    def timed_feed(self, deliver, local_users):
        """
        C{deliver} (the hub's feed) timed into C{chatd_fanout_seconds}: the
        hub writes to every local member before it returns.  Events for a
        room with no local member are not timed (nothing is written).

        @param local_users: C{room -> int}, the hub's count of local members.
        """
        timer = self.timer
        observe = self.observe_fanout

        def timed(delivery):
            if not local_users(delivery.event.room):
                return deliver(delivery)
            started = timer()
            try:
                return deliver(delivery)
            finally:
                observe(timer() - started)

        return timed

    def timed_burst(self, deliver_burst, local_users):
        """
        L{timed_feed} for the hub's burst feed: every event of the burst
        with a local member came off the feed at its start and was written
        to its last local member by its end, so each is observed with the
        burst's time.
        """
        timer = self.timer
        observe = self.observe_fanout

        def timed(deliveries):
            started = timer()
            try:
                return deliver_burst(deliveries)
            finally:
                took = timer() - started
                for delivery in deliveries:
                    if local_users(delivery.event.room):
                        observe(took)

        return timed

    def observe_fanout(self, seconds):
        """One fan-out took C{seconds}."""
        self.fanout_counts[bisect.bisect_left(FANOUT_BUCKETS, seconds)] += 1
        self.fanout_sum += seconds

    def fanout_started(self):
        """The time now, to hand back to L{fanout_done}."""
        return self.timer()

    def fanout_done(self, started):
        self.observe_fanout(self.timer() - started)

    # --- scraping ---------------------------------------------------------------

    def render(self):
        """
        @return: C{(body, content_type)} of the Prometheus text format.
        """
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Collector:
    """Turns L{Metrics}' plain numbers and callables into families, per scrape."""

    def __init__(self, metrics):
        self._m = metrics

    def describe(self):
        # Without describe() the registry would call collect() at register
        # time, before the gauges' callables are set.
        return []

    def collect(self):
        m = self._m
        yield GaugeMetricFamily("chatd_connections", "Open WebSocket connections.", value=m._connections())
        yield GaugeMetricFamily("chatd_rooms", "Rooms with a member on this instance.", value=m._rooms())
        yield GaugeMetricFamily(
            "chatd_broker_up", "1 while the broker (Redis, when configured) can serve.",
            value=1 if m._broker_up() else 0,
        )
        yield _counter("chatd_messages_received", "Client messages received, by type.", "type", m.messages_received)
        sent = CounterMetricFamily("chatd_events_sent", "WebSocket frames written to clients.")
        sent.add_metric([], m.events_sent + m._sent_by_open())
        yield sent
        yield _counter(
            "chatd_handshakes_rejected", "WebSocket upgrades refused, by HTTP status.", "status",
            m.handshakes_rejected,
        )
        yield _counter("chatd_closes", "WebSocket connections closed, by close code.", "code", m.closes)
        yield _counter("chatd_errors", "ERROR events sent, by code.", "code", m.errors)
        if m.certificate_expiry is not None:
            yield GaugeMetricFamily(
                "chatd_tls_certificate_expiry_timestamp_seconds",
                "When the served TLS certificate expires (seconds since the epoch).",
                value=m.certificate_expiry,
            )
        hooks = m._webhooks
        if hooks is not None:
            yield GaugeMetricFamily(
                "chatd_webhook_queued_events", "Events waiting to be sent to the webhook.",
                value=hooks.queued_events,
            )
            for name, documentation, value in (
                ("chatd_webhook_delivered_events", "Events the webhook acknowledged (2xx).", hooks.delivered_events),
                ("chatd_webhook_dropped_events", "Events dropped because the webhook queue was full.", hooks.dropped_events),
                ("chatd_webhook_dropped_batches", "Batches dropped because the webhook queue was full.", hooks.dropped_batches),
                ("chatd_webhook_failed_attempts", "Webhook POSTs without a 2xx in time (each is retried).", hooks.failed_attempts),
            ):
                family = CounterMetricFamily(name, documentation)
                family.add_metric([], value)
                yield family
        cumulative, buckets = 0, []
        for bound, count in zip(FANOUT_BUCKETS + (float("inf"),), m.fanout_counts):
            cumulative += count
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(
            "chatd_fanout_seconds",
            "Seconds from an event coming off the broker feed until written to the last local member.",
            buckets=buckets, sum_value=m.fanout_sum,
        )
        build = GaugeMetricFamily("chatd_build_info", "chatd's version; always 1.", labels=["version"])
        build.add_metric([m.version], 1)
        yield build


def _counter(name, documentation, label, values):
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def certificate_expiry(certificate):
    """
    @param certificate: a pyOpenSSL C{X509} or a cryptography certificate.
    @return: its notAfter as seconds since the epoch.
    """
    if hasattr(certificate, "to_cryptography"):
        certificate = certificate.to_cryptography()
    return certificate.not_valid_after_utc.timestamp()
