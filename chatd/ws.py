# -*- test-case-name: tests.test_ws,tests.test_ws_handshake -*-
"""
The WebSocket adapter: Autobahn in, L{chatd.session.Session} out.

docs/protocol.md is the contract.  The handshake is decided in
C{onConnect} (Origin, then ticket) so a refused client is answered with an
HTTP status and never upgraded.  Library defaults this module overrides, on
purpose: Autobahn's unlimited frame and message sizes, C{failByDrop} (which
drops TCP instead of closing with 1009/1007), its Origin check (400, we want
403, "null" included), and C{sendClose}'s refusal of 1001/1003/1009 (we use
C{sendCloseFrame}), its unbounded send buffer (see L{_GuardedMixin}), its
fragment bookkeeping (each fragment after the first is charged
L{FRAGMENT_COST} against the message limit), its C{Server} header (name and
version; ours is "chatd"), and its refusal logging (which quotes request
headers raw; ours is one escaped line per refusal, within a budget per kind:
L{_RefusalLog}).  Handshakes never reach twisted.web's access log, so each
outcome is logged here, redacted.  The common opening handshake request is
parsed and answered here too, with Autobahn's checks and answers
(L{_GuardedMixin.processHandshake}); any other is Autobahn's.

Caps on open WebSockets (total: 503, per client address: 429) are taken in
C{onConnect}, before the ticket is redeemed, so a refused client neither
spends its ticket nor reaches the broker; L{chatd.guard} caps connections
before they get this far.
"""

import base64
import hashlib
import itertools
import re
import types
from urllib import parse

import txaio
from autobahn.twisted.util import peer2str
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket.protocol import TrafficStats, WebSocketProtocol, _is_same_origin, _url_to_origin
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from autobahn.websocket.utf8validator import Utf8Validator
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import http
from zope.interface import implementer

from chatd import errors, handshake, messages
from chatd.errors import BrokerUnavailable
from chatd.hub import IConnection
from chatd.limits import CapReached, ConnectionCaps, SendBudget, TokenBucket
from chatd.logs import Logger, printable, redact_uri
from chatd.metrics import Metrics
from chatd.observer import OneShotObserverList
from chatd.proxies import TrustedProxies
from chatd.session import Expiries, Session
from chatd.stomp import transport as stomp_transport
from chatd.timers import BatchedTimer


REFUSAL_LOG_RATE = 2.0  # refused upgrades of one kind logged per second, after
REFUSAL_LOG_BURST = 20  # this many at once

# The Server header of the upgrade answer: no library names or versions.
SERVER_NAME = "chatd"

# What each fragment of a message after the first costs beyond its payload
# while Autobahn holds it (a bytes object and a list slot, about 50 bytes on
# CPython, rounded up): charged against max_message_bytes, so a message sent
# as many tiny fragments is refused (1009) once it holds as much memory as
# the largest allowed message, not 50 times that.
FRAGMENT_COST = 64

# What Autobahn keeps of the opening handshake for the connection's life
# (the request's bytes, headers and parameters, the answer's text): read by
# nothing once the connection is open.
HANDSHAKE_LEFTOVERS = (
    "http_request_data", "http_response_data", "http_headers", "http_request_params", "_wskey",
    "http_status_line", "http_request_uri", "http_request_host", "http_request_path",
    "websocket_origin", "websocket_protocols", "websocket_extensions",
)

# What Autobahn keeps of the last frame and message it received through its
# own path (chatd's fast path keeps none): set again at the start of the
# next before anything reads it.
MESSAGE_LEFTOVERS = (
    "_isMessageCompressed", "message_is_binary", "message_data", "message_data_total_length",
    "utf8validateLast", "utf8validateIncomingCurrentMessage", "frame_data", "frame_length",
    "control_frame_data", "current_frame_masker", "_fragments",
)

# Autobahn's per-connection flags, codes and timers, each at its starting
# value on an idle open connection.
AT_REST = dict(
    dict.fromkeys((
        "wasMaxFramePayloadSizeExceeded", "wasMaxMessagePayloadSizeExceeded", "closedByMe",
        "failedByMe", "droppedByMe", "wasClean", "wasServerConnectionDropTimeout",
        "wasOpenHandshakeTimeout", "wasCloseHandshakeTimeout", "wasServingFlashSocketPolicyFile",
        "triggered", "inside_message",
    ), False),
    **dict.fromkeys((
        "_perMessageCompress", "trackedTimings", "wasNotCleanReason", "localCloseCode",
        "localCloseReason", "remoteCloseCode", "remoteCloseReason", "openHandshakeTimeoutCall",
        "closeHandshakeTimeoutCall", "autoPingTimeoutCall", "autoPingPending", "autoPingPendingSent",
        "autoPingPendingCall",
        "current_frame", "_transport_details",
    ), None),
    autoPingPendingSeq=0,
    _recompact=False,
    data=b"",  # nothing buffered (CPython has one empty bytes object)
    websocket_version=13,  # RFC 6455's, which every client speaks today
)
_KEEP = object()

# What _compact drops beside the attributes at rest, by (no extensions in
# use, Autobahn's event table untouched, between messages).
_DROPPED = {
    (extensions, events, between): frozenset(
        HANDSHAKE_LEFTOVERS
        + (("websocket_extensions_in_use",) if extensions else ())
        + (("_valid_events", "_results") if events else ())
        + (("utf8validator",) + MESSAGE_LEFTOVERS if between else ())
    )
    for extensions in (False, True) for events in (False, True) for between in (False, True)
}

# Autobahn's ObservableMixin state, the same for every connection nobody
# calls .on() for (chatd never does): shared, read-only.
_EVENTS = ("message",)
_NO_RESULTS = types.MappingProxyType(dict.fromkeys(_EVENTS))


class _LazyValidator:
    """
    Autobahn's incremental UTF-8 validator, made when a text message takes
    Autobahn's path (chatd's fast path checks UTF-8 by decoding) and
    dropped at rest: Autobahn resets it at each message's start, so a new
    one is the same.
    """

    def __get__(self, protocol, owner=None):
        if protocol is None:
            return self
        validator = protocol.__dict__["utf8validator"] = Utf8Validator()
        return validator


class _LazyFuture:
    """
    Autobahn's C{is_open} or C{is_closed} Deferred, made when first read
    (Autobahn makes both for every connection, and resolves C{is_closed}
    by reading it): chatd reads neither, and an idle connection's every
    object is work for the cyclic garbage collector (docs/performance.md).
    C{is_open} made after the connection opened is made fired with
    L{None}, as Autobahn's was fired then (C{_is_open_fired}).
    """

    def __init__(self, name):
        self._name = name

    def __get__(self, protocol, owner=None):
        if protocol is None:
            return self
        future = protocol.__dict__[self._name] = txaio.create_future()
        if self._name == "is_open" and protocol._is_open_fired:
            txaio.resolve(future, None)
        return future


class _SendQueue(list):
    """
    Autobahn's send queue (a C{deque} per connection, 760 bytes even
    empty) as a list: it is empty but for chopped or synchronous sends,
    which chatd does not make, so its length never makes C{pop(0)} slow.
    """

    __slots__ = ()

    def popleft(self):
        return self.pop(0)


class _NoSendQueue(_SendQueue):
    """
    The send queue of every connection that never queued (all of chatd's):
    one, shared and always empty; L{_GuardedMixin.sendData} gives a
    connection its own before Autobahn may append to it.  An idle
    connection's every object is work for the cyclic garbage collector
    (docs/performance.md).
    """

    __slots__ = ()

    def append(self, item):
        raise TypeError("the shared empty send queue takes nothing")


class _RefusalLog:
    """
    One line per refused upgrade, within a budget per kind (status and
    reason): a client can be refused at will, and the log must not be its
    amplifier, nor may a flood of one kind hide the others.  The kinds are
    chatd's reasons and Autobahn's statuses, a small fixed set.  The number
    of lines of a kind left out is logged before the next one of that kind.
    """

    def __init__(self, clock):
        self._clock = clock
        self._kinds = {}  # (status, reason) -> [TokenBucket, lines left out]

    def note(self, logger, peer, path, status, reason, detail=""):
        """
        Log that an upgrade from C{peer} to C{path} was refused with
        C{status}, if the budget of its kind allows.

        @param reason: one of a fixed set of texts (it names the kind).
        @param detail: free text that may hold what the client sent
            (Autobahn quotes headers in its reasons): escaped here.
        """
        kind = self._kinds.get((status, reason))
        if kind is None:
            kind = self._kinds[(status, reason)] = [
                TokenBucket(REFUSAL_LOG_RATE, REFUSAL_LOG_BURST, self._clock), 0
            ]
        if not kind[0].take():
            kind[1] += 1
            return
        if kind[1]:
            logger.info(
                "{count} websocket refusals were not logged ({status}: {reason})",
                count=kind[1], status=status, reason=reason,
            )
            kind[1] = 0
        if detail:
            reason = f"{reason} ({printable(detail, 300)})"
        logger.info(
            "websocket {peer} {path} refused {status}: {reason}", event="websocket_refused",
            peer=peer, path=path, status=status, reason=reason,
        )


def _peer_host(transport):
    peer = transport.getPeer()
    try:
        return peer.host
    except AttributeError:  # a peer without a host: as text (not made for every peer that has one)
        return str(peer)


# permessage-deflate, when [websocket] compression = on (docs/security.md):
# a small window and memory level, because Autobahn keeps each connection's
# zlib state for the connection's life (about 300 KiB at zlib's defaults,
# about 20 KiB here) and chat messages are short; and no context takeover
# from server to client, so no message is compressed against another (no
# CRIME-style length oracle between one member's text and another's).  Both
# are server-side choices any client can decompress.
DEFLATE_WINDOW_BITS = 11
DEFLATE_MEM_LEVEL = 4


def _deflate_acceptor(max_message_bytes):
    def accept(offers):
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer):
                window = DEFLATE_WINDOW_BITS
                if offer.request_max_window_bits:
                    window = min(window, offer.request_max_window_bits)
                return PerMessageDeflateOfferAccept(
                    offer,
                    request_no_context_takeover=offer.accept_no_context_takeover,
                    no_context_takeover=True,
                    window_bits=window,
                    mem_level=DEFLATE_MEM_LEVEL,
                    # Autobahn also bounds inflation by maxMessagePayloadSize.
                    max_message_size=max_message_bytes,
                )
        return None

    return accept


# The opening handshakes chatd answers itself (L{_GuardedMixin.processHandshake}):
# a GET of a path (no scheme or authority, no fragment, no path parameters,
# which Autobahn's urlparse would split off) over HTTP/1.1, and header lines
# Autobahn's parser takes as they are (a token, a colon, a value of visible
# characters, obs-text, spaces and tabs), up to the blank line.
_COMMON_HEAD = re.compile(
    rb"GET /(?!/)[\x21\x22\x24-\x3a\x3c-\x7e]* HTTP/1\.1"
    rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*)*\r\n\r\n"
)
# A Sec-WebSocket-Key Autobahn takes: 24 characters of base64 ending in "==".
_COMMON_KEY = re.compile(r"[A-Za-z0-9+/]{22}==")
# The first lines of the 101, before the optional Sec-WebSocket-Protocol.
_SWITCHING = "HTTP/1.1 101 Switching Protocols\r\n"
_UPGRADED = "Upgrade: WebSocket\r\nConnection: Upgrade\r\n"
# The first two bytes of a server's unfragmented text frame of each short length.
_TEXT_HEADS = tuple(bytes((0x81, length)) for length in range(126))


def _query_params(query):
    """
    C{urllib.parse.parse_qs(query)}, as Autobahn parses a request's query:
    a query with nothing to unquote (no C{%} or C{+}, a ticket's) is split
    here, anything else by C{parse_qs}.
    """
    if "%" in query or "+" in query:
        return parse.parse_qs(query)
    params = {}
    for pair in query.split("&"):
        name, equals, value = pair.partition("=")
        if value:  # as parse_qs: no "=", or nothing after it, is left out
            if name in params:
                params[name].append(value)
            else:
                params[name] = [value]
    return params


def _common_head(text):
    """
    The request line and the headers of an opening handshake matched by
    L{_COMMON_HEAD}, as Autobahn's C{parseHttpHeader} gives them: lower-case
    names, values stripped of spaces and tabs, repeated headers joined with
    ", " (their names in C{repeated}).

    @param text: the head, decoded from Latin-1, without the blank line.
    @return: C{(request line, headers, repeated)}.
    """
    lines = text.split("\r\n")
    headers = {}
    repeated = ()
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.lower()
        value = value.strip(" \t")
        if name in headers:
            headers[name] += f", {value}"
            repeated += (name,)
        else:
            headers[name] = value
    return lines[0], headers, repeated


class _GuardedMixin:
    """
    What /ws and /echo share beyond Autobahn: C{close()} with any close
    code, and the per-connection send buffer cap.

    Autobahn writes every frame straight to the transport, and Twisted's
    transports buffer whatever they are given: a client that stops reading
    makes the server buffer without bound (measured: 200 MB for one client
    in a busy room, still connected).  Once open, the connection registers a
    L{SendBudget} as its transport's producer and reports every write
    (L{sendData}); over C{[limits] max_send_buffer_bytes} on top of a full
    transport buffer the client is a slow consumer and is let go: close 4008
    while a close frame can still be queued (a client that catches up reads
    why; one that never reads is dropped by the close handshake timeout),
    otherwise dropped at once.
    """

    client = None  # the client's address: the TCP peer, or as a trusted proxy says
    _budget = None
    _fragments = 0
    _refusal = None  # the Deny chatd refused the upgrade with, if any
    _deciding = False  # onConnect's answer is still due (a Redis redemption)
    _held_for_decision = False  # and reading stopped meanwhile

    _is_open_fired = False  # is_open, if it had been made, would have fired (_LazyFuture)

    def __init__(self):
        super().__init__()
        # Autobahn's Deferreds, made again when first read (_LazyFuture).
        del self.is_open, self.is_closed

    def _deciding_on(self, decision):
        """
        While C{decision} (onConnect's Deferred) is due, what the client
        sends is held: reading stops, and what was read stays in
        C{self.data} for the open.  Autobahn would parse any blank line in
        it as another request, refuse that (400) and still open the
        connection when the answer came, then fail dropping it twice.
        """
        if decision.called:
            return
        self._deciding = True

        def decided(result):
            del self._deciding  # the class's False again (no entry left for _compact)
            if self._held_for_decision:
                del self._held_for_decision
                self.transport.resumeProducing()
            return result

        decision.addBoth(decided)

    def processHandshake(self):
        """
        The opening handshake: the common request (L{_common_request}) is
        parsed and answered here, anything else by Autobahn.

        Autobahn's parses the head again after L{chatd.web.DirectUpgrades}
        split it, through C{urlparse} and C{parse_qs}, and builds debug
        lines and a Deferred chain on the way: about a tenth of the CPU of
        a new connection (docs/performance.md).  Here a request Autobahn
        would accept as it is, with nothing for it to negotiate, is checked
        with one regular expression and Autobahn's own helpers, decided by
        the same C{onConnect}, and answered with the same bytes (the 101,
        or C{failHandshake}'s refusal); the connection is left in the same
        state.  Any other request (another version, a repeated or malformed
        header, an absolute target, options chatd does not set) goes to
        Autobahn's C{processHandshake}, which refuses or accepts it as
        ever; so does any data after the head was taken, as in Autobahn.
        """
        if self._deciding:
            if not self._held_for_decision:
                self._held_for_decision = True
                self.transport.pauseProducing()
            return
        data = self.data
        end = data.find(b"\r\n\r\n") + 4
        if (
            end < 4 or self.http_request_data is not None or self.trustXForwardedFor or self.maxConnections
            or not _COMMON_HEAD.fullmatch(data, 0, end)
        ):
            return super().processHandshake()
        parsed = self._common_request(data[:end - 4].decode("latin-1"))
        if parsed is None:
            return super().processHandshake()
        line, headers, target, path, params, host, origin, protocols, extensions, key = parsed
        # What Autobahn keeps of the request (dropped again on open: _compact).
        self.http_request_data, self.data = data[:end], data[end:]
        self.http_status_line, self.http_headers, self.http_request_uri = line, headers, target
        self.http_request_path, self.http_request_params, self.http_request_host = path, params, host
        self.websocket_version, self.websocket_origin, self.websocket_protocols = 13, origin, protocols
        self.websocket_extensions, self._wskey = extensions, key
        request = ConnectionRequest(self.peer, headers, host, path, params, 13, origin, protocols, extensions)
        decided = defer.maybeDeferred(self.onConnect, request)
        decided.addCallbacks(self._common_accepted, self._common_refused)

    def _common_request(self, text):
        """
        The common opening handshake request, checked as Autobahn checks it.

        @param text: the head, decoded, without the blank line; it matched
            L{_COMMON_HEAD}.
        @return: C{(request line, headers, target, path, query parameters,
            host, origin, subprotocols offered, extensions offered, key)},
            each as Autobahn's C{processHandshake} sets it; or L{None} when
            Autobahn should answer (anything it would refuse, and any
            version but 13).
        """
        line, headers, repeated = _common_head(text)
        if repeated and {"host", "origin", "sec-websocket-extensions"}.intersection(repeated):
            return None
        if headers.get("sec-websocket-version") != "13" or 13 not in self.versions:
            return None
        upgrade, connection = headers.get("upgrade"), headers.get("connection")
        if (
            upgrade is None or "websocket" not in [u.strip().lower() for u in upgrade.split(",")]
            or connection is None or "upgrade" not in [c.strip().lower() for c in connection.split(",")]
        ):
            return None
        key = headers.get("sec-websocket-key")
        if key is None:
            return None
        key = key.strip()
        if not _COMMON_KEY.fullmatch(key):
            return None
        host = headers.get("host")
        if host is None:
            return None
        host = host.strip()
        if host.find(":") >= 0 and not host.endswith("]"):
            host, port = host.rsplit(":", 1)
            try:
                port = int(str(port.strip()))
            except ValueError:
                return None
            if self.factory.externalPort and port != self.factory.externalPort:
                return None
        protocols = []
        if "sec-websocket-protocol" in headers:
            protocols = [str(p.strip()) for p in headers["sec-websocket-protocol"].split(",")]
            if len(set(protocols)) != len(protocols):
                return None
        origin = ""
        if "origin" in headers:
            origin = headers["origin"].strip()
            factory = self.factory
            try:
                origin_tuple = _url_to_origin(origin)
            except ValueError:
                return None
            if not (origin_tuple == "null" and factory.allowNullOrigin) and not _is_same_origin(
                origin_tuple, "https" if factory.isSecure else "http", factory.externalPort or factory.port,
                self.allowedOriginsPatterns,
            ):
                return None
        extensions = []
        if "sec-websocket-extensions" in headers:
            extensions = self._parseExtensionsHeader(headers["sec-websocket-extensions"])
        target = line[4:-9]
        path, _, query = target.partition("?")
        return (
            line, headers, target, path, _query_params(query), host, origin, protocols, extensions, key,
        )

    def _common_accepted(self, subprotocol):
        """
        Autobahn's C{succeedHandshake} for the common request: the 101, then
        the connection opens.  Anything for Autobahn to negotiate (extensions
        offered, headers to add, a subprotocol the client did not offer) is
        Autobahn's to answer.
        """
        if (
            type(subprotocol) is tuple or self.websocket_extensions or self.factory.headers
            or (subprotocol is not None and subprotocol not in self.websocket_protocols)
        ):
            return self.succeedHandshake(subprotocol)
        self.websocket_protocol_in_use = subprotocol
        self.websocket_extensions_in_use = []
        server = self.factory.server
        response = _SWITCHING + f"Server: {server}\r\n" + _UPGRADED if server else _SWITCHING + _UPGRADED
        if subprotocol is not None:
            response += f"Sec-WebSocket-Protocol: {subprotocol}\r\n"
        accept = base64.b64encode(hashlib.sha1(self._wskey.encode("utf8") + WebSocketProtocol._WS_MAGIC).digest())
        response += f"Sec-WebSocket-Accept: {accept.decode()}\r\n\r\n"
        self.sendData(response.encode("utf8"))
        self.http_response_data = response
        self.state = self.STATE_OPEN
        if self.openHandshakeTimeoutCall is not None:
            self.openHandshakeTimeoutCall.cancel()
            self.openHandshakeTimeoutCall = None
        self.inside_message = False
        self.current_frame = None
        if self.autoPingInterval:
            self.autoPingPendingCall = self.factory._batched_timer.call_later(
                self.autoPingInterval, self._sendAutoPing,
            )
        if self.trackedTimings:
            self.trackedTimings.track("onOpen")
        self._onOpen()
        if "is_open" in self.__dict__:
            txaio.resolve(self.is_open, None)
        else:
            self._is_open_fired = True
        if self.data:
            self.consumeData()

    def _common_refused(self, failure):
        """Autobahn's answer to C{onConnect}'s refusal (C{ConnectionDeny}) or failure (500)."""
        if isinstance(failure.value, ConnectionDeny):
            self.failHandshake(failure.value.reason, failure.value.code)
            return None
        self.log.warn("Unexpected exception in onConnect ['{err.value}']", err=failure)
        self.log.warn("{tb}", tb=txaio.failure_format_traceback(failure))
        return self.failHandshake(
            f"Internal server error: {failure.value}", ConnectionDeny.INTERNAL_SERVER_ERROR,
        )

    def failHandshake(self, reason, code=400, responseHeaders=None):
        """
        Autobahn's, with one change: Autobahn logs C{reason}, which quotes
        request headers as sent (the Origin, say), in two lines; here the
        refusal is one line, escaped and within the refusal budget, and a
        reason Autobahn made is not echoed in the status line.
        """
        # An answered refusal ends the connection as planned: with
        # wasClean, Autobahn's "dropping connection" line is debug and
        # leaves the reason out (else a warning quoting it).
        self.wasClean = True
        self.wasNotCleanReason = printable(reason, 300)
        if self._refusal is None:
            # Autobahn's own refusal of a malformed request.
            self.factory.metrics.count_rejected(code)
            self.factory.refusals.note(
                self._log, self.client or _peer_host(self.transport),
                redact_uri(getattr(self, "http_request_uri", None) or "-"),
                code, "malformed upgrade", detail=reason,
            )
            reason = http.RESPONSES.get(code, b"Refused").decode("ascii")
        self.sendHttpErrorResponse(code, reason, responseHeaders)
        self.dropConnection(abort=False)

    def onMessageBegin(self, isBinary):
        super().onMessageBegin(isBinary)
        self._fragments = 0

    def onMessageFrameBegin(self, length):
        """Charge each fragment after the first L{FRAGMENT_COST} against the message limit (1009)."""
        super().onMessageFrameBegin(length)
        self._fragments += 1
        # The first fragment is the message itself: a message in one frame
        # may be exactly max_message_bytes.
        held = self.message_data_total_length + (self._fragments - 1) * FRAGMENT_COST
        if not self.failedByMe and 0 < self.maxMessagePayloadSize < held:
            self.wasMaxMessagePayloadSizeExceeded = True
            # Autobahn's own path for an over-size message: close 1009
            # (failByDrop is off), and nothing more of it is kept.
            # Private: no public call also sets failedByMe (test_ws checks the name is there).
            self._max_message_size_exceeded(
                held, self.maxMessagePayloadSize,
                f"message of {self._fragments} fragments over the size limit",
            )

    _close_on_open = None  # (code, reason): close() came during the opening handshake

    def fire(self, event, *args, **kwargs):
        """
        ObservableMixin's; a connection with listeners (C{on}) gets its own
        event table first: the one open connections share (L{_compact}) is
        read-only.
        """
        if self._listeners is not None and type(self.__dict__.get("_results")) is not dict:
            self.set_valid_events(self._valid_events)
        return super().fire(event, *args, **kwargs)

    def close(self, code, reason):
        """
        C{close()} that can send any close code, once.  A connection still
        in its opening handshake (its ticket redeemed, say, when the server
        API disconnects its user) is closed as soon as it opens.
        """
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:120], isReply=False)
        elif self.state == self.STATE_CONNECTING and self._close_on_open is None:
            self._close_on_open = (code, reason)

    def connectionMade(self):
        """
        Autobahn's, without what it does on every connection for nothing
        chatd uses: the transport details (the TLS channel binding, worked
        out here and again on open, and the peer certificate) and a debug
        line formatted whether or not debug is on (docs/performance.md).
        """
        self._transport_details = None
        self.peer = peer2str(self.transport)
        try:
            self.transport.setTcpNoDelay(self.tcpNoDelay)
        except Exception:  # as Autobahn: not every transport has it
            pass
        if self.CONFIG_ATTRS:
            # Not from an _OptionsOnClass factory: Autobahn copies the options.
            self._connectionMade()
            self.send_queue = _SendQueue()
            return
        # Autobahn's _connectionMade for a server whose options are class
        # attributes: its flags, codes, timers and buffer start at their class
        # values (AT_REST) and the UTF-8 validator is made when needed
        # (_LazyValidator), so only what each connection has of its own is
        # set (Autobahn sets about 40 attributes, most of them dropped again
        # on open by _compact).
        self.trafficStats = TrafficStats()
        self.state = self.STATE_CONNECTING
        self.send_state = self.SEND_STATE_GROUND
        # send_queue: the shared empty one (_NoSendQueue) until sendData queues.
        if self.trackTimings:
            self.setTrackTimings(True)
        if self.openHandshakeTimeout > 0:
            self.openHandshakeTimeoutCall = self.factory._batched_timer.call_later(
                self.openHandshakeTimeout, self.onOpenHandshakeTimeout,
            )
        self.factory.countConnections += 1

    def _onOpen(self):
        # Autobahn's fills in the transport details first; there are none.
        self.onOpen()
        self._compact()

    def _compact(self):
        """
        Drop the handshake's leftovers and every attribute at its starting
        value (L{AT_REST}, class attributes here) from the open connection's
        attribute dict, into a new dict sized for what is left.

        Autobahn sets about 60 attributes per connection, and a dict that
        ever held that many stays sized for up to 85: 1.6 KiB per idle
        connection, about half of it for values nobody will change unless
        the connection closes (docs/performance.md).  Also dropped: what
        every idle connection holds alike (no extensions, Autobahn's event
        table), and between messages the last one's leftovers
        (L{MESSAGE_LEFTOVERS}) and the UTF-8 validator (L{_LazyValidator}); at 21 entries
        or fewer the dict takes 464 bytes, over that 832.  An attribute set
        later goes into the dict again, so reading one is unchanged; after a
        pong (Autobahn's auto-ping sets four attributes back to rest) the
        dict is compacted again (L{dataReceived}).
        """
        state = self.__dict__
        shared = _DROPPED[
            not state.get("websocket_extensions_in_use", True),
            state.get("_listeners") is None and tuple(state.get("_valid_events", ())) == _EVENTS
            and not any(state.get("_results", {}).values()),
            # Between messages: no frame or message of Autobahn's is under way.
            not state.get("inside_message", False) and state.get("current_frame") is None,
        ]
        # One new dict, sized for what it holds (a dict never shrinks).
        self.__dict__ = {
            name: value for name, value in state.items()
            if AT_REST.get(name, _KEEP) is not value and name not in shared
        }

    def _onPong(self, payload):
        super()._onPong(payload)
        # Compacted once this read is over (Autobahn still sets attributes
        # back to rest after this): pongs come every ping_interval.
        self._recompact = True

    def _guard_open(self):
        factory = self.factory
        if factory.guard is not None:
            factory.guard.upgraded(self.transport.getPeer())
        self._budget = SendBudget(factory.max_send_buffer_bytes, self._send_buffer_full)
        # WebSocketResource took this transport over from the HTTPChannel,
        # which is still registered as its producer and will never produce
        # again; a transport has one producer, so ours replaces it.
        self.transport.unregisterProducer()
        self.transport.registerProducer(self._budget, True)

    def dataReceived(self, data):
        """
        Autobahn's, without its debug log line (like L{sendData}'s, its
        arguments were formatted on every read), and with a fast path for
        the frames chat is made of (L{_text_frames}); whatever that does
        not take goes to Autobahn.
        """
        if (
            self.state == self.STATE_OPEN and self.current_frame is None and not self.data
            and not self.inside_message
        ):
            data = self._text_frames(data)
            if not data:
                return
        self._dataReceived(data)
        if self._recompact and self.state == self.STATE_OPEN:
            self._recompact = False
            self._compact()

    def _text_frames(self, data):
        """
        Take the complete, small, masked, unfragmented, uncompressed text
        frames at the start of C{data} in one go: unmask, validate UTF-8,
        and hand each to L{_text_frame}.  Autobahn's receive path spends
        most of a small message's time on bookkeeping (a masker object per
        frame, a call per frame stage, a Deferred per message:
        docs/performance.md); here a frame is a few integer operations.

        Only frames Autobahn would accept as they are get here; anything
        else (a control frame, a fragment, a frame over the size limits, a
        length not minimally encoded, bad UTF-8, an incomplete frame, or any
        logging or timing option on) stops the fast path, and Autobahn gets
        the rest of C{data} from that frame on, so its checks, close codes
        and buffering apply as ever.  Called only when Autobahn holds no
        partial frame or message.

        @return: the part of C{data} not taken (all of it, or C{b""}).
        """
        if self.logFrames or self.logOctets or self.trackedTimings or not self.applyMask or self._listeners:
            return data
        end = len(data)
        at = 0
        stats = self.trafficStats
        frame_limit = self.maxFramePayloadSize
        message_limit = self.maxMessagePayloadSize
        while end - at > 6:
            # FIN, no RSV bits, opcode 1 (text); masked, with a 7- or 16-bit length.
            if data[at] != 0x81:
                break
            length = data[at + 1]
            if length < 0x80 + 126:
                if length <= 0x80:
                    break  # unmasked, or empty
                length -= 0x80
                start = at + 6
            elif length == 0x80 + 126:
                length = (data[at + 2] << 8) | data[at + 3]
                if length < 126:
                    break  # not minimally encoded: Autobahn fails it
                start = at + 8
            else:
                break
            stop = start + length
            if stop > end or 0 < frame_limit < length or 0 < message_limit < length:
                break
            mask = int.from_bytes(data[start - 4:start] * ((length + 3) >> 2), "little")
            payload = (
                int.from_bytes(data[start:stop], "little") ^ (mask & ((1 << (length << 3)) - 1))
            ).to_bytes(length, "little")
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError:
                break  # Autobahn closes 1007
            stats.incomingOctetsWireLevel += stop - at
            stats.incomingOctetsWebSocketLevel += length
            stats.incomingOctetsAppLevel += length
            stats.incomingWebSocketFrames += 1
            stats.incomingWebSocketMessages += 1
            if self.autoPingTimeoutCall and self.autoPingRestartOnAnyTraffic:
                self._cancelAutoPingTimeoutCall()
            at = stop
            self._text_frame(payload, text)
            if self.state != self.STATE_OPEN:
                break
        return data[at:] if at else data

    def _text_frame(self, payload, text):
        """
        One text message from the fast path: C{payload} is its UTF-8 bytes,
        C{text} the same decoded.  Autobahn would call C{onMessage}.
        """
        self._onMessage(payload, False)

    def sendData(self, data, sync=False, chopsize=None):
        """
        Autobahn's one path to the transport; counted against the budget.

        The common case (nothing queued, no chopping) is Autobahn's own
        code without its debug log line, whose arguments Autobahn formats
        on every write whether or not debug is on: that formatting was
        about an eighth of the CPU of a fan-out (docs/performance.md).
        """
        if sync or chopsize or self.send_queue:
            if self.send_queue is _NO_SEND_QUEUE:
                self.send_queue = _SendQueue()
            super().sendData(data, sync, chopsize)
        else:
            self.transport.write(data)
            if self.state == self.STATE_OPEN:
                self.trafficStats.outgoingOctetsWireLevel += len(data)
            elif self.state == self.STATE_CONNECTING or self.state == self.STATE_PROXY_CONNECTING:
                self.trafficStats.preopenOutgoingOctetsWireLevel += len(data)
            if self.logOctets:
                self.logTxOctets(data, False)
        budget = self._budget
        if budget is not None and budget.paused:
            budget.wrote(len(data))

    def _send_buffer_full(self, unsent):
        self._log.warn(
            "websocket {peer} is not reading: {unsent} bytes queued over a full buffer; closing {code}",
            peer=self.client or _peer_host(self.transport), unsent=unsent, code=errors.CLOSE_SLOW_CONSUMER,
        )
        if self.state == self.STATE_OPEN:
            # Queued behind what it has not read; no more writes are made
            # once the state is CLOSING, so the buffer stops growing here.
            self.sendCloseFrame(
                code=errors.CLOSE_SLOW_CONSUMER, reasonUtf8=b"not reading fast enough", isReply=False
            )
        else:
            # We may be inside Autobahn's frame processing: drop next turn.
            self.factory.clock.callLater(0, self.dropConnection, True)
        self._slow_consumer()

    def _slow_consumer(self):
        """Hook: the connection was let go for not reading."""


# What _compact leaves an attribute to: a class attribute of the same value.
for _name, _value in {**AT_REST, **dict.fromkeys(HANDSHAKE_LEFTOVERS)}.items():
    setattr(_GuardedMixin, _name, _value)
for _name in MESSAGE_LEFTOVERS:
    if not hasattr(_GuardedMixin, _name):
        setattr(_GuardedMixin, _name, None)
_GuardedMixin.websocket_extensions_in_use = ()
_GuardedMixin._valid_events = _EVENTS
_GuardedMixin._results = _NO_RESULTS
_GuardedMixin.utf8validator = _LazyValidator()
_GuardedMixin.send_queue = _NO_SEND_QUEUE = _NoSendQueue()
_GuardedMixin.is_open = _LazyFuture("is_open")
_GuardedMixin.is_closed = _LazyFuture("is_closed")


@implementer(IConnection)
class ChatServerProtocol(_GuardedMixin, WebSocketServerProtocol):
    """
    One /ws connection: Autobahn's protocol in front of a L{Session}.

    C{onConnect} decides the upgrade (Origin 403, caps 429/503, ticket 401,
    broker 503; see L{chatd.handshake}) before any ticket is spent; once
    open, text frames go to the session and the session's answers come back
    through the L{IConnection} methods.  Closing (for any reason) releases
    the connection's slot and quits its rooms once.
    """

    _log = Logger()  # not .log: Autobahn claims it

    session = None
    connection_id = None
    _left = None
    _opened = None
    _received = 0
    _sent = 0
    stomp = None  # a StompWire when this connection speaks STOMP (docs/stomp.md)
    _sent_counted = False

    def onConnect(self, request):
        """
        Decide the upgrade (L{chatd.handshake}): plain calls, and the
        ticket's redemption chained on the broker's Deferred, which the
        embedded broker has fired already, so the whole decision is made in
        this call (a coroutine and its Deferred per connection cost more
        than the rest of it; docs/performance.md).

        @return: a Deferred of the subprotocol, or the subprotocol.
        @raise ConnectionDeny: the refusal, counted and logged.
        """
        try:
            ticket, stomp = self._check_request(request)
            if ticket is None:
                return self._subprotocol(stomp, request)
            redeeming = defer.ensureDeferred(self.factory.broker.redeem_ticket(ticket))
        except Exception:
            return self._refuse(Failure(), request)  # raises ConnectionDeny
        self._deciding_on(redeeming)
        redeeming.addCallback(self._redeemed, stomp, request)
        redeeming.addErrback(self._refuse, request)
        return redeeming

    def _check_request(self, request):
        """
        The checks before any ticket is redeemed: draining, Origin, the
        caps (which take this connection's slot).

        @return: C{(ticket, stomp)}: the ticket to redeem (L{None} for a
            STOMP client that brings its JWT in CONNECT) and the STOMP
            route chosen, if any.
        @raise handshake.Deny: the refusal.
        """
        factory = self.factory
        self.client = factory.proxies.client(
            _peer_host(self.transport), request.headers.get("x-forwarded-for")
        )
        if factory.drain_state is not None and factory.drain_state.draining:
            raise handshake.Deny(errors.HTTP_UNAVAILABLE, "server draining, reconnect")
        handshake.check_origin(request.headers.get("origin"), factory.settings.server.allowed_origins)
        stomp = stomp_transport.choose(request.path, request.protocols, factory.settings.stomp)
        # [stomp] connect_auth: a STOMP client may bring its JWT in CONNECT instead.
        ticketless = (
            stomp is not None and factory.settings.stomp.connect_auth and "ticket" not in request.params
        )
        ticket = None if ticketless else handshake.ticket_from_params(request.params)
        factory.admit(self)
        self.principal = None
        return ticket, stomp

    def _redeemed(self, grant, stomp, request):
        """
        The redeemed ticket's C{grant} checked: the subprotocol to answer with.

        @raise handshake.Deny: for an unknown, used or expired ticket.
        """
        self.principal = handshake.check_grant(grant, self.factory.clock.seconds())
        return self._subprotocol(stomp, request)

    def _subprotocol(self, stomp, request):
        """The subprotocol of an accepted upgrade (a STOMP one, or chatd.v1 if offered)."""
        if stomp is not None:
            self.stomp = stomp_transport.StompWire(self, stomp.sockjs)
            return stomp.subprotocol
        return handshake.choose_subprotocol(request.protocols, (messages.SUBPROTOCOL,))

    def _refuse(self, failure, request):
        """
        Turn a failed decision into Autobahn's C{ConnectionDeny}: a
        L{handshake.Deny} as it says (a broker that cannot redeem: 503),
        counted and logged within the refusal budget; anything else is 500,
        logged once with its traceback (Autobahn would log it as a bare
        warning, quoting the error, and answer 500 with it).

        @raise ConnectionDeny: always.
        """
        factory = self.factory
        if failure.check(BrokerUnavailable):
            failure = Failure(handshake.Deny(errors.HTTP_UNAVAILABLE, "chat unavailable"))
        if failure.check(ConnectionDeny):
            failure.raiseException()
        if not failure.check(handshake.Deny):
            self._log.failure("error in onConnect for {path}", failure, path=redact_uri(request.path))
            self._refusal = handshake.Deny(errors.HTTP_INTERNAL_ERROR, "internal error")
            raise ConnectionDeny(errors.HTTP_INTERNAL_ERROR, "internal error")
        deny = failure.value
        self._refusal = deny
        factory.metrics.count_rejected(deny.status)
        factory.refusals.note(
            self._log, self.client or _peer_host(self.transport), redact_uri(request.path), deny.status, deny.reason,
        )
        raise ConnectionDeny(deny.status, deny.reason)

    def onOpen(self):
        self._guard_open()
        if self._close_on_open is not None:
            self.close(*self._close_on_open)
            return
        factory = self.factory
        self.connection_id = factory.new_connection_id()
        self._opened = factory.clock.seconds()
        if factory.access_log:  # the access log's line of an accepted upgrade
            self._log.info(
                "websocket {peer} {user} connected as {connection}",
                peer=self.client,
                user=printable(self.principal.name) if self.principal else "(CONNECT to tell)",
                connection=self.connection_id,
            )
        if self.stomp is not None:
            self.session = self.stomp.open(self.principal)
            return
        self.session = Session(
            self.principal, self, factory.hub, factory.verifier, factory.settings.limits, factory.clock,
            metrics=factory.metrics, expiries=factory.expiries,
        )
        self.session.open()

    def _text_frame(self, payload, text):
        """A text message off the fast path: a chatd.v1 session takes the text as it is."""
        session = self.session
        if session is None or self.stomp is not None:
            self.onMessage(payload, False)
            return
        self._received += 1
        session.received(text)

    def onMessage(self, payload, isBinary):
        if self.session is None:
            return
        if self.stomp is not None:
            self._received += 1
            self.stomp.received(payload, isBinary)
            return
        if isBinary:
            self.close(errors.CLOSE_UNSUPPORTED_DATA, "text frames only")
            return
        # Autobahn validated UTF-8 already (invalid: close 1007).
        self._received += 1
        self.session.received(payload.decode("utf-8"))

    def close(self, code, reason):
        """C{close()}; a STOMP over SockJS connection says C{c[code, reason]} first."""
        if self.stomp is not None and self.state == self.STATE_OPEN:
            self.stomp.closing(code, reason)
        super().close(code, reason)

    def onClose(self, wasClean, code, reason):
        factory = self.factory
        if self.stomp is not None:
            self.stomp.stop()
        factory.release(self, self._leave())
        if self.connection_id is not None:
            factory.metrics.count_close(code)
            # Frames are counted per connection only (one increment per
            # frame); the metric takes a connection's count when it closes,
            # and reads the open ones' at scrape time (see sent_by_open).
            factory.metrics.count_sent(self._sent)
            self._sent_counted = True
            # One line per session, for the log shippers (docs/operations.md).
            self._log.info(
                "websocket {connection} of {user} from {peer} ended after {duration} s: "
                "close {code}, {received} messages in, {sent} out",
                event="websocket_session_ended",
                connection=self.connection_id, user=printable(self._user_name()), peer=self.client,
                duration=round(factory.clock.seconds() - self._opened, 3), code=code,
                received=self._received, sent=self._sent,
            )

    def _user_name(self):
        """The display name; a connect_auth STOMP connection knows it from CONNECT on."""
        if self.principal is not None:
            return self.principal.name
        if self.stomp is not None and self.stomp.session is not None:
            return self.stomp.session.user or "-"
        return "-"

    def count_sent(self):
        """One more frame written to this client (for the session log line and the metrics)."""
        self._sent += 1

    def _leave(self):
        """
        Quit every room, once; later frames from the client are ignored.

        @return: a Deferred that fires once the broker heard every QUIT, or
            L{None} when the connection never had a session.
        """
        if self.session is not None:
            session, self.session = self.session, None
            self._left = session.closed()
        return self._left

    def _slow_consumer(self):
        # Leave the rooms now rather than when the close handshake times
        # out, so members see the QUIT at once.  Not synchronously: this runs
        # inside a write, possibly in the middle of the hub's fan-out.
        self.factory.clock.callLater(0, self._leave)

    # IConnection

    def send_text(self, text):
        """
        IConnection API.  The common case (no compression, fragmentation,
        timing, frame logging or server masking; within the message limit)
        is framed here: what Autobahn's C{sendMessage} and C{sendFrame} write
        and count, without their per-frame bookkeeping (WELCOME on every
        open, every answer to one client).
        """
        if self.state != self.STATE_OPEN:
            return
        payload = text.encode("utf-8")
        length = len(payload)
        if (
            self._perMessageCompress is not None or self.trackedTimings or self.logFrames or self.maskServerFrames
            or 0 < self.autoFragmentSize < length or 0 < self.maxMessagePayloadSize < length
        ):
            self.sendMessage(payload)
            self._sent += 1
            return
        stats = self.trafficStats
        stats.outgoingWebSocketMessages += 1
        stats.outgoingOctetsAppLevel += length
        stats.outgoingOctetsWebSocketLevel += length
        stats.outgoingWebSocketFrames += 1
        if length <= 125:
            head = _TEXT_HEADS[length]
        elif length <= 0xFFFF:
            head = b"\x81\x7e" + length.to_bytes(2, "big")
        else:
            head = b"\x81\x7f" + length.to_bytes(8, "big")
        self.sendData(head + payload)
        self._sent += 1

    def send_shared(self, text):
        """
        IConnection API: C{text} is framed once for all who get it (see
        L{ChatServerFactory.frame}).
        """
        factory = self.factory
        # factory.frame(text), without the call for all but the first member
        self.send_prepared(factory._framed if text is factory._framed_text else factory.frame(text))

    def send_prepared(self, prepared):
        """
        Send a message framed once for many connections (the event being
        fanned out, chatd.v1 or STOMP), if open; counted as sent.

        This runs once per member per event, so the common case (no
        compression, nothing queued in Autobahn) writes the frame here:
        what C{sendPreparedMessage} and L{sendData} would do, in one call.

        @param prepared: an Autobahn C{PreparedMessage} from the factory's
            C{prepareMessage}.
        """
        if self.state != self.STATE_OPEN:
            return
        self._sent += 1
        if self._perMessageCompress is not None or self.send_queue or self.logOctets:
            self.sendPreparedMessage(prepared)
            return
        data = prepared.payloadHybi
        self.transport.write(data)
        self.trafficStats.outgoingOctetsWireLevel += len(data)
        budget = self._budget
        if budget is not None and budget.paused:
            budget.wrote(len(data))

    def when_drained(self):
        if self._budget is None:
            return defer.succeed(None)
        return self._budget.when_drained()


class EchoServerProtocol(_GuardedMixin, WebSocketServerProtocol):
    """/echo, for the Autobahn Testsuite only: the options of /ws, no auth."""

    _log = Logger()

    def onOpen(self):
        self._guard_open()

    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)


def _protocol_options(settings):
    limits, ws = settings.limits, settings.websocket
    return dict(
        maxFramePayloadSize=limits.max_message_bytes,
        maxMessagePayloadSize=limits.max_message_bytes,
        failByDrop=False,
        openHandshakeTimeout=ws.handshake_timeout,
        closeHandshakeTimeout=5,
        autoPingInterval=ws.ping_interval,
        autoPingTimeout=ws.ping_timeout,
        perMessageCompressionAccept=_deflate_acceptor(limits.max_message_bytes) if ws.compression else None,
        # setProtocolOptions resets this to False on every call, and then
        # Autobahn answers "Origin: null" (sandboxed iframes, file: pages)
        # with 400 itself.  Let it through: handshake.check_origin refuses
        # it with 403 like any origin not allowed.
        allowNullOrigin=True,
    )


class _OptionsOnClass:
    """
    A factory whose protocols get its WebSocket options as class attributes.

    Autobahn copies every option (about 30) from the factory onto each new
    connection, as instance attributes, and pretty-prints them all for a
    debug line that is formatted whether or not debug is on: 12 % of the
    CPU of a new connection, and a doubled attribute dict (1.7 KiB more per
    idle connection; docs/performance.md).  Autobahn copies only options
    the protocol does not have yet, so the factory builds its protocols from
    a subclass that has them all, made once per set of options, and tells
    Autobahn there is nothing to copy.
    """

    _configured = None  # the subclass, until the options change

    def setProtocolOptions(self, *args, **kwargs):
        super().setProtocolOptions(*args, **kwargs)
        self._configured = None

    def resetProtocolOptions(self):
        super().resetProtocolOptions()
        self._configured = None

    def buildProtocol(self, addr):
        configured = self._configured
        if configured is None or configured.__bases__[0] is not self.protocol:
            configured = self._configured = self._configure(self.protocol)
        protocol = configured()
        protocol.factory = self
        return protocol

    def _configure(self, base):
        namespace = {}
        for name in base.CONFIG_ATTRS:
            value = getattr(self, name)
            # A function (perMessageCompressionAccept) must not become a method.
            namespace[name] = staticmethod(value) if callable(value) else value
        namespace.update(CONFIG_ATTRS=(), __module__=base.__module__, __qualname__=base.__qualname__)
        return type(base.__name__, (base,), namespace)


class ChatServerFactory(_OptionsOnClass, WebSocketServerFactory):
    """
    What every /ws connection shares: its dependencies, the caps on open
    WebSockets, the set of open connections (for the 1001 drain) and the
    frame of the event being fanned out.

    @ivar connections: the admitted connections, until they close.
    """

    protocol = ChatServerProtocol

    def __init__(self, settings, broker, hub, verifier, guard, clock,
                 metrics=None, drain_state=None, proxies=None):
        """
        @param broker: the L{chatd.broker.interfaces.IBroker} tickets are
            redeemed at.
        @param hub: the L{chatd.hub.Hub} sessions talk to.
        @param verifier: the L{chatd.auth.TokenVerifier} for AUTH.
        @param guard: the listener's L{chatd.guard.ConnectionGuard}, told of
            each open, or L{None}.
        @param clock: an C{IReactorTime}.
        @param metrics: the service's L{chatd.metrics.Metrics} (a private
            one when L{None}).
        @param drain_state: the L{chatd.drain.DrainState}: while draining,
            upgrades get 503.
        @param proxies: L{chatd.proxies.TrustedProxies}, who the client is
            for the per-address cap and the logs.
        """
        super().__init__(server=SERVER_NAME)
        # Autobahn's timers (handshake timeouts, auto-ping) on our clock, for
        # a fraction of txaio's memory per timer (chatd.timers).
        self._batched_timer = BatchedTimer(clock)
        self.metrics = metrics if metrics is not None else Metrics()
        self.drain_state = drain_state
        self.proxies = proxies if proxies is not None else TrustedProxies()
        self.settings = settings
        self.broker = broker
        self.hub = hub
        self.verifier = verifier
        self.guard = guard
        self.clock = clock
        self.expiries = Expiries(clock)  # the token expiries of its sessions, chatd.v1 and STOMP
        # [server] access_log: a line per accepted upgrade, as per HTTP request.
        self.access_log = settings.server.access_log
        self.max_send_buffer_bytes = settings.limits.max_send_buffer_bytes
        self.caps = ConnectionCaps(
            settings.limits.max_connections, settings.limits.max_connections_per_ip
        )
        self.connections = set()
        self.refusals = _RefusalLog(clock)
        self._empty = OneShotObserverList()
        self._ids = itertools.count(1)
        self._framed_text = None
        self._framed = None
        self.stomp_shared = stomp_transport.SharedFrames(self.prepareMessage)
        self.setProtocolOptions(**_protocol_options(settings))

    def sent_by_open(self):
        """Frames written to the connections whose count the metric has not taken yet."""
        return sum(p._sent for p in self.connections if not p._sent_counted)

    def new_connection_id(self):
        """A connection id unique across instances (the broker's instance id, a counter)."""
        return f"{self.broker.instance_id}:{next(self._ids)}"

    def frame(self, text):
        """
        The prepared (framed) message for C{text}, made once per event: the
        hub sends one event to every local member as the same str object,
        so the last one framed is kept, by identity (it stays referenced, so
        its id cannot be reused meanwhile).

        @return: an Autobahn C{PreparedMessage}.
        """
        if text is not self._framed_text:
            self._framed = self.prepareMessage(text.encode("utf-8"))
            self._framed_text = text
        return self._framed

    def admit(self, protocol):
        """
        Take a connection slot for C{protocol}, held until L{release}.

        @raise handshake.Deny: 429 when its address holds
            C{max_connections_per_ip} already, 503 when C{max_connections}
            are open.
        """
        try:
            self.caps.admit(protocol, protocol.client or _peer_host(protocol.transport))
        except CapReached as refused:
            raise handshake.Deny(refused.status, refused.reason) from None
        if not self.connections and self._empty.fired:
            self._empty.reset()
        self.connections.add(protocol)

    def release(self, protocol, left=None):
        """
        Give C{protocol}'s slot back; called on every close, admitted or not.

        @param left: a Deferred that fires once the connection's QUITs
            reached the broker, or L{None}.  The connection counts as open
            (for L{when_empty}, so the broker is not stopped under its
            QUITs) until then; its slot is free at once.
        """
        self.caps.release(protocol)
        if left is None:
            self._gone(protocol)
        else:
            left.addBoth(lambda _: self._gone(protocol))

    def _gone(self, protocol):
        self.connections.discard(protocol)
        if not self.connections:
            self._empty.fire_if_not_fired(None)

    def when_empty(self):
        """A Deferred that fires once no WebSocket connection is open."""
        if not self.connections:
            return defer.succeed(None)
        return self._empty.when_fired()

    def close_all(self, code, reason):
        """Close every open connection with C{code} (the shutdown's 1001)."""
        for protocol in list(self.connections):
            protocol.close(code, reason)


class EchoServerFactory(_OptionsOnClass, WebSocketServerFactory):
    """/echo's factory: /ws's protocol options, the guard, nothing else."""

    protocol = EchoServerProtocol

    def __init__(self, settings, guard, clock):
        super().__init__(server=SERVER_NAME)
        self._batched_timer = BatchedTimer(clock)
        self.guard = guard
        self.clock = clock
        self.metrics = Metrics()  # not the service's: /echo is for the testsuite only
        self.refusals = _RefusalLog(clock)
        self.max_send_buffer_bytes = settings.limits.max_send_buffer_bytes
        self.setProtocolOptions(**_protocol_options(settings))
