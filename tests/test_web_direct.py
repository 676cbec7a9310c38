# -*- test-case-name: tests.test_web_direct -*-
"""
L{chatd.web.ChatChannel}'s direct answer to C{POST /auth/ticket} against
twisted.web's: the same generated requests go to two listeners built alike
(guard, L{chatd.web.DirectUpgrades}, Site, embedded broker, each on its own
clock at the same time), one with the direct path and one without, over
memory transports; every byte answered, every access log line, every
deadline and connection close must be the same, but for the ticket values
and the Date.
"""

import dataclasses
import ipaddress
import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web import http

from chatd import config, guard, web
from chatd.auth import TokenVerifier
from chatd.broker.memory import MemoryBroker
from chatd.errors import BrokerUnavailable
from chatd.proxies import TrustedProxies
from tests import support

SECRET = b"s" * 32
OTHER_SECRET = b"o" * 32
START = 1_700_000_000.0
ALLOWED = "https://chat.example.com"


class _Broker(MemoryBroker):
    """The embedded broker, whose ticket store can also fail or answer later."""

    mode = "now"

    def __init__(self, clock):
        super().__init__(clock, instance_id="i1")
        self.later = []

    def issue_ticket(self, ticket, grant, ttl):
        if self.mode == "raises":
            raise BrokerUnavailable("the store is down")
        if self.mode == "fails":
            return defer.fail(BrokerUnavailable("the store is down"))
        stored = super().issue_ticket(ticket, grant, ttl)
        if self.mode == "later":
            waiting = defer.Deferred()
            self.later.append(waiting)
            return waiting
        return stored

    def store_now(self):
        """Fire every ticket store answered later."""
        later, self.later = self.later, []
        for waiting in later:
            waiting.callback(None)


class _Recorder(Protocol):
    """A /ws factory's protocol: nothing here upgrades."""


class _Side:
    """One listener: the direct path on or off."""

    def __init__(self, direct, hsts, access_log, broker_mode):
        self.clock = Clock()
        self.clock.advance(START)
        settings_ = dataclasses.replace(
            config.defaults(
                server__allowed_origins=(ALLOWED,), server__access_log=access_log,
                auth__ticket_rate=0.5,
            ),
            jwt_key=SECRET,
        )
        self.broker = _Broker(self.clock)
        self.broker.mode = broker_mode
        self.guard = guard.ConnectionGuard.from_settings(settings_, self.clock)
        self.site = web.make_site(
            settings_, self.broker, TokenVerifier.from_settings(settings_), None,
            request_factory=self.guard.guard_requests(web.ChatRequest), reactor=self.clock,
            proxies=TrustedProxies([ipaddress.ip_network("127.0.0.0/8")]),
        )
        self.site.hsts = hsts
        if not direct:
            self.site.ticket_resource = None
        routes = {b"/ws": Factory.forProtocol(_Recorder)}
        self.listening = self.guard.wrap(web.DirectUpgrades(self.site, routes))
        self.ports = iter(range(40000, 50000))

    def connect(self):
        port = next(self.ports)
        address = IPv4Address("TCP", "127.0.0.1", port)
        protocol = self.listening.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def deadlines(self):
        return sorted(call.getTime() for call in self.clock.getDelayedCalls())


_TICKET = re.compile(rb'"ticket": "[A-Za-z0-9_-]{32}"')
_DATE = re.compile(rb"\r\nDate: [A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT\r\n")


def _normal(answer):
    """An answer with its ticket values and Date (checked for form) made alike."""
    return _DATE.sub(b"\r\nDate: -\r\n", _TICKET.sub(b'"ticket": "-"', answer))


def _tickets(answer):
    return [m.group()[11:-1].decode() for m in _TICKET.finditer(answer)]


class _Log:
    """The access log lines of one side's step."""

    def __init__(self):
        self.lines = []

    def __call__(self, event):
        if event.get("log_format") == "{peer} {method} {path} {status} {size}":
            self.lines.append(tuple(event[k] for k in ("peer", "method", "path", "status", "size")))


def _exchange(side, reads, fire_after):
    """Send C{reads} on a new connection of C{side}; what was answered and logged after each."""
    log = _Log()
    globalLogPublisher.addObserver(log)
    try:
        protocol, transport = side.connect()
        seen = []
        for data, fire in zip(reads, fire_after):
            if not transport.disconnecting:
                protocol.dataReceived(data)
            if fire:
                side.broker.store_now()
            side.clock.advance(1)  # so that a deadline re-armed shows
            seen.append((transport.value(), transport.disconnecting, side.deadlines(), list(log.lines)))
        side.broker.store_now()
        seen.append((transport.value(), transport.disconnecting, side.deadlines(), list(log.lines)))
        protocol.connectionLost(Failure(ConnectionDone()))
        seen.append((side.deadlines(),))
        return seen, transport.value()
    finally:
        globalLogPublisher.removeObserver(log)


def _valid():
    return support.mint_token(SECRET, "alice")


AUTHORIZATIONS = {
    "valid": lambda: [b"Authorization: Bearer " + _valid().encode()],
    "bob": lambda: [b"Authorization: Bearer " + support.mint_token(SECRET, "bob").encode()],
    "lower-scheme": lambda: [b"authorization: bearer " + _valid().encode()],
    "expired": lambda: [b"Authorization: Bearer " + support.mint_token(SECRET, "alice", ttl=-60).encode()],
    "bad-signature": lambda: [b"Authorization: Bearer " + support.mint_token(OTHER_SECRET, "alice").encode()],
    "garbage": lambda: [b"Authorization: Bearer not.a.jwt"],
    "empty": lambda: [b"Authorization: Bearer  "],
    "basic": lambda: [b"Authorization: Basic YWxpY2U6eA=="],
    "missing": lambda: [],
    "twice": lambda: [b"Authorization: Bearer x.y.z", b"AUTHORIZATION: Bearer " + _valid().encode()],
}

EXTRA = [
    b"Host: chat.example.com",
    b"Origin: " + ALLOWED.encode(),
    b"Origin: https://evil.example",
    b"X-Forwarded-For: 203.0.113.7",
    b"X-Forwarded-For: 198.51.100.1, 203.0.113.9",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Connection: keep-alive, close",
    b"connection:Close",
    b"Content-Length: 0",
    b"Content-Length:  0 ",
    b"Content-Type: application/json",
    b"Cookie: a=b",
    b"User-Agent: test/1.0",
    b"Accept: */*",
    b"X-Empty:",
]

# Requests twisted.web must answer itself (the direct path leaves them).
ODD = [
    b"Content-Length: 5\r\n\r\nhello",
    b"Content-Length: 00\r\n\r\n",
    b"Content-Length: 0\r\nContent-Length: 0\r\n\r\n",
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"Expect: 100-continue\r\n\r\n",
    b"X-Folded: a\r\n b\r\n\r\n",
    b"X-Nul: a\x00b\r\n\r\n",
    b"Bad Header: x\r\n\r\n",
    b"NoColon\r\n\r\n",
]

request_lines = st.sampled_from([
    *[b"POST /auth/ticket HTTP/1.1"] * 8,
    b"POST /auth/ticket HTTP/1.0",
    b"POST /auth/ticket?x=1 HTTP/1.1",
    b"GET /auth/ticket HTTP/1.1",
    b"POST /auth/ticket/x HTTP/1.1",
    b"GET /healthz HTTP/1.1",
])


@st.composite
def requests(draw):
    """One request's bytes."""
    line = draw(request_lines)
    headers = AUTHORIZATIONS[draw(st.sampled_from(["valid"] * 6 + sorted(AUTHORIZATIONS)))]()
    headers += draw(st.lists(st.sampled_from(EXTRA), max_size=4))
    headers = draw(st.permutations(headers))
    head = b"\r\n".join([line, *headers]) + b"\r\n"
    if draw(st.integers(0, 5)) == 0:
        return head + draw(st.sampled_from(ODD))
    return head + b"\r\n"


@st.composite
def conversations(draw):
    """The reads of one connection: requests whole, split or pipelined."""
    wire = []
    for request in draw(st.lists(requests(), min_size=1, max_size=5)):
        how = draw(st.sampled_from(["whole", "whole", "whole", "split", "pipelined"]))
        if how == "split":
            cut = draw(st.integers(1, len(request) - 1))
            wire += [request[:cut], request[cut:]]
        elif how == "pipelined" and wire:
            wire[-1] += request
        else:
            wire.append(request)
    fire_after = draw(st.lists(st.booleans(), min_size=len(wire), max_size=len(wire)))
    return wire, fire_after


def _ticket_request(*headers, auth="valid"):
    return b"\r\n".join([b"POST /auth/ticket HTTP/1.1", *AUTHORIZATIONS[auth](), *headers, b"", b""])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(  # answered later, the next request read meanwhile
    conversation=([_ticket_request(), _ticket_request(b"Connection: close")], [False, False]),
    spent=0, hsts=True, access_log=True, broker_mode="later",
)
@example(  # the rate limit reached on a keep-alive connection
    conversation=([_ticket_request()] * 3, [True] * 3),
    spent=8, hsts=False, access_log=True, broker_mode="now",
)
@example(  # a NUL in a header value: twisted.web's 400
    conversation=([_ticket_request(b"X-Nul: a\x00b"), _ticket_request()], [True] * 2),
    spent=0, hsts=False, access_log=False, broker_mode="now",
)
@example(  # 503, then HTTP/1.0
    conversation=([_ticket_request(), _ticket_request().replace(b"HTTP/1.1", b"HTTP/1.0")], [True] * 2),
    spent=0, hsts=True, access_log=True, broker_mode="fails",
)
@given(
    conversation=conversations(),
    spent=st.sampled_from([0, 0, 8, 10]),
    hsts=st.booleans(),
    access_log=st.booleans(),
    broker_mode=st.sampled_from(["now", "now", "now", "later", "fails", "raises"]),
)
def test_direct_ticket_answers_are_twisted_webs(conversation, spent, hsts, access_log, broker_mode):
    """
    Every generated conversation gets the same bytes, closes, deadlines and
    access log lines with the direct path as through twisted.web, but for
    the ticket values and the Date; the tickets the direct path answered are
    redeemable, once.
    """
    reads, fire_after = conversation
    sides = [_Side(direct, hsts, access_log, broker_mode) for direct in (False, True)]
    results = []
    for side in sides:
        if spent:
            # Spend alice's tickets first, through twisted.web (pipelined).
            warm, _ = side.connect()
            mode, side.broker.mode = side.broker.mode, "now"
            warm.dataReceived(b"".join(
                b"POST /auth/ticket HTTP/1.1\r\nAuthorization: Bearer %s\r\n\r\n" % _valid().encode()
                for _ in range(spent)
            ))
            side.broker.mode = mode
        results.append(_exchange(side, reads, fire_after))
    (twisted_seen, _), (direct_seen, direct_bytes) = results
    normal = [[(_normal(step[0]),) + step[1:] if len(step) > 1 else step for step in seen]
              for seen in (twisted_seen, direct_seen)]
    assert normal[0] == normal[1]
    for answer in direct_bytes.split(b"HTTP/1.")[1:]:
        # chatd's answers (not twisted.web's bare 400) carry a Date.
        assert b"\r\nServer: chatd\r\n" not in answer or _DATE.search(answer), answer
    broker = sides[1].broker
    for ticket in _tickets(direct_bytes):
        assert broker.redeem_ticket(ticket).result is not None
        assert broker.redeem_ticket(ticket).result is None


def _one_read(side, data):
    protocol, transport = side.connect()
    protocol.dataReceived(data)
    return protocol, transport


def _counting_requests():
    """A direct side whose twisted.web Requests are counted: (side, a list growing by one per Request)."""
    side = _Side(direct=True, hsts=True, access_log=False, broker_mode="now")
    built = []
    factory = side.site.requestFactory

    def counting(*args, **kwargs):
        built.append(True)
        return factory(*args, **kwargs)

    side.site.requestFactory = counting
    return side, built


def test_the_direct_path_answers_a_whole_ticket_request():
    """
    A ticket request alone in a read is answered by the channel itself
    (twisted.web builds no Request for it), a keep-alive one after another
    too; one split across reads goes to twisted.web.  (That the tests above
    exercise the direct path at all.)
    """
    side, built = _counting_requests()
    request = b"POST /auth/ticket HTTP/1.1\r\nAuthorization: Bearer %s\r\n\r\n" % _valid().encode()
    protocol, transport = _one_read(side, request)
    protocol.dataReceived(request)
    assert transport.value().count(b"HTTP/1.1 200 OK\r\n") == 2 and built == []
    protocol.dataReceived(request[:20])
    protocol.dataReceived(request[20:])
    assert transport.value().count(b"HTTP/1.1 200 OK\r\n") == 3 and built == [True]


def test_a_ticket_answered_later_holds_what_comes_meanwhile():
    """
    While the broker stores a ticket, the next request waits (twisted.web's
    head-of-line order): its answer follows the first, whose body is chunked
    as twisted.web writes an answer given later.
    """
    side = _Side(direct=True, hsts=False, access_log=False, broker_mode="later")
    request = b"POST /auth/ticket HTTP/1.1\r\nAuthorization: Bearer %s\r\n\r\n" % _valid().encode()
    protocol, transport = _one_read(side, request)
    protocol.dataReceived(b"GET /healthz HTTP/1.1\r\n\r\n")
    assert transport.value() == b""
    side.broker.store_now()
    answers = transport.value()
    assert answers.startswith(b"HTTP/1.1 200 OK\r\n") and b"Transfer-Encoding: chunked\r\n" in answers
    assert answers.index(b'"ticket"') < answers.index(b'"status": "ok"')


def test_a_client_gone_before_a_later_answer_gets_nothing():
    """The connection lost while the broker stores the ticket: nothing is written, nothing fails."""
    side = _Side(direct=True, hsts=False, access_log=True, broker_mode="later")
    request = b"POST /auth/ticket HTTP/1.1\r\nAuthorization: Bearer %s\r\n\r\n" % _valid().encode()
    protocol, transport = _one_read(side, request)
    protocol.connectionLost(Failure(ConnectionDone()))
    side.broker.store_now()
    assert transport.value() == b""


def test_ticket_head_takes_only_a_lone_bodiless_ticket_request():
    """L{web.ticket_head}: what goes direct, and what stays twisted.web's."""
    base = b"POST /auth/ticket HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n"
    assert web.ticket_head(base + b"\r\n") == {b"host": [b"x"], b"authorization": [b"Bearer t"]}
    assert web.ticket_head(b"POST /auth/ticket HTTP/1.1\r\n\r\n") == {}
    assert web.ticket_head(base + b"Content-Length: 0\r\n\r\n") is not None
    for odd in ODD:
        assert web.ticket_head(base + odd) is None, odd
    for other in (
        base,  # not complete
        base + b"\r\n" + base + b"\r\n",  # pipelined
        base.replace(b"HTTP/1.1", b"HTTP/1.0") + b"\r\n",
        base.replace(b"/auth/ticket", b"/auth/ticket?a=b") + b"\r\n",
        base + b"X-Big: " + b"x" * 16384 + b"\r\n\r\n",
    ):
        assert web.ticket_head(other) is None, other


def _ticket_head_by_lines(data):
    """
    L{web.ticket_head} as it was before it took the lines by regular
    expression (a loop over each line's parts, up to cbd21b4): the
    reference the new one must agree with on every input.
    """
    line = b"POST /auth/ticket HTTP/1.1\r\n"
    if (
        len(data) > http.HTTPChannel.totalHeadersSize
        or not data.startswith(line)
        or data.find(b"\r\n\r\n", len(line) - 2) != len(data) - 4
    ):
        return None
    headers = {}
    if len(data) == len(line) + 2:
        return headers
    lines = data[len(line):-4].split(b"\r\n")
    if len(lines) > http.HTTPChannel.maxHeaders:
        return None
    for field in lines:
        name, colon, value = field.partition(b":")
        if not colon or not re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", name):
            return None
        value = value.strip(b" \t")
        if b"\x00" in value or b"\r" in value or b"\n" in value:
            return None
        headers.setdefault(name.lower(), []).append(value)
    if headers.get(b"content-length", [b"0"]) != [b"0"] or b"transfer-encoding" in headers or b"expect" in headers:
        return None
    return headers


# Pieces of header lines, the awkward ones among them.
_PIECES = st.sampled_from([
    b"a", b"Z", b"-", b"0", b"~", b":", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\x00", b"\x7f",
    b"\x80", b"\xff", b"(", b"@", b"Authorization: Bearer x.y.z", b"Content-Length", b"content-length: 0",
    b"Content-Length: 00", b"Expect", b"Transfer-Encoding", b"X: y\r\n", b": v\r\n", b"\r\n ",
])


@settings(max_examples=3000, deadline=None)
@example(pieces=[b"X: y\r\n"] * 500 + [b"X: y"], end=b"\r\n\r\n")  # over maxHeaders
@example(pieces=[b"X: y\r\n"] * 499 + [b"X: y"], end=b"\r\n\r\n")
@example(pieces=[b"X-Big: ", b"x" * 16384], end=b"\r\n\r\n")  # over totalHeadersSize
@given(
    pieces=st.lists(st.one_of(_PIECES, st.binary(max_size=8)), max_size=20),
    end=st.sampled_from([b"\r\n\r\n", b"\r\n", b"", b"\r\n\r\nX"]),
)
def test_ticket_head_agrees_with_the_line_loop(pieces, end):
    """
    L{web.ticket_head} takes and refuses exactly what the line-by-line
    parser it replaced took and refused, and reads the same headers.
    """
    data = b"POST /auth/ticket HTTP/1.1\r\n" + b"".join(pieces) + end
    assert web.ticket_head(data) == _ticket_head_by_lines(data)


def test_a_twisted_web_of_another_layout_answers_every_request(monkeypatch):
    """
    Where twisted.web's channel lacks a piece of the private state the
    direct path reads (a later Twisted), the channel answers nothing itself:
    the request goes to twisted.web, answered as before.
    """
    monkeypatch.setattr(web, "_CHANNEL_STATE", web._CHANNEL_STATE + ("_renamed_in_a_later_twisted",))
    monkeypatch.setattr(web, "_LAYOUT_KNOWN", {})  # what this Twisted's channel class was found to have
    side, built = _counting_requests()
    request = b"POST /auth/ticket HTTP/1.1\r\nAuthorization: Bearer %s\r\n\r\n" % _valid().encode()
    _, transport = _one_read(side, request)
    assert transport.value().startswith(b"HTTP/1.1 200 OK\r\n") and built == [True]
