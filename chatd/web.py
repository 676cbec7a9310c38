# -*- test-case-name: tests.test_web -*-
"""
The HTTP side of the one listener: ticket exchange, room list, health, the
browser page, and the WebSocket endpoints mounted as resources, so HTTP and
WebSocket share one origin (no CORS).

Every answer that is not the page is JSON, errors included.
"""

import json
import math
import re
import time
from importlib import resources
from json.encoder import encode_basestring_ascii

from autobahn.twisted.resource import WebSocketResource
from twisted.internet import defer
from twisted.internet.interfaces import IProtocolNegotiationFactory
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http, http_headers, server
# Read once: twisted.web.http is a deprecation proxy, whose every attribute
# read costs microseconds (cProfile of a ticket request).
from twisted.web.http import OK, RESPONSES, HTTPChannel, datetimeToString, toChunk
from twisted.web.resource import Resource
from zope.interface import implementer

from chatd import errors, guard, tickets
from chatd.auth import InvalidToken
from chatd.errors import BrokerUnavailable
from chatd.logs import printable, redact_uri
from chatd.proxies import TrustedProxies
from chatd.stomp.transport import SockJSResource

log = Logger()

# Tickets one user may mint at once; [auth] ticket_rate refills them.
TICKET_BURST = 10
# Past this many remembered users, those whose buckets are full again are
# forgotten (at most once a second; rate_limited_users() does it at once).
TICKET_USERS_BEFORE_SWEEP = 1000
# Tokens a ticket user's bucket may be short by and still give one (float rounding).
TICKET_SLACK = 1e-3

# The Server header of every answer: no library names or versions.
SERVER_NAME = b"chatd"
HSTS = b"max-age=31536000"


# Reason phrases twisted.web does not know.
_REASONS = {
    errors.HTTP_UPGRADE_REQUIRED: b"Upgrade Required",
    errors.HTTP_TOO_MANY_REQUESTS: b"Too Many Requests",  # RFC 6585
}


def _json(request, status, body, headers=()):
    """
    Set the answer's status and headers.

    @param body: what to answer as JSON, or its JSON text as bytes already.
    @return: the body's bytes, for C{render}.
    """
    request.setResponseCode(status, _REASONS.get(status))
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    for name, value in headers:
        request.setHeader(name, value)
    if body.__class__ is bytes:
        return body
    return json.dumps(body).encode("utf-8")


def _ticket_body(ticket, ttl):
    """
    The ticket answer's JSON: exactly C{json.dumps({"ticket": ticket,
    "expires_in": ttl})} as UTF-8, built directly for a text ticket and an
    integer lifetime (one per connection).
    """
    if ticket.__class__ is str and ttl.__class__ is int:
        return f'{{"ticket": {encode_basestring_ascii(ticket)}, "expires_in": {int.__repr__(ttl)}}}'.encode("ascii")
    return json.dumps({"ticket": ticket, "expires_in": ttl}).encode("utf-8")


def _error_body(request, failure):
    """
    The JSON answer for a failure, logged (once, here) when unexpected.

    Every failure of every resource ends here, synchronous or not, so no
    request is left unanswered and twisted.web's HTML error page is never
    sent.
    """
    status, body = errors.http_error(failure.value)
    if status == errors.HTTP_INTERNAL_ERROR:
        log.failure(
            "{method} {path} failed", failure,
            method=printable(request.method.decode("latin-1"), 16), path=redact_uri(request.uri),
        )
    return _json(request, status, body)


def _answer_later(request, answer, success=None):
    """
    Answer C{request} with what the Deferred C{answer} fires with, a
    C{(status, body)} pair, or with C{success} when given (whatever
    C{answer} fires with then); a failure is answered by L{_error_body}.

    When C{answer} has fired already (the embedded broker answers at once),
    the body is returned for C{render} to write with its length, as a
    synchronous resource would.  Otherwise the request is finished when it
    fires, and nothing is written to a client that went away meanwhile.

    @return: the body, or C{NOT_DONE_YET}, for C{render}.
    """
    now = []
    # The result (a failure too: handled here) into now, at once if there is
    # one already; the chain goes on with None.
    answer.addBoth(now.append)
    if now:
        result = now[0]
        if isinstance(result, Failure):
            return _error_body(request, result)
        return _json(request, *(result if success is None else success))
    # Later: the chain goes on with the result again.
    answer.addBoth(lambda _: now[0])
    gone = []
    request.notifyFinish().addErrback(gone.append)

    def write(body):
        if not gone and not request.finished:
            request.write(body)
            request.finish()

    answer.addCallback(lambda result: _json(request, *(result if success is None else success)))
    answer.addErrback(lambda failure: _error_body(request, failure))
    answer.addCallback(write)
    answer.addErrback(lambda failure: log.failure("writing an answer failed", failure))
    return server.NOT_DONE_YET


class _JSONResource(Resource):
    """Unknown methods, children and failures answer JSON too."""

    isLeaf = True
    allowed = (b"GET",)

    def render(self, request):
        if any(request.postpath):
            # A leaf: /rooms/x would otherwise render /rooms.
            return _not_found(request)
        allowed = self.allowed + ((b"HEAD",) if b"GET" in self.allowed else ())
        if request.method not in allowed:
            return _json(
                request, http.NOT_ALLOWED,
                {"error": "method_not_allowed", "message": f"use {b', '.join(self.allowed).decode()}"},
                [(b"allow", b", ".join(self.allowed))],
            )
        try:
            return super().render(request)
        except Exception:
            return _error_body(request, Failure())


class _Authenticated(_JSONResource):
    """Resources that take the application's JWT as a Bearer token."""

    def __init__(self, verifier):
        super().__init__()
        self._verifier = verifier

    def principal(self, request):
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidToken("send Authorization: Bearer <JWT>")
        return self._verifier.verify(token.strip())

    def unauthorized(self, request, why):
        return _json(
            request, errors.HTTP_UNAUTHORIZED,
            {"error": "invalid_token", "message": why},
            [(b"www-authenticate", b'Bearer realm="chatd", error="invalid_token"')],
        )


class TicketResource(_Authenticated):
    """
    POST /auth/ticket: a JWT in, a single-use WebSocket ticket out.

    Each user (C{sub}) may mint C{[auth] ticket_rate} tickets a second,
    L{TICKET_BURST} at once; over that, 429.  Tickets are stored until they
    expire, so without the limit one token could fill the ticket store.
    """

    allowed = (b"POST",)

    def __init__(self, verifier, broker, ttl, rate, clock):
        super().__init__(verifier)
        self._broker = broker
        self._ttl = ttl
        self._rate = rate
        self._clock = clock
        # sub -> when its bucket is full again: the whole state of a token
        # bucket that starts full (the tokens left are TICKET_BURST minus
        # the rate times the time until then), one float per user.
        self._full_at = {}
        self._swept = clock.seconds()

    def rate_limited_users(self):
        """How many users' buckets are remembered (those not full)."""
        self._forget_full()
        return len(self._full_at)

    def _take(self, sub):
        """Spend one of C{sub}'s tickets; False when it has none left."""
        now = self._clock.seconds()
        if len(self._full_at) >= TICKET_USERS_BEFORE_SWEEP and now - self._swept >= 1:
            self._forget_full()
        full_at = max(self._full_at.get(sub, now), now)
        # Under one token left; the slack absorbs the rounding of adding
        # 1/rate steps to a wall-clock float (2.4e-7 s apart at 1.7e9 s),
        # which made the tenth ticket of a full bucket fail at some rates.
        if (full_at - now) * self._rate > TICKET_BURST - 1 + TICKET_SLACK:
            return False
        self._full_at[sub] = full_at + 1 / self._rate
        return True

    def _forget_full(self):
        now = self._swept = self._clock.seconds()
        for sub in [sub for sub, full_at in self._full_at.items() if full_at <= now]:
            del self._full_at[sub]

    def render_POST(self, request):
        try:
            principal = self.principal(request)
        except InvalidToken as e:
            return self.unauthorized(request, str(e))
        if not self._take(principal.sub):
            return _json(
                request, errors.HTTP_TOO_MANY_REQUESTS,
                {"error": errors.RATE_LIMITED, "message": "too many tickets; try again shortly"},
                [(b"retry-after", b"%d" % max(1, math.ceil(1 / self._rate)))],
            )
        ticket = tickets.new_ticket()
        d = defer.maybeDeferred(self._broker.issue_ticket, ticket, principal, self._ttl)
        return _answer_later(request, d, (OK, _ticket_body(ticket, self._ttl)))


class RoomsResource(_Authenticated):
    """GET /rooms: the rooms this user may enter, with their user counts."""

    def __init__(self, verifier, broker):
        super().__init__(verifier)
        self._broker = broker

    def render_GET(self, request):
        try:
            principal = self.principal(request)
        except InvalidToken as e:
            return self.unauthorized(request, str(e))
        d = defer.maybeDeferred(self._broker.list_rooms)
        d.addCallback(self._listed, principal)
        return _answer_later(request, d)

    def _listed(self, rooms, principal):
        listed = [{"name": name, "users": users} for name, users in rooms if principal.may_enter(name)]
        return http.OK, {"rooms": listed}


class HealthResource(_JSONResource):
    """GET /healthz: 200 while the broker can serve, 503 while it cannot or while draining."""

    def __init__(self, broker, instance_id, drain_state=None):
        super().__init__()
        self._broker = broker
        self._instance_id = instance_id
        self._drain_state = drain_state

    def render_GET(self, request):
        if self._drain_state is not None and self._drain_state.draining:
            return _json(
                request, errors.HTTP_UNAVAILABLE, {"status": "draining", "instance": self._instance_id}
            )
        if self._broker.is_available():
            return _json(request, http.OK, {"status": "ok", "instance": self._instance_id})
        return _json(
            request, errors.HTTP_UNAVAILABLE, {"status": "unavailable", "instance": self._instance_id}
        )


class PageResource(_JSONResource):
    """GET /: the browser client, one static file."""

    def __init__(self):
        super().__init__()
        self._page = resources.files("chatd").joinpath("static/index.html").read_bytes()

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'self'; script-src 'self' 'unsafe-inline'; "
            b"style-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
        )
        request.setHeader(b"x-content-type-options", b"nosniff")
        return self._page


def _not_found(request):
    return _json(request, http.NOT_FOUND, {"error": "not_found", "message": "no such resource"})


class NotFound(_JSONResource):
    """Any path chatd does not serve: 404 JSON."""

    def render(self, request):
        return _not_found(request)


class Directory(Resource):
    """A node of the tree whose unknown children answer a JSON 404."""

    def getChild(self, path, request):
        return NotFound()

    def render(self, request):
        return NotFound().render(request)


class Root(Directory):
    """/ is the page; the rest are children."""

    def __init__(self, page):
        super().__init__()
        self._page = page

    def getChild(self, path, request):
        if path == b"" and not request.postpath:
            return self._page
        return NotFound()


class WebSocketEndpoint(WebSocketResource):
    """
    /ws and /echo: a request that asks for a WebSocket goes to Autobahn;
    anything else is answered here in JSON (Autobahn would answer a plain
    GET with its HTML banner and version, and /ws/x like /ws).
    """

    def render(self, request):
        if any(request.postpath):
            return _not_found(request)
        if request.method != b"GET":
            return _json(
                request, http.NOT_ALLOWED,
                {"error": "method_not_allowed", "message": "use GET"}, [(b"allow", b"GET")],
            )
        upgrade = [word.strip().lower() for word in (request.getHeader(b"upgrade") or b"").split(b",")]
        if b"websocket" not in upgrade:
            return _json(
                request, errors.HTTP_UPGRADE_REQUIRED,
                {"error": "upgrade_required", "message": "open a WebSocket here"},
                [(b"upgrade", b"websocket"), (b"connection", b"Upgrade")],
            )
        return super().render(request)


# --- POST /auth/ticket straight from the channel ----------------------------

_TICKET_LINE = b"POST /auth/ticket HTTP/1.1\r\n"
_NO_LENGTH = [b"0"]
# A ticket request's header lines, each with its CRLF: a field name (RFC
# 9110 token), a colon, a value without NUL, CR or LF (twisted.web refuses
# those; a lone CR or LF in a line is no line ending for it either).
# Possessive: each line splits one way only, so a bad line at the end of
# 16 KiB of them is not tried against shorter splits of every line before.
_TICKET_FIELDS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]++:[^\x00\r\n]*+\r\n)++")
# One of those lines, as C{(name, value)}.
_TICKET_FIELD = re.compile(rb"([^:]*):([^\r]*)\r\n")


def ticket_head(data):
    """
    The request headers of a ticket request L{ChatChannel} answers itself,
    or L{None} for twisted.web.

    Only C{data} that is exactly one head goes direct: C{POST /auth/ticket}
    over HTTP/1.1, well-formed header lines (no folding) within
    twisted.web's limits, and no body (C{Content-Length: 0} or none, no
    C{Transfer-Encoding} or C{Expect}), nothing after it.  Anything else (a
    head split across reads, a pipelined request, a malformed or unusual
    one) is left to twisted.web, which answers it as it always did.

    The lines are checked and split by two regular expressions, each one
    pass in C over the head (a Python loop over each line's parts was 1.2 %
    of scenario 2's samples).

    @param data: what the connection read, the blank line included.
    @return: C{{lower-case name: [values, stripped as twisted.web strips
        them]}}, or L{None}.
    """
    if (
        len(data) > HTTPChannel.totalHeadersSize
        or not data.startswith(_TICKET_LINE)
        or data.find(b"\r\n\r\n", len(_TICKET_LINE) - 2) != len(data) - 4
    ):
        return None
    headers = {}
    if len(data) == len(_TICKET_LINE) + 2:
        return headers
    # The header lines, each with its CRLF; the find above saw to it that
    # none is empty and that they end the data.
    if _TICKET_FIELDS.fullmatch(data, len(_TICKET_LINE), len(data) - 2) is None:
        return None
    fields = _TICKET_FIELD.findall(data, len(_TICKET_LINE), len(data) - 2)
    if len(fields) > HTTPChannel.maxHeaders:
        return None
    for name, value in fields:
        name = name.lower()
        value = value.strip(b" \t")
        if name in headers:
            headers[name].append(value)
        else:
            headers[name] = [value]
    if (
        headers.get(b"content-length", _NO_LENGTH) != _NO_LENGTH
        or b"transfer-encoding" in headers
        or b"expect" in headers
    ):
        return None
    return headers


_CANONICAL = {}  # header name -> as twisted.web's Headers writes it


def _canonical(name):
    canonical = _CANONICAL.get(name)
    if canonical is None:
        headers = http_headers.Headers()
        headers.setRawHeaders(name, [b""])
        canonical = _CANONICAL[name] = next(iter(headers.getAllRawHeaders()))[0]
    return canonical


_date = [None, b""]


def _http_date():
    """twisted.web's C{Date} value for now, made once a second."""
    now = int(time.time())
    if _date[0] != now:
        _date[:] = [now, datetimeToString(now)]
    return _date[1]


class _DirectRequest:
    """
    A ticket request L{ChatChannel} answers without twisted.web's parser and
    Request: the part of twisted.web's C{Request} chatd's resources use,
    writing what twisted.web would write for the same answer, byte for
    byte, and logging and reporting to the guard as it would.
    """

    method = b"POST"
    uri = path = b"/auth/ticket"
    clientproto = b"HTTP/1.1"
    postpath = ()
    code = OK
    code_message = b"OK"
    finished = False
    sentLength = 0
    _started = False
    _chunked = False
    _disconnected = False

    def __init__(self, channel, headers, close):
        self.channel = channel
        self.client = channel.transport.getPeer()
        self._request_headers = headers
        self.notifications = []
        # In twisted.web's order: Connection (the channel's), Server and
        # Date (Request.process), HSTS (ChatRequest.render).
        answer = self._headers = {}
        if close:
            answer[b"connection"] = (b"Connection", b"close")
        answer[b"server"] = (b"Server", SERVER_NAME)
        answer[b"date"] = (b"Date", _http_date())
        if channel.site.hsts:
            answer[b"strict-transport-security"] = (b"Strict-Transport-Security", HSTS)

    def getHeader(self, name):
        """Request API: the last value of a request header, or L{None}."""
        values = self._request_headers.get(name.lower())
        return values[-1] if values else None

    def getClientAddress(self):
        """Request API."""
        return self.client

    def setResponseCode(self, code, message=None):
        """Request API."""
        self.code = code
        self.code_message = message or RESPONSES.get(code, b"Unknown Status")

    def setHeader(self, name, value):
        """Request API: set a response header, where it was if set before."""
        name = name.lower()
        self._headers[name] = (_canonical(name), value)

    def notifyFinish(self):
        """Request API."""
        d = defer.Deferred()
        self.notifications.append(d)
        return d

    def render(self, resource):
        """Render C{resource} and write its answer, as twisted.web's C{Request.render}."""
        body = resource.render(self)
        if body is server.NOT_DONE_YET:
            return
        self.setHeader(b"content-length", b"%d" % len(body))
        self.write(body)
        self.finish()

    def write(self, data):
        """Request API."""
        if self.finished:
            raise RuntimeError("Request.write called on a request after Request.finish was called.")
        if self._disconnected:
            return
        if not self._started:
            self._started = True
            headers = self._headers
            if b"content-type" not in headers and headers.get(b"content-length", (0, b""))[1] != b"0":
                self.setHeader(b"content-type", server.Request.defaultContentType)
            if b"content-length" not in headers:
                self._chunked = True
                self.setHeader(b"transfer-encoding", b"chunked")
            head = [b"HTTP/1.1 %d %s\r\n" % (self.code, self.code_message)]
            head.extend(b"%s: %s\r\n" % pair for pair in headers.values())
            head.append(b"\r\n")
            if data and not self._chunked:
                head.append(data)
            self.channel.transport.write(b"".join(head))
            self.sentLength = len(data)
            if data and self._chunked:
                self.channel.transport.writeSequence(toChunk(data))
            return
        self.sentLength += len(data)
        if data:
            if self._chunked:
                self.channel.transport.writeSequence(toChunk(data))
            else:
                self.channel.transport.write(data)

    def finish(self):
        """Request API: as twisted.web's, then the guard's re-arm as its GuardedRequest does."""
        if self._disconnected:
            raise RuntimeError("Request.finish called on a request after its connection was lost")
        if self.finished:
            return
        if not self._started:
            self.write(b"")
        if self._chunked:
            self.channel.transport.write(b"0\r\n\r\n")
        channel = self.channel
        site = channel.site
        if site.access_log:
            site.log_request(
                self.client, self._request_headers.get(b"x-forwarded-for"),
                self.method, self.uri, self.code, self.sentLength,
            )
        self.finished = True
        channel._direct_done(self)
        notifications, self.notifications = self.notifications, []
        for d in notifications:
            d.callback(None)
        connection_guard = getattr(site.requestFactory, "connection_guard", None)
        if connection_guard is not None:
            connection_guard.request_done(self.client)

    def connection_lost(self, reason):
        """The connection went away before the answer was written."""
        self._disconnected = True
        notifications, self.notifications = self.notifications, []
        for d in notifications:
            d.errback(reason)


# twisted.web's private channel state ChatChannel reads and drives (as of
# Twisted 26.10).  A Twisted whose channel lacks any of it sends every
# request to twisted.web instead (test_web_direct checks that the direct
# path is taken, so CI notices).
_CHANNEL_STATE = (
    "line_mode", "_buffer", "requests", "_handlingRequest", "_dataBuffer", "persistent",
    "_HTTPChannel__first_line", "_busyReceiving", "paused", "_waitingForTransport",
    "_optimisticEagerReadSize", "_networkProducer",
)


# Channel class -> whether its connected channels have all of _CHANNEL_STATE:
# that is a matter of the class's code (twisted.web sets it on the class,
# in __init__ and in connectionMade), asked once per class, not per request.
_LAYOUT_KNOWN = {}


def _channel_layout_known(channel):
    """Whether C{channel}, connected, has all of L{_CHANNEL_STATE}."""
    known = _LAYOUT_KNOWN.get(channel.__class__)
    if known is None:
        known = _LAYOUT_KNOWN[channel.__class__] = all(hasattr(channel, name) for name in _CHANNEL_STATE)
    return known


class ChatChannel(guard.HeaderLimitChannel):
    """
    The Site's HTTP channel, which answers C{POST /auth/ticket} itself when
    L{ticket_head} takes the request and the channel is between requests
    with nothing buffered: twisted.web's parser, C{Request}, header objects
    and resource walk were a third of a ticket request's CPU in process
    (docs/performance.md).  The answer, the access log line,
    the guard's re-arm, keep-alive and C{Connection: close} are twisted.web's
    (tests/test_web_direct.py sends the same requests both ways); every
    other request, and every ticket request that is not alone in what was
    read, goes to twisted.web.
    """

    _direct = None  # the _DirectRequest being answered
    _held = None  # what was read meanwhile
    _direct_saved_timeout = None

    def dataReceived(self, data):
        if self._direct is not None:
            self._hold(data)
            return
        resource = self.site.ticket_resource
        if (
            resource is not None
            and data[:18] == _TICKET_LINE[:18]
            and data[-4:] == b"\r\n\r\n"
            and self._between_requests()
        ):
            headers = ticket_head(data)
            if headers is not None:
                self.resetTimeout()
                self._answer_ticket(resource, headers)
                return
        super().dataReceived(data)

    def _between_requests(self):
        # twisted.web's channel state after a finished request (requestDone),
        # or of a new connection: nothing parsed, buffered or pending.
        if not _channel_layout_known(self):
            return False
        return (
            self.line_mode
            and not self._buffer
            and not self.requests
            and not self._handlingRequest
            and not self._dataBuffer
            and self.persistent
            and self._HTTPChannel__first_line == 1
            and not self._busyReceiving
            and not self.paused
            and not self.transport.disconnecting
        )

    def _answer_ticket(self, resource, headers):
        connection = headers.get(b"connection")
        # twisted.web's checkPersistence: the first Connection header, split on spaces.
        close = connection is not None and b"close" in [t.lower() for t in connection[0].split(b" ")]
        if close:
            self.persistent = False
        request = self._direct = _DirectRequest(self, headers, close)
        request.render(resource)
        if self._direct is request and self.timeOut:
            # Answered later: no idle timeout meanwhile, as twisted.web.
            self._direct_saved_timeout = self.setTimeout(None)

    def _hold(self, data):
        # As twisted.web buffers what comes while a request is answered.
        if self._held is None:
            self._held = []
        self._held.append(data)
        if sum(map(len, self._held)) > self._optimisticEagerReadSize and not self._waitingForTransport:
            self._networkProducer.pauseProducing()

    def _direct_done(self, request):
        """The direct answer was written: on to what comes next, as twisted.web's C{requestDone}."""
        self._direct = None
        if not self._waitingForTransport:
            self._networkProducer.resumeProducing()
        if not self.persistent:
            self.setTimeout(None)
            self.loseConnection()
            return
        saved, self._direct_saved_timeout = self._direct_saved_timeout, None
        if saved:
            self.setTimeout(saved)
        held, self._held = self._held, None
        if held:
            self.dataReceived(b"".join(held))

    def connectionLost(self, reason):
        request, self._direct = self._direct, None
        super().connectionLost(reason)
        if request is not None:
            request.connection_lost(reason)


class ChatRequest(server.Request):
    """
    A Request whose answers name no library or version (C{Server: chatd}),
    and carry HSTS when the site is served over TLS.
    """

    def render(self, resource):
        self.setHeader(b"server", SERVER_NAME)
        if self.site.hsts:
            self.setHeader(b"strict-transport-security", HSTS)
        return super().render(resource)


class ChatSite(server.Site):
    """
    A Site whose access log is structured and redacted: twisted.web's default
    line carries the full URI, query string (and so the ticket) included.
    """

    displayTracebacks = False
    protocol = ChatChannel  # HTTP/1.1 only: chatd offers no ALPN h2
    # The TicketResource that ChatChannel answers directly; None: no direct path.
    ticket_resource = None

    def __init__(
        self, resource, access_log=True, request_factory=None, reactor=None, proxies=None, hsts=False
    ):
        """
        @param access_log: log each request (C{[server] access_log}).
        @param proxies: L{chatd.proxies.TrustedProxies}: who the client is
            in the log line.
        @param request_factory: the Site's C{requestFactory} (the guard's
            L{chatd.guard.ConnectionGuard.guard_requests} around
            L{ChatRequest}); L{ChatRequest} when L{None}.
        @param reactor: the C{IReactorTime} of twisted.web's timeouts; the
            global reactor when L{None}.
        @param hsts: send C{Strict-Transport-Security} (the TLS listener;
            behind a TLS proxy that is the proxy's to send).
        """
        super().__init__(resource, requestFactory=request_factory or ChatRequest, reactor=reactor)
        self.access_log = access_log
        self.proxies = proxies if proxies is not None else TrustedProxies()
        self.hsts = hsts

    def log(self, request):
        if not self.access_log:
            return
        self.log_request(
            request.getClientAddress(), request.requestHeaders.getRawHeaders(b"x-forwarded-for"),
            request.method, request.uri, request.code, request.sentLength,
        )

    def log_request(self, address, forwarded, method, uri, status, size):
        """
        The access log line of one request (when C{[server] access_log} is
        on), whether twisted.web or L{ChatChannel} answered it.

        @param forwarded: the request's C{X-Forwarded-For} values, or L{None}.
        """
        log.info(
            "{peer} {method} {path} {status} {size}",
            peer=self.proxies.client(getattr(address, "host", "-"), forwarded),
            method=printable(method.decode("latin-1"), 16),
            path=redact_uri(uri),
            status=status,
            size=size,
        )


def make_site(
    settings, broker, verifier, ws_factory, echo_factory=None, request_factory=None, reactor=None,
    api_resource=None, drain_state=None, proxies=None,
):
    """
    The resource tree of the one listener, in a L{ChatSite}.

    @param ws_factory: the L{chatd.ws.ChatServerFactory} behind C{/ws}.
    @param echo_factory: the factory behind C{/echo}, or L{None} for none.
    @param request_factory: passed to L{ChatSite}.
    @param reactor: passed to L{ChatSite}.
    @param api_resource: the server API (L{chatd.api.ApiResource}) for
        C{/api}, or L{None} when it is off (then C{/api/} is a 404).
    @param drain_state: the L{chatd.drain.DrainState} C{/healthz} reports.
    @param proxies: passed to L{ChatSite}.
    """
    if reactor is None:
        from twisted.internet import reactor
    root = Root(PageResource())
    auth = Directory()
    auth.putChild(
        b"ticket",
        TicketResource(verifier, broker, settings.auth.ticket_ttl, settings.auth.ticket_rate, reactor),
    )
    root.putChild(b"auth", auth)
    root.putChild(b"rooms", RoomsResource(verifier, broker))
    root.putChild(b"healthz", HealthResource(broker, broker.instance_id, drain_state))
    root.putChild(b"ws", WebSocketEndpoint(ws_factory))
    if settings.stomp.enabled:
        # The same factory as /ws: one set of caps, one 1001 drain.
        sockjs_root = SockJSResource(WebSocketResource(ws_factory), NotFound())
        root.putChild(settings.stomp.sockjs_path[1:].encode("ascii"), sockjs_root)
    if echo_factory is not None:
        root.putChild(b"echo", WebSocketEndpoint(echo_factory))
    if api_resource is not None:
        root.putChild(b"api", api_resource)
    site = ChatSite(
        root, settings.server.access_log, request_factory, reactor, proxies, settings.server.tls
    )
    site.ticket_resource = auth.children[b"ticket"]
    return site


# --- upgrades straight to the WebSocket ---------------------------------------

# A request's method or header name (RFC 9110 token), a request target
# (printable ASCII), a header value twisted.web refuses (NUL).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")


def upgrade_route(head, routes):
    """
    The WebSocket factory a connection's first request goes straight to, or
    L{None} for twisted.web.

    Only a request twisted.web would route to a L{WebSocketEndpoint} and
    that endpoint would hand to Autobahn goes straight: C{GET} of exactly
    one of the C{routes}' paths over HTTP/1.1, well-formed header lines
    within twisted.web's limits, no body, and an C{Upgrade} header (the
    last one, as the endpoint reads it) naming C{websocket}.  Anything else
    (a malformed, unusual or oversized request included) is left to
    twisted.web, which answers it as it always did.

    @param head: the request line and header lines, without the blank line.
    @param routes: C{{path: factory}}, such as C{{b"/ws": ...}}.
    """
    # HTTPChannel as imported: through the twisted.web.http module (a
    # deprecation proxy) each attribute read is a Python call.
    if len(head) > HTTPChannel.totalHeadersSize:
        return None
    lines = head.split(b"\r\n")
    if len(lines) > HTTPChannel.maxHeaders:
        return None
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1" or not _TARGET.fullmatch(parts[1]):
        return None
    factory = routes.get(parts[1].partition(b"?")[0])
    if factory is None:
        return None
    upgrade = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or b"\x00" in value:
            return None
        name = name.lower()
        if name in (b"content-length", b"transfer-encoding", b"expect"):
            return None
        if name == b"upgrade":
            upgrade = value
    if upgrade is None or b"websocket" not in [word.strip().lower() for word in upgrade.split(b",")]:
        return None
    return factory


class _FirstRequest(Protocol):
    """
    A new connection until the head of its first request has arrived; then
    the connection is handed to the protocol that serves it, with the bytes
    read so far: the WebSocket protocol of L{upgrade_route}'s choice, or
    the Site's HTTP channel.
    """

    # Anything else than this cannot be an upgrade L{upgrade_route} takes.
    _START = b"GET /"
    # A head longer than twisted.web takes is twisted.web's to refuse.
    _MAX_HEAD = http.HTTPChannel.totalHeadersSize + 4

    def __init__(self, factory, addr):
        self._factory = factory
        self._addr = addr
        self._buffer = b""

    def dataReceived(self, data):
        buffer = self._buffer + data if self._buffer else data
        target = None
        if buffer[:len(self._START)] != self._START[:len(buffer)]:
            target = self._factory.wrappedFactory
        else:
            # Where the blank line may start: not in what was searched before.
            end = buffer.find(b"\r\n\r\n", max(0, len(buffer) - len(data) - 3))
            if end >= 0:
                target = upgrade_route(buffer[:end], self._factory.routes) or self._factory.wrappedFactory
            elif len(buffer) > self._MAX_HEAD:
                target = self._factory.wrappedFactory
        if target is None:
            self._buffer = buffer
            return
        self._buffer = b""
        self._hand_over(target.buildProtocol(self._addr), buffer)

    def _hand_over(self, protocol, data):
        # As Autobahn's WebSocketResource takes a transport over from twisted.web.
        transport = self.transport
        if isinstance(transport, ProtocolWrapper):
            transport.wrappedProtocol = protocol
        else:
            transport.protocol = protocol
        self.transport = None
        protocol.makeConnection(transport)
        protocol.dataReceived(data)


@implementer(IProtocolNegotiationFactory)
class DirectUpgrades(WrappingFactory):
    """
    The listening factory of a L{ChatSite}: a connection whose first request
    is a WebSocket upgrade of one of C{routes} goes straight to that
    WebSocket factory's protocol, and every other connection to the Site.

    Through the Site, twisted.web would parse the request, build a Request
    and walk the resource tree, and Autobahn's C{WebSocketResource} would
    then give the request's bytes to the WebSocket protocol to parse again:
    about a tenth of the CPU of each new connection (docs/performance.md).
    What the client sees is the same either way: the upgrade's answers
    (101, and every refusal) are Autobahn's and chatd's alone, never
    twisted.web's.  A keep-alive connection that upgrades after other
    requests still upgrades through the Site's L{WebSocketEndpoint}.
    """

    noisy = False

    def __init__(self, site, routes):
        """
        @param site: the L{ChatSite}.
        @param routes: C{{path: WebSocket factory}}; the path as the request
            line has it, such as C{b"/ws"}.
        """
        super().__init__(site)
        self.routes = dict(routes)

    def acceptableProtocols(self):
        """
        IProtocolNegotiationFactory API: the Site's (ALPN C{http/1.1}).
        Twisted's TLS asks the factory inside it; without an answer, a client
        offering ALPN (every browser) would get a TLS internal error.
        """
        return self.wrappedFactory.acceptableProtocols()

    def logPrefix(self):
        """The Site's: the start-up line names the listener as before."""
        return self.wrappedFactory.logPrefix()

    def buildProtocol(self, addr):
        """
        A L{_FirstRequest}; on a listener without peer ports (UNIX
        sockets), the Site's channel at once: there the guard sets no
        deadline (docs/security.md), and twisted.web's idle timeout, which
        starts with the channel, is the only one.
        """
        if getattr(addr, "port", None) is None:
            return self.wrappedFactory.buildProtocol(addr)
        return _FirstRequest(self, addr)
