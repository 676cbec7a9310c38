# -*- test-case-name: tests.test_metrics -*-
"""
chatd.metrics: the counters and gauges as a Prometheus scrape reads them
(parsed back with prometheus-client's own parser), bounded labels, and one
registry per Metrics.
"""

import os
import time

from cryptography import x509
from OpenSSL import crypto
from prometheus_client.parser import text_string_to_metric_families

import chatd
from chatd import metrics as metrics_module
from chatd.metrics import Metrics


def scrape(metrics):
    """{sample name: {frozenset(labels): value}} of one render."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def test_every_metric_of_the_contract_is_exposed():
    """Each name the issue fixes appears in a scrape of a fresh Metrics."""
    m = Metrics()
    m.certificate_expiry = 2_000_000_000.0
    names = set(scrape(m))
    for name in (
        "chatd_connections", "chatd_rooms", "chatd_messages_received_total",
        "chatd_events_sent_total", "chatd_handshakes_rejected_total", "chatd_errors_total",
        "chatd_broker_up", "chatd_fanout_seconds_bucket", "chatd_fanout_seconds_count",
        "chatd_tls_certificate_expiry_timestamp_seconds", "chatd_build_info",
    ):
        assert name in names, name


def test_counts_and_gauges():
    """Counted events and the watched gauges show up with their values."""
    m = Metrics()
    m.watch(connections=lambda: 7, rooms=lambda: 3, broker_up=lambda: False)
    for kind in ("TALK", "TALK", "ENTER"):
        m.count_received(kind)
    m.count_sent(5)
    m.count_rejected(401)
    m.count_close(1001)
    m.count_error("rate_limited")
    s = scrape(m)
    assert s["chatd_connections"][frozenset()] == 7
    assert s["chatd_rooms"][frozenset()] == 3
    assert s["chatd_broker_up"][frozenset()] == 0
    assert s["chatd_messages_received_total"][frozenset({("type", "TALK")})] == 2
    assert s["chatd_messages_received_total"][frozenset({("type", "ENTER")})] == 1
    assert s["chatd_events_sent_total"][frozenset()] == 5
    assert s["chatd_handshakes_rejected_total"][frozenset({("status", "401")})] == 1
    assert s["chatd_closes_total"][frozenset({("code", "1001")})] == 1
    assert s["chatd_errors_total"][frozenset({("code", "rate_limited")})] == 1
    assert s["chatd_build_info"][frozenset({("version", chatd.__version__)})] == 1
    assert "chatd_tls_certificate_expiry_timestamp_seconds" not in s  # tls off


def test_frames_of_open_connections_are_read_at_scrape_time():
    """chatd_events_sent_total: closed connections' counts plus what the open ones report now."""
    m = Metrics()
    open_frames = [4]
    m.watch(sent_by_open=lambda: open_frames[0])
    m.count_sent(10)  # a connection that closed
    assert scrape(m)["chatd_events_sent_total"][frozenset()] == 14
    open_frames[0] = 6
    assert scrape(m)["chatd_events_sent_total"][frozenset()] == 16


def test_labels_are_bounded():
    """Made-up types, statuses, codes and close codes all count as 'other'."""
    m = Metrics()
    for i in range(100):
        m.count_received(f"X{i}")
        m.count_close(3000 + i)
        m.count_error(f"e{i}")
        m.count_rejected(400 + i % 3)
    s = scrape(m)
    assert s["chatd_messages_received_total"][frozenset({("type", "other")})] == 100
    assert s["chatd_closes_total"] == {frozenset({("code", "other")}): 100}
    assert s["chatd_errors_total"][frozenset({("code", "other")})] == 100
    assert len(s["chatd_messages_received_total"]) == 5
    assert len(s["chatd_handshakes_rejected_total"]) == 5


def test_fanout_histogram_uses_the_given_timer():
    """fanout_started/done observe the timer's difference once."""
    now = [10.0]
    m = Metrics(timer=lambda: now[0])
    started = m.fanout_started()
    now[0] += 0.003
    m.fanout_done(started)
    s = scrape(m)
    assert s["chatd_fanout_seconds_count"][frozenset()] == 1
    assert abs(s["chatd_fanout_seconds_sum"][frozenset()] - 0.003) < 1e-9
    assert s["chatd_fanout_seconds_bucket"][frozenset({("le", "0.0025")})] == 0
    assert s["chatd_fanout_seconds_bucket"][frozenset({("le", "0.005")})] == 1


def test_a_burst_is_timed_once_per_event_with_local_members():
    """
    timed_burst observes the burst's time for each of its events whose room
    has a local member, and hands the burst on whole.
    """
    from chatd.broker.interfaces import Delivery

    now = [10.0]
    m = Metrics(timer=lambda: now[0])
    handed = []

    def deliver_burst(deliveries):
        handed.append(deliveries)
        now[0] += 0.004

    burst = [Delivery(_event(room), "i:1", None) for room in ("lobby", "empty", "lobby")]
    m.timed_burst(deliver_burst, lambda room: room == "lobby")(burst)
    assert handed == [burst]
    s = scrape(m)
    assert s["chatd_fanout_seconds_count"][frozenset()] == 2
    assert abs(s["chatd_fanout_seconds_sum"][frozenset()] - 0.008) < 1e-9


def _event(room):
    from chatd.messages import RoomEvent

    return RoomEvent(type="TALK", id="1-1", room=room, sender="A", message="hi", user_count=1, ts=0)


def test_registries_are_separate():
    """Two Metrics in one process count apart (no global registry)."""
    a, b = Metrics(), Metrics()
    a.count_sent(3)
    assert scrape(a)["chatd_events_sent_total"][frozenset()] == 3
    assert scrape(b)["chatd_events_sent_total"][frozenset()] == 0


def test_certificate_expiry_from_a_certificate(dev_dir):
    """notAfter of the dev certificate becomes seconds since the epoch."""
    with open(os.path.join(dev_dir[0], "fullchain.pem"), "rb") as f:
        pem = f.read()
    cert = x509.load_pem_x509_certificate(pem)
    expected = cert.not_valid_after_utc.timestamp()
    assert metrics_module.certificate_expiry(cert) == expected
    assert metrics_module.certificate_expiry(crypto.load_certificate(crypto.FILETYPE_PEM, pem)) == expected
    assert expected > time.time()


def test_webhook_counters():
    """With a webhook service watched, its queue and counters are scraped; without, no family appears."""
    assert not any(name.startswith("chatd_webhook") for name in scrape(Metrics()))

    class Hooks:
        queued_events, delivered_events, dropped_events, dropped_batches, failed_attempts = 4, 90, 6, 2, 11

    m = Metrics()
    m.watch(webhooks=Hooks())
    s = scrape(m)
    assert s["chatd_webhook_queued_events"][frozenset()] == 4
    assert s["chatd_webhook_delivered_events_total"][frozenset()] == 90
    assert s["chatd_webhook_dropped_events_total"][frozenset()] == 6
    assert s["chatd_webhook_dropped_batches_total"][frozenset()] == 2
    assert s["chatd_webhook_failed_attempts_total"][frozenset()] == 11
