# -*- test-case-name: tests.test_web -*-
"""
chatd.web in process: the resource tree of L{chatd.web.make_site} driven
with twisted.web's C{DummyRequest}, on the embedded broker.  Every answer
but the page is JSON, failures included, and every request is finished.
tests/test_flow.py shows the same resources on a real twistd over TLS.
"""

import dataclasses
import json
import socket
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.test.requesthelper import DummyRequest

from chatd import config, errors, guard, web
from chatd.auth import TokenVerifier
from chatd.broker.memory import MemoryBroker
from chatd.errors import BrokerUnavailable, RoomLimitReached
from tests import rawws, support

SECRET = b"s" * 32


class _Boom(Exception):
    """A failure no resource expects."""


class _FailingBroker(MemoryBroker):
    """The embedded broker, whose calls fail with C{failure} when it is set."""

    failure = None

    def _call(self, name, *args):
        if self.failure is not None:
            return defer.fail(self.failure)
        return getattr(MemoryBroker, name)(self, *args)

    def list_rooms(self):
        return self._call("list_rooms")

    def issue_ticket(self, ticket, grant, ttl):
        return self._call("issue_ticket", ticket, grant, ttl)

    def is_available(self):
        if self.failure is not None:
            raise self.failure
        return True


@pytest.fixture
def clock():
    return Clock()


def make_world(clock, **overrides):
    overrides.setdefault("server__allowed_origins", ("*",))
    settings = dataclasses.replace(config.defaults(**overrides), jwt_key=SECRET)
    broker = _FailingBroker(clock, instance_id="i1")
    site = web.make_site(settings, broker, TokenVerifier.from_settings(settings), None, reactor=clock)
    return site, broker


@pytest.fixture
def world(clock):
    return make_world(clock)


@pytest.fixture
def failures(logged_failures):
    """The failures logged during the test (conftest's observer), each expected."""
    logged_failures.expect("_Boom")
    return logged_failures.events


def token(sub="alice", **claims):
    return support.mint_token(SECRET, sub, **claims)


def request(site, method, path, bearer=None, headers=()):
    """A DummyRequest for C{path}, rendered by the resource the site finds for it."""
    req = DummyRequest(path.lstrip(b"/").split(b"/"))
    req.method = method
    req.uri = path
    if bearer is not None:
        req.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + bearer.encode()])
    for name, value in headers:
        req.requestHeaders.setRawHeaders(name, [value])
    resource = site.getResourceFor(req)
    body = resource.render(req)
    if body is not server.NOT_DONE_YET:
        req.write(body)
        req.finish()
    return req


def answer(req):
    """(status, JSON body) of a finished request."""
    assert req.finished == 1
    assert req.responseHeaders.getRawHeaders(b"content-type") == [b"application/json; charset=utf-8"]
    return req.responseCode or 200, json.loads(b"".join(req.written))


def test_ticket_issued_and_redeemable(world):
    """POST /auth/ticket with a valid JWT answers a ticket the broker redeems for that user."""
    site, broker = world
    status, body = answer(request(site, b"POST", b"/auth/ticket", token("alice")))
    assert status == 200 and body["expires_in"] == 30
    grant = broker.redeem_ticket(body["ticket"]).result
    assert grant.sub == "alice"


def test_ticket_without_token_is_401(world):
    """No Bearer token: 401 JSON with a WWW-Authenticate challenge."""
    site, _ = world
    req = request(site, b"POST", b"/auth/ticket")
    assert answer(req) == (401, {"error": "invalid_token", "message": "send Authorization: Bearer <JWT>"})
    assert req.responseHeaders.getRawHeaders(b"www-authenticate")[0].startswith(b"Bearer")


def test_key_unsuited_to_the_algorithm_is_401_and_serving_goes_on(clock):
    """
    A verifier whose key PyJWT refuses for the algorithm (a PEM public key
    as the HS256 secret: config refuses it at start-up, a verifier built
    directly still holds it) answers every token 401 JSON, logs no failure,
    and the site keeps answering.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    settings = config.defaults(server__allowed_origins=("*",))
    broker = _FailingBroker(clock, instance_id="i1")
    site = web.make_site(settings, broker, TokenVerifier(pem, ["HS256"]), None, reactor=clock)
    for path in (b"/auth/ticket", b"/rooms"):
        method = b"POST" if path == b"/auth/ticket" else b"GET"
        status, body = answer(request(site, method, path, token("alice")))
        assert (status, body["error"]) == (401, "invalid_token")
    assert answer(request(site, b"GET", b"/healthz"))[0] == 200


def test_ticket_wrong_method_is_405(world):
    """GET /auth/ticket is 405 with Allow: POST."""
    site, _ = world
    req = request(site, b"GET", b"/auth/ticket", token())
    assert answer(req)[0] == 405
    assert req.responseHeaders.getRawHeaders(b"allow") == [b"POST"]


def test_rooms_listed_as_the_token_allows(world):
    """GET /rooms lists the rooms the token's rooms claim allows, with counts."""
    site, broker = world
    for room in ("lobby", "ops"):
        broker._room(room)
    status, body = answer(request(site, b"GET", b"/rooms", token(rooms=["lobby"])))
    assert status == 200 and body == {"rooms": [{"name": "lobby", "users": 0}]}


def test_rooms_broker_unavailable_is_503(world, failures):
    """The broker unavailable: 503 JSON, and nothing logged as a failure."""
    site, broker = world
    broker.failure = BrokerUnavailable("down")
    status, body = answer(request(site, b"GET", b"/rooms", token()))
    assert status == 503 and body["error"] == "unavailable"
    assert failures == []


@pytest.mark.parametrize("method,path", [(b"GET", b"/rooms"), (b"POST", b"/auth/ticket")])
def test_unexpected_broker_failure_is_500_logged_once(world, failures, method, path):
    """
    A broker failure other than "unavailable" finishes the request with 500
    JSON and logs it once (before: GET /rooms never finished).
    """
    site, broker = world
    broker.failure = _Boom("surprise")
    status, body = answer(request(site, method, path, token()))
    assert status == 500 and body == {"error": "internal", "message": "try again"}
    assert len(failures) == 1 and failures[0]["log_failure"].check(_Boom)


def test_synchronous_failure_is_500_json(world, failures):
    """An exception raised while rendering is 500 JSON too, logged once, not an HTML page."""
    site, broker = world
    broker.failure = _Boom("surprise")
    status, body = answer(request(site, b"GET", b"/healthz"))
    assert status == 500 and body["error"] == "internal"
    assert len(failures) == 1


def test_nothing_written_after_the_client_left(world, failures):
    """A client gone before the broker answers gets nothing written, and nothing fails."""
    site, broker = world
    pending = defer.Deferred()
    broker.list_rooms = lambda: pending
    req = request(site, b"GET", b"/rooms", token())
    req.processingFailed(Failure(ConnectionError("client went away")))
    pending.callback([("lobby", 1)])
    assert req.written == [] and req.finished == 0
    assert failures == []


def test_ticket_answered_when_a_slower_broker_has_stored_it(world):
    """
    A broker that stores the ticket later (Redis): the request stays open
    until then and is answered 200 with the ticket; the embedded broker's
    answer is rendered at once, with its length.
    """
    site, broker = world
    stored = defer.Deferred()
    broker.issue_ticket = lambda ticket, grant, ttl: stored
    req = request(site, b"POST", b"/auth/ticket", token("alice"))
    assert req.finished == 0 and req.written == []
    stored.callback(None)
    status, body = answer(req)
    assert status == 200 and body["expires_in"] == 30 and len(body["ticket"]) >= 32
    del broker.issue_ticket
    req = DummyRequest([b"auth", b"ticket"])
    req.method = b"POST"
    req.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + token("bob").encode()])
    body = site.getResourceFor(req).render(req)
    assert body is not server.NOT_DONE_YET and json.loads(body)["expires_in"] == 30


@settings(max_examples=500, deadline=None)
@given(
    ticket=st.text(st.characters(exclude_categories=()), max_size=60),
    ttl=st.one_of(st.integers(-(2**70), 2**70), st.booleans(), st.floats(allow_nan=False)),
)
@example(ticket="\"\\\x00\x1f\x7f\u2028\ud800é ロ", ttl=30)
def test_ticket_body_is_json_dumps(ticket, ttl):
    """
    The ticket answer's body, built directly for a text ticket and an
    integer lifetime, is exactly json.dumps of it as UTF-8, for any ticket
    text (escapes, non-ASCII, lone surrogates) and lifetime.
    """
    expected = json.dumps({"ticket": ticket, "expires_in": ttl}).encode("utf-8")
    assert web._ticket_body(ticket, ttl) == expected


def test_healthz(world):
    """/healthz is 200 with the instance id while the broker can serve."""
    site, _ = world
    assert answer(request(site, b"GET", b"/healthz")) == (200, {"status": "ok", "instance": "i1"})


def test_unknown_paths_are_404_json(world):
    """Unknown paths, at the root or under /auth, answer 404 JSON."""
    site, _ = world
    for path in (b"/nope", b"/auth/nope", b"/rooms/x/y"):
        status, body = answer(request(site, b"GET", path))
        assert (status, body["error"]) == (404, "not_found"), path


def test_page_has_its_security_headers(world):
    """/ is the HTML page with a CSP and nosniff."""
    site, _ = world
    req = request(site, b"GET", b"/")
    assert req.responseHeaders.getRawHeaders(b"content-type") == [b"text/html; charset=utf-8"]
    csp = req.responseHeaders.getRawHeaders(b"content-security-policy")[0]
    assert b"default-src 'self'" in csp and b"frame-ancestors 'none'" in csp
    assert req.responseHeaders.getRawHeaders(b"x-content-type-options") == [b"nosniff"]
    assert b"<html" in b"".join(req.written).lower()


def test_domain_refusals_answer_through_errors_http_error(world, failures):
    """A domain refusal gets the status and body errors.http_error gives it, and is not logged."""
    site, broker = world
    broker.failure = RoomLimitReached("x")
    req = request(site, b"GET", b"/rooms", token())
    assert answer(req) == errors.http_error(RoomLimitReached("x"))
    assert failures == []


# --- /ws without an upgrade (issue 8, item 12) ---------------------------------


@pytest.mark.parametrize("headers", [(), ((b"upgrade", b"h2c"),)])
def test_ws_without_upgrade_is_426_json(world, headers):
    """GET /ws that asks for no WebSocket upgrade is 426 JSON, not Autobahn's HTML banner."""
    site, _ = world
    req = request(site, b"GET", b"/ws", headers=headers)
    assert answer(req) == (426, {"error": "upgrade_required", "message": "open a WebSocket here"})
    assert req.responseHeaders.getRawHeaders(b"upgrade") == [b"websocket"]


def test_ws_other_methods_are_405_json(world):
    """POST /ws is 405 JSON with Allow: GET."""
    site, _ = world
    req = request(site, b"POST", b"/ws")
    assert answer(req) == (405, {"error": "method_not_allowed", "message": "use GET"})
    assert req.responseHeaders.getRawHeaders(b"allow") == [b"GET"]


@pytest.mark.parametrize("path", [b"/ws/x", b"/ws/x/y", b"/ws/x/"])
def test_ws_children_are_404_json(world, path):
    """Anything under /ws is 404 JSON, upgrade or not."""
    site, _ = world
    upgrade = ((b"upgrade", b"websocket"), (b"connection", b"Upgrade"))
    for headers in ((), upgrade):
        status, body = answer(request(site, b"GET", path, headers=headers))
        assert (status, body["error"]) == (404, "not_found")


# --- tickets per user (issue 8, item 10) ---------------------------------------


def test_tickets_are_rate_limited_per_user(clock):
    """
    One user gets its burst of tickets, then 429 JSON with Retry-After until
    its bucket refills; another user is not affected (before: 1170
    tickets/s from one connection).
    """
    site, _ = make_world(clock, auth__ticket_rate=2)
    alice = token("alice")
    for _ in range(web.TICKET_BURST):
        assert answer(request(site, b"POST", b"/auth/ticket", alice))[0] == 200
    req = request(site, b"POST", b"/auth/ticket", alice)
    assert answer(req) == (429, {"error": "rate_limited", "message": "too many tickets; try again shortly"})
    assert req.responseHeaders.getRawHeaders(b"retry-after") == [b"1"]
    assert req.responseMessage == b"Too Many Requests"  # twisted.web knows no phrase for 429
    assert answer(request(site, b"POST", b"/auth/ticket", token("bob")))[0] == 200
    clock.advance(0.5)  # one more token at 2/s
    assert answer(request(site, b"POST", b"/auth/ticket", alice))[0] == 200
    assert answer(request(site, b"POST", b"/auth/ticket", alice))[0] == 429


@pytest.mark.parametrize("rate", [0.7, 13])
def test_a_full_bucket_gives_the_whole_burst_at_a_wall_clock_time(clock, rate):
    """
    At a clock reading like the wall clock's (1.76e9 s, where a float's
    steps are 2.4e-7 s), a user whose bucket is full gets all
    TICKET_BURST tickets at once, then one more each 1/rate seconds, as
    limits.TokenBucket gave (before: 9 at ticket_rate 0.7 or 13, the sum
    of ten 1/rate steps rounding past the limit).
    """
    clock.advance(1764960000.37)
    site, _ = make_world(clock, auth__ticket_rate=rate)
    alice = token("alice")
    statuses = [answer(request(site, b"POST", b"/auth/ticket", alice))[0] for _ in range(web.TICKET_BURST + 1)]
    assert statuses == [200] * web.TICKET_BURST + [429]
    clock.advance(1.001 / rate)
    assert answer(request(site, b"POST", b"/auth/ticket", alice))[0] == 200
    assert answer(request(site, b"POST", b"/auth/ticket", alice))[0] == 429


def test_ticket_buckets_are_forgotten_once_full(clock):
    """Users whose buckets have refilled are not remembered: the table stays bounded."""
    site, _ = make_world(clock, auth__ticket_rate=10)
    resource = site.getResourceFor(DummyRequest([b"auth", b"ticket"]))
    for i in range(3):
        assert answer(request(site, b"POST", b"/auth/ticket", token(f"u{i}")))[0] == 200
    assert resource.rate_limited_users() == 3
    clock.advance(web.TICKET_BURST / 10)
    assert answer(request(site, b"POST", b"/auth/ticket", token("u9")))[0] == 200
    assert resource.rate_limited_users() == 1


# --- upgrades straight to the WebSocket (DirectUpgrades) ----------------------

UPGRADE = (
    b"GET /ws?ticket=t HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13"
)


@pytest.mark.parametrize("head, direct", [
    (UPGRADE, True),
    (UPGRADE.replace(b"Upgrade: websocket", b"upgrade:  WebSocket, h2c"), True),
    (UPGRADE.replace(b"/ws?ticket=t", b"/ws"), True),
    (UPGRADE.replace(b"Upgrade: websocket\r\n", b""), False),  # twisted.web: 426
    (UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: websocket\r\nUpgrade: h2c"), False),  # the last counts
    (UPGRADE.replace(b"GET", b"POST"), False),  # 405
    (UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0"), False),
    (UPGRADE.replace(b"/ws?", b"/ws/x?"), False),  # 404
    (UPGRADE.replace(b"/ws?", b"/w%73?"), False),  # twisted.web's to decode
    (UPGRADE.replace(b"/ws?", b"/echo?"), False),  # not a route here
    (UPGRADE.replace(b"GET /ws", b"GET  /ws"), False),
    (UPGRADE.replace(b"Host: localhost", b"Host localhost"), False),  # twisted.web: 400
    (UPGRADE.replace(b"Host: localhost", b"Host: local\x00host"), False),
    (UPGRADE.replace(b"\r\nConnection", b"\r\n continued\r\nConnection"), False),
    (UPGRADE + b"\r\nContent-Length: 5", False),  # a body is twisted.web's to read
    (UPGRADE + b"\r\nTransfer-Encoding: chunked", False),
    (UPGRADE + b"\r\nExpect: 100-continue", False),
    (UPGRADE + b"\r\nX-Big: " + b"x" * 16384, False),  # twisted.web: 400 or 431
])
def test_upgrade_route_takes_only_what_the_endpoint_would_upgrade(head, direct):
    """
    Only a well-formed GET upgrade of exactly a route's path goes straight
    to its factory; everything else stays twisted.web's, to answer as before.
    """
    factory = object()
    assert (web.upgrade_route(head, {b"/ws": factory}) is factory) == direct


class _Recorder(Protocol):
    """What a WebSocket factory's protocol was given."""

    def __init__(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data


def direct_connection(site, pieces):
    """
    A connection to L{web.DirectUpgrades} around C{site} (with a recording
    /ws factory) behind a wrapper, as TLS or the guard wraps it; C{pieces}
    arrive one by one.

    @return: the protocol serving the connection in the end, and the transport.
    """
    factory = web.DirectUpgrades(site, {b"/ws": Factory.forProtocol(_Recorder)})
    wrapper = WrappingFactory(factory).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    wrapper.makeConnection(transport)
    for piece in pieces:
        wrapper.dataReceived(piece)
    return wrapper.wrappedProtocol, transport


def test_direct_upgrade_reaches_the_websocket_protocol_whole(world):
    """
    An upgrade arriving in pieces goes to the WebSocket factory's protocol
    with every byte (frames sent right behind it included), and twisted.web
    never sees it: nothing was answered.
    """
    site, _ = world
    request = UPGRADE + b"\r\n\r\n\x81\x80"
    pieces = [request[:10], request[10:60], request[60:-4], request[-4:-3], request[-3:]]
    served, transport = direct_connection(site, pieces)
    assert isinstance(served, _Recorder)
    assert served.received == request
    assert served.transport is not None and transport.value() == b""


@pytest.mark.parametrize("pieces", [
    [b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"],
    [b"GET /w", b"s HTTP/1.1\r\nHost: x\r\n", b"\r\n"],
])
def test_ws_without_upgrade_still_answers_426_through_the_site(world, pieces):
    """A first request that is not an upgrade is the Site's: /ws answers 426 JSON as before."""
    site, _ = world
    served, transport = direct_connection(site, pieces)
    assert isinstance(served, guard.HeaderLimitChannel)
    assert transport.value().startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b'"upgrade_required"' in transport.value() and b"Server: chatd" in transport.value()


def test_other_requests_go_to_the_site_at_their_first_byte(world):
    """A request that cannot be an upgrade is handed over before its head is complete."""
    site, _ = world
    served, transport = direct_connection(site, [b"POST /auth/ticket HT"])
    assert isinstance(served, guard.HeaderLimitChannel)
    served, transport = direct_connection(site, [b"GET /healthz HTTP/1.1\r\n\r\n"])
    assert b'"status": "ok"' in transport.value()


def test_unix_socket_connections_are_the_sites_from_the_start(world):
    """
    Without peer ports the guard sets no deadline; the Site's channel is
    built at once, so twisted.web's idle timeout runs from accept as before.
    """
    site, _ = world
    factory = web.DirectUpgrades(site, {b"/ws": Factory.forProtocol(_Recorder)})
    assert isinstance(factory.buildProtocol(UNIXAddress("/run/chatd.sock")), guard.HeaderLimitChannel)
    assert not isinstance(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1)), guard.HeaderLimitChannel)


def test_an_oversized_first_head_is_the_sites_to_refuse(world):
    """A head over twisted.web's limit, still incomplete, is handed over and answered 431 as before."""
    site, _ = world
    served, transport = direct_connection(site, [UPGRADE + b"\r\nX-Big: " + b"x" * 17000])
    assert isinstance(served, guard.HeaderLimitChannel)
    assert transport.value().startswith(b"HTTP/1.1 431 ")


# --- on a real twistd (issue 8, items 12 and 13) -------------------------------


def test_headers_on_a_real_twistd(start_chatd):
    """
    Over TLS: Server is "chatd" (no Twisted or Autobahn version) on HTTP
    answers and on the upgrade; HSTS is sent; /ws without an upgrade is 426
    JSON and /ws/x 404 JSON.
    """
    server = start_chatd()
    status, headers, _ = support.http("GET", server.base + "/healthz")
    assert status == 200 and headers.get_all("server") == ["chatd"]
    assert headers["strict-transport-security"].startswith("max-age=")
    status, headers, body = support.http("GET", server.base + "/ws")
    assert (status, body["error"]) == (426, "upgrade_required") and headers["server"] == "chatd"
    status, _, body = support.http("GET", server.base + "/ws/anything")
    assert (status, body["error"]) == (404, "not_found")
    raw = rawws.RawWebSocket(server.port)
    try:
        status, head = raw.upgrade("/ws?ticket=" + server.ticket("alice"))
    finally:
        raw.close()
    assert status == 101 and b"\r\nServer: chatd\r\n" in head
    assert b"autobahn" not in head.lower() and b"twisted" not in head.lower()


def test_no_hsts_behind_a_proxy(start_chatd):
    """With tls = off (a TLS proxy in front), HSTS is the proxy's to send."""
    server = start_chatd(server__tls="off")
    status, headers, _ = support.http("GET", server.base + "/healthz")
    assert status == 200 and "strict-transport-security" not in headers
    assert headers["server"] == "chatd"


def test_upgrade_after_keep_alive_requests_on_a_real_twistd(start_chatd):
    """
    A connection whose first request is not an upgrade stays twisted.web's;
    an upgrade on it later still opens the WebSocket (through the Site's
    /ws endpoint), WELCOME included.
    """
    server = start_chatd()
    raw = rawws.RawWebSocket(server.port)
    try:
        raw.send_raw(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = raw._read_until(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert head.startswith(b"HTTP/1.1 200 ") and b'"ok"' in raw._read_exactly(length, time.monotonic() + 10)
        status, head = raw.upgrade("/ws?ticket=" + server.ticket("alice"))
        assert status == 101 and b"\r\nServer: chatd\r\n" in head
        assert raw.recv_json()["type"] == "WELCOME"
    finally:
        raw.close()


def test_alpn_offer_gets_http_1_1_on_a_real_twistd(start_chatd):
    """
    A client offering ALPN (as browsers do: h2, http/1.1) is answered
    http/1.1 and served; Twisted's TLS asks the factory inside it, which
    is L{web.DirectUpgrades} now (it answered nothing at first, and the
    handshake failed with an internal error alert).
    """
    server = start_chatd()
    context = support.client_tls()
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=support.RECV_TIMEOUT) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert tls.recv(100).startswith(b"HTTP/1.1 200 ")
