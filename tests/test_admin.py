# -*- test-case-name: tests.test_admin -*-
"""
chatd.admin: the admin Site answering raw HTTP requests over an in-memory
transport: /metrics, /livez, /readyz and the JSON 404/405.
"""

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from chatd import admin
from chatd.metrics import Metrics


def request(site, raw):
    """Feed one raw request to a fresh connection; (status, headers, body)."""
    protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
    protocol.makeConnection(transport)
    protocol.dataReceived(raw)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    protocol.connectionLost(None)
    return status, headers, body


def get(site, path):
    return request(site, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())


@pytest.fixture
def state():
    return {"ready": admin.READY}


@pytest.fixture
def site(state):
    m = Metrics()
    m.watch(connections=lambda: 2)
    return admin.make_admin_site(m, lambda: state["ready"])


def test_metrics_page(site):
    """GET /metrics is Prometheus text with the live gauge values."""
    status, headers, body = get(site, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    assert b"\nchatd_connections 2.0\n" in body


def test_livez(site):
    """GET /livez answers 200 while the reactor runs."""
    status, _, body = get(site, "/livez")
    assert (status, json.loads(body)) == (200, {"status": "alive"})


@pytest.mark.parametrize("state_now, code", [
    (admin.READY, 200), (admin.DRAINING, 503), (admin.UNAVAILABLE, 503),
])
def test_readyz_follows_the_state(site, state, state_now, code):
    """GET /readyz is 200 only when ready, else 503 naming the state."""
    state["ready"] = state_now
    status, _, body = get(site, "/readyz")
    assert (status, json.loads(body)) == (code, {"status": state_now})


def test_unknown_path_and_method(site):
    """Other paths are a JSON 404; other methods a JSON 405 with Allow."""
    status, _, body = get(site, "/nope")
    assert status == 404 and json.loads(body)["error"] == "not_found"
    status, _, body = get(site, "/metrics/extra")
    assert status == 404
    status, headers, body = request(site, b"POST /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET, HEAD"


def test_server_api_on_the_admin_listener(state):
    """With the server API on, /api/ is served here too, keys checked; without it, /api/ is a 404."""
    from chatd.api import ApiResource

    class Rooms:
        def list_rooms(self):
            return [("lobby", 3)]

    key = "k" * 32
    site = admin.make_admin_site(Metrics(), lambda: state["ready"], ApiResource([key], Rooms(), 4000, 500))
    # HTTP/1.0: the API answers later (NOT_DONE_YET), which 1.1 would chunk.
    raw = f"GET /api/rooms HTTP/1.0\r\nHost: x\r\nX-API-Key: {key}\r\n\r\n"
    status, _, body = request(site, raw.encode())
    assert (status, json.loads(body)) == (200, {"rooms": [{"name": "lobby", "users": 3}]})
    status, _, body = get(site, "/api/rooms")
    assert (status, json.loads(body)["error"]) == (401, "invalid_key")
    status, _, _ = get(admin.make_admin_site(Metrics(), lambda: state["ready"]), "/api/rooms")
    assert status == 404
