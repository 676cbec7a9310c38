# -*- test-case-name: tests.test_ws -*-
"""
The WebSocket adapter: Autobahn in, L{chatd.session.Session} out.

docs/protocol.md is the contract.  The handshake is decided in
C{onConnect} (Origin, then ticket) so a refused client is answered with an
HTTP status and never upgraded.  Library defaults this module overrides, on
purpose: Autobahn's unlimited frame and message sizes, C{failByDrop} (which
drops TCP instead of closing with 1009/1007), its Origin check (400, we want
403), and C{sendClose}'s refusal of 1001/1003/1009 (we use
C{sendCloseFrame}).  Handshakes never reach twisted.web's access log, so
each outcome is logged here, redacted.
"""

import itertools

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from chatd import errors, handshake, messages
from chatd.errors import BrokerUnavailable
from chatd.hub import IConnection
from chatd.logs import printable, redact_uri
from chatd.session import Session


def _peer_host(transport):
    peer = transport.getPeer()
    return getattr(peer, "host", str(peer))


def _accept_deflate(offers):
    for offer in offers:
        if isinstance(offer, PerMessageDeflateOffer):
            return PerMessageDeflateOfferAccept(offer)
    return None


class _ClosingMixin:
    """C{close()} that can send any close code, once, only while open."""

    def close(self, code, reason):
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:120], isReply=False)


@implementer(IConnection)
class ChatServerProtocol(_ClosingMixin, WebSocketServerProtocol):
    _log = Logger()  # not .log: Autobahn claims it

    session = None
    connection_id = None

    def onConnect(self, request):
        d = defer.ensureDeferred(self._on_connect(request))
        d.addErrback(self._connect_failed, request)
        return d

    async def _on_connect(self, request):
        factory = self.factory
        origin = request.headers.get("origin")
        try:
            handshake.check_origin(origin, factory.settings.server.allowed_origins)
            ticket = handshake.ticket_from_params(request.params)
            try:
                grant = await factory.broker.redeem_ticket(ticket)
            except BrokerUnavailable:
                raise handshake.Deny(errors.HTTP_UNAVAILABLE, "chat unavailable") from None
            self.principal = handshake.check_grant(grant, factory.clock.seconds())
        except handshake.Deny as deny:
            self._log.info(
                "websocket {peer} {path} refused {status}: {reason}",
                peer=_peer_host(self.transport), path=redact_uri(request.path),
                status=deny.status, reason=deny.reason,
            )
            raise ConnectionDeny(deny.status, deny.reason)
        if not factory.admit(self):
            self._log.info("websocket {peer} refused 503: connection cap", peer=_peer_host(self.transport))
            raise ConnectionDeny(errors.HTTP_UNAVAILABLE, "too many connections")
        return handshake.choose_subprotocol(request.protocols, (messages.SUBPROTOCOL,))

    def _connect_failed(self, failure, request):
        if not failure.check(ConnectionDeny):
            # Autobahn would log this as a bare warning and answer 500.
            self._log.failure("error in onConnect for {path}", failure, path=redact_uri(request.path))
        return failure

    def onOpen(self):
        factory = self.factory
        self.connection_id = factory.new_connection_id()
        self._log.info(
            "websocket {peer} {user} connected as {connection}",
            peer=_peer_host(self.transport), user=printable(self.principal.name),
            connection=self.connection_id,
        )
        self.session = Session(
            self.principal, self, factory.hub, factory.verifier, factory.settings.limits, factory.clock
        )
        self.session.open()

    def onMessage(self, payload, isBinary):
        if self.session is None:
            return
        if isBinary:
            self.close(errors.CLOSE_UNSUPPORTED_DATA, "text frames only")
            return
        # Autobahn validated UTF-8 already (invalid: close 1007).
        self.session.received(payload.decode("utf-8"))

    def onClose(self, wasClean, code, reason):
        self.factory.release(self)
        if self.session is not None:
            session, self.session = self.session, None
            session.closed()
            self._log.info(
                "websocket {connection} closed ({code})", connection=self.connection_id, code=code
            )

    # IConnection

    def send_text(self, text):
        if self.state == self.STATE_OPEN:
            self.sendMessage(text.encode("utf-8"))

    def send_shared(self, frame):
        if self.state == self.STATE_OPEN:
            self.sendPreparedMessage(frame)


class EchoServerProtocol(_ClosingMixin, WebSocketServerProtocol):
    """/echo, for the Autobahn Testsuite only: the options of /ws, no auth."""

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
        perMessageCompressionAccept=_accept_deflate if ws.compression else None,
    )


class ChatServerFactory(WebSocketServerFactory):
    protocol = ChatServerProtocol

    def __init__(self, settings, broker, verifier, clock):
        super().__init__()
        self.settings = settings
        self.broker = broker
        self.verifier = verifier
        self.clock = clock
        self.hub = None  # set by the service once the hub exists
        self.connections = set()
        self._ids = itertools.count(1)
        self.setProtocolOptions(**_protocol_options(settings))

    def new_connection_id(self):
        return f"{self.broker.instance_id}:{next(self._ids)}"

    def prepare(self, text):
        return self.prepareMessage(text.encode("utf-8"))

    def admit(self, protocol):
        if len(self.connections) >= self.settings.limits.max_connections:
            return False
        self.connections.add(protocol)
        return True

    def release(self, protocol):
        self.connections.discard(protocol)

    def close_all(self, code, reason):
        for protocol in list(self.connections):
            protocol.close(code, reason)


def echo_factory(settings):
    factory = WebSocketServerFactory()
    factory.protocol = EchoServerProtocol
    factory.setProtocolOptions(**_protocol_options(settings))
    return factory
