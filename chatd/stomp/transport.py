# -*- test-case-name: tests.test_stomp_transport -*-
"""
STOMP on chatd's WebSocket endpoints: which upgrades speak it, the wire
between an Autobahn protocol and a L{StompSession} (plain, or in SockJS
framing), and the resource at C{[stomp] sockjs_path}.

L{chatd.ws.ChatServerProtocol} serves both /ws and the SockJS URLs from
one factory, so the connection caps, the 1001 drain and the hub are the
same for every protocol: its C{onConnect} asks L{choose}, and a STOMP
connection gets a L{StompWire} in front of its session.
"""

import dataclasses
import secrets
from typing import Optional

from twisted.internet import task
from twisted.logger import Logger
from twisted.web.resource import Resource
from zope.interface import implementer

from chatd import errors, messages
from chatd.stomp import frames, sockjs
from chatd.stomp.session import EventFrames, IStompConnection, StompSession

log = Logger()


@dataclasses.dataclass(frozen=True)
class Choice:
    """A STOMP upgrade: the subprotocol to select (or none) and the framing."""

    subprotocol: Optional[str]
    sockjs: bool


def choose(path, offered, stomp):
    """
    How an upgrade at C{path} offering C{offered} subprotocols speaks.

    @param path: the request path (no query).
    @param stomp: the C{[stomp]} settings.
    @return: L{None} for chatd.v1, else a L{Choice}.  On /ws, chatd.v1
        wins when it is offered; otherwise the highest C{v1x.stomp}.
        Under C{sockjs_path} every WebSocket URL speaks STOMP.
    """
    if not stomp.enabled:
        return None
    prefix = stomp.sockjs_path + "/"
    if path.startswith(prefix):
        kind = sockjs.route(path[len(prefix):].split("/"))
        if kind == sockjs.SOCKJS_WEBSOCKET:
            return Choice(None, True)
        return Choice(frames.stomp_subprotocol(offered), False)
    if messages.SUBPROTOCOL in offered:
        return None
    subprotocol = frames.stomp_subprotocol(offered)
    return Choice(subprotocol, False) if subprotocol else None


# IStompConnection.framing: a STOMP frame per WebSocket message, or inside SockJS's a["..."].
PLAIN = "plain"
SOCKJS = "sockjs"


class SharedFrames:
    """
    What an instance's STOMP connections share: the L{EventFrames} of the
    event being fanned out, each MESSAGE prepared as a WebSocket message
    of its framing (plain, or in SockJS's C{a[...]}) once for every
    connection alike.
    """

    def __init__(self, prepare):
        """@param prepare: the factory's C{prepareMessage}."""
        self._prepare = prepare
        self.events = EventFrames(self.prepared)

    def prepared(self, data, framing):
        """The prepared WebSocket message for the STOMP frame C{data} in C{framing}."""
        return self._prepare(_sockjs_payload(data) if framing == SOCKJS else data)


def sockjs_message_limit(max_frame_bytes):
    """
    The WebSocket message cap of a SockJS connection whose STOMP frames are
    capped at C{max_frame_bytes}: C{["..."]} around the frame with every
    unit escaped as C{\\uXXXX}.
    """
    return 6 * max_frame_bytes + 16


def _sockjs_payload(data):
    return sockjs.messages_frame([data.decode("utf-8")]).encode("utf-8")


@implementer(IStompConnection)
class StompWire:
    """
    One STOMP connection's WebSocket side: STOMP frames out (in SockJS's
    C{a[...]} when it is SockJS), client messages in, C{o}/C{h}/C{c}.

    @param protocol: the L{chatd.ws.ChatServerProtocol}; its C{factory}
        has C{hub}, C{verifier}, C{settings}, C{clock} and C{stomp_shared}
        (a L{SharedFrames}).
    """

    def __init__(self, protocol, in_sockjs):
        self._protocol = protocol
        self._sockjs = in_sockjs
        if in_sockjs:
            # The cap is on STOMP frames (the parser's); a SockJS message
            # may spell each UTF-16 unit of one as \uXXXX (sockjs-client
            # escapes every surrogate), so the WebSocket message may be up
            # to six times the frame.
            limit = sockjs_message_limit(protocol.factory.settings.limits.max_message_bytes)
            protocol.maxMessagePayloadSize = protocol.maxFramePayloadSize = limit
        self._shared = protocol.factory.stomp_shared
        self.framing = SOCKJS if in_sockjs else PLAIN
        # IStompConnection API, once per member per event: the protocol's
        # own write of a message framed once (it checks the state, counts
        # and guards the send buffer as for chatd.v1's events).
        self.send_shared_frame = protocol.send_prepared
        self._heartbeat = None
        self._carry = ""  # half a surrogate pair that ended a SockJS message
        self.session = None

    @property
    def connection_id(self):
        return self._protocol.connection_id

    def open(self, principal):
        """
        The WebSocket is open: start the session (and SockJS's C{o} and C{h}).

        @param principal: the ticket's principal, or L{None} (connect_auth).
        @return: the L{StompSession}.
        """
        factory = self._protocol.factory
        if self._sockjs:
            self._protocol.sendMessage(sockjs.OPEN.encode("ascii"))
            self._heartbeat = task.LoopingCall(self._sockjs_heartbeat)
            self._heartbeat.clock = factory.clock
            self._heartbeat.start(sockjs.HEARTBEAT_SECONDS, now=False)
        self.session = StompSession(
            self, principal, factory.hub, factory.verifier, factory.settings, factory.clock,
            self._shared.events, metrics=getattr(factory, "metrics", None),
            expiries=getattr(factory, "expiries", None),
        )
        self.session.open()
        return self.session

    def received(self, payload, is_binary):
        """One WebSocket message from the client."""
        if not self._sockjs:
            # STOMP may come in text or binary messages; the parser reads bytes.
            self.session.received(payload)
            return
        if is_binary:
            self._protocol.close(errors.CLOSE_UNSUPPORTED_DATA, "SockJS sends text")
            return
        try:
            texts = sockjs.parse_client(payload.decode("utf-8"))
        except sockjs.SockJSError as e:
            self._protocol.close(errors.CLOSE_UNSUPPORTED_DATA, str(e))
            return
        if not texts:
            return
        text = self._carry + "".join(texts)
        # stomp.js cuts frames at 16384 UTF-16 units, which can split a
        # surrogate pair across messages: keep a trailing high surrogate
        # for the next one, and join pairs before encoding.
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, self._carry = text[:-1], text[-1]
        else:
            self._carry = ""
        data = text.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
        self.session.received(data.encode("utf-8", "surrogatepass"))

    def closing(self, code, reason):
        """The connection is being closed: SockJS says so in C{c[...]} first."""
        if self._sockjs:
            self._protocol.sendMessage(sockjs.close_frame(code, reason).encode("utf-8"))
        self.stop()

    def stop(self):
        """Stop SockJS's heart-beat (on close, for any reason)."""
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()

    def _sockjs_heartbeat(self):
        if self._protocol.state == self._protocol.STATE_OPEN:
            self._protocol.sendMessage(sockjs.HEARTBEAT.encode("ascii"))

    # IStompConnection

    def send_frame(self, data):
        """IStompConnection API"""
        protocol = self._protocol
        if protocol.state == protocol.STATE_OPEN:
            protocol.sendMessage(_sockjs_payload(data) if self._sockjs else data)
            protocol.count_sent()

    def close(self, code, reason):
        """IStompConnection API"""
        self._protocol.close(code, reason)

    def when_drained(self):
        """IStompConnection API"""
        return self._protocol.when_drained()


# --- the SockJS resource ----------------------------------------------------------


class _Info(Resource):
    """C{/info}: WebSocket only, no cookies, any origin (the ticket is the guard)."""

    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json; charset=UTF-8")
        request.setHeader(b"cache-control", b"no-store, no-cache, must-revalidate, max-age=0")
        return sockjs.info_body(secrets.randbelow(2**32))


class _Greeting(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=UTF-8")
        return sockjs.GREETING


class SockJSResource(Resource):
    """
    C{[stomp] sockjs_path}: C{/info}, the greeting, and the two WebSocket
    URLs (both the same L{autobahn.twisted.resource.WebSocketResource}
    as /ws's factory); every other path, SockJS's HTTP fallbacks included,
    is C{not_found}.
    """

    def __init__(self, websocket, not_found):
        """
        @param websocket: the WebSocketResource of the chat factory.
        @param not_found: the resource that answers 404.
        """
        super().__init__()
        self._websocket = websocket
        self._not_found = not_found
        self._info = _Info()
        self._greeting = _Greeting()

    def getChild(self, path, request):
        segments = [path] + list(request.postpath)
        try:
            kind = sockjs.route([segment.decode("ascii") for segment in segments])
        except UnicodeDecodeError:
            kind = None
        if kind in (sockjs.SOCKJS_WEBSOCKET, sockjs.RAW_WEBSOCKET):
            return self._websocket
        if kind == sockjs.INFO:
            return self._info
        if kind == sockjs.GREET:
            return self._greeting
        return self._not_found

    def render_GET(self, request):
        return self._greeting.render_GET(request)
