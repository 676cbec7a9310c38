# -*- test-case-name: tests.test_service -*-
"""
Wiring: settings in, one C{MultiService} out.

L{make_chat_service} only constructs (it runs before twistd forks and drops
privileges); connections, timers and listening start with the services.
It builds in dependency order and hands each part what it needs: broker,
hub, token verifier and connection guard first, then the WebSocket
factories and the Site, then the listening factory around them.  Nothing is
set on a part after it is built.

The listener's factory is layered, outermost first: L{guard.GuardedFactory}
(handshake deadline and caps, so it must sit outside TLS to cover the TLS
handshake), then TLS when it is on, then the Site.

On stop, WebSocket clients are closed with 1001 and the listener stops;
the broker stops only after both (see L{ChatService}).
"""

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import server

from chatd import errors, guard, tls, web, ws
from chatd.api import ApiResource
from chatd.api_backend import BrokerApiBackend, ControlDispatcher
from chatd.auth import TokenVerifier
from chatd.hub import Hub
from chatd.webhooks import AcceptingBroker, WebhookService

log = Logger()

SHUTDOWN_GRACE = 3.0  # seconds clients get to answer the 1001 close


def make_broker(settings, reactor):
    """The Redis broker when C{[redis] url} is set, else the embedded one."""
    if settings.redis.url:
        from chatd.broker.redis import RedisBroker

        return RedisBroker.from_settings(settings, reactor)
    from chatd.broker.memory import MemoryBroker

    return MemoryBroker(
        reactor, settings.history.size, max_rooms=settings.limits.max_rooms,
        max_bytes=settings.history.max_bytes, ttl=settings.history.ttl,
        max_new_rooms_per_user=settings.limits.max_new_rooms_per_user,
    )


def _connections_of(ws_factory):
    """C{sub -> the open WebSocket connections of that user here}, for the server API's disconnect."""

    def connections_of(sub):
        return [
            protocol for protocol in ws_factory.connections
            if getattr(getattr(protocol, "principal", None), "sub", None) == sub
        ]

    return connections_of


class ClientsService(Service):
    """Owns the WebSocket clients' lifetime: on stop, close each with 1001."""

    def __init__(self, factory, clock):
        """
        @param factory: the L{ws.ChatServerFactory} whose connections these are.
        @param clock: the C{IReactorTime} the grace period runs on.
        """
        self._factory = factory
        self._clock = clock

    def stopService(self):
        """Close every client with 1001; fires once all left, or the grace is over."""
        super().stopService()
        if not self._factory.connections:
            return None
        log.info("closing {count} websocket connections", count=len(self._factory.connections))
        self._factory.close_all(errors.CLOSE_GOING_AWAY, "server shutting down")
        drained = self._factory.when_empty()
        drained.addTimeout(SHUTDOWN_GRACE, self._clock)
        drained.addErrback(self._grace_over)
        return drained

    def _grace_over(self, failure):
        """Past the grace period the listener and broker stop regardless."""
        failure.trap(defer.TimeoutError)
        log.warn(
            "{count} websocket connections still open after {grace}s; stopping anyway",
            count=len(self._factory.connections), grace=SHUTDOWN_GRACE,
        )


class ChatService(MultiService):
    """
    chatd's top service: the broker, and the services that use it.

    C{MultiService} stops all its children at once.  The broker has to go
    last: connections closed on shutdown still QUIT their rooms through it,
    and the Redis broker's goodbye must come after those QUITs, or the
    rooms would see two QUITs for one connection.

    The webhook service, when there is one, stops between the two: it sends
    what the others' shutdown produced (the QUITs of closed connections)
    before the broker goes.

    @ivar broker: the broker service, stopped after every other child.
    @ivar webhooks: the L{chatd.webhooks.WebhookService} or L{None}.
    """

    def __init__(self, broker, *others, webhooks=None):
        """
        @param broker: the broker; started first, stopped last.
        @param others: the services that use it (listener, clients).
        @param webhooks: stopped after C{others}, before the broker.
        """
        super().__init__()
        self.broker = broker
        self.webhooks = webhooks
        broker.setServiceParent(self)
        for service in others:
            service.setServiceParent(self)
        if webhooks is not None:
            webhooks.setServiceParent(self)

    def stopService(self):
        """Stop the other children (in reverse), then the webhooks, then the broker."""
        Service.stopService(self)
        last = (self.broker, self.webhooks)
        others = [s for s in reversed(list(self)) if s not in last]
        stopped = defer.DeferredList([defer.maybeDeferred(s.stopService) for s in others])
        if self.webhooks is not None:
            stopped.addCallback(lambda _: self.webhooks.stopService())
        stopped.addCallback(lambda _: self.broker.stopService())
        return stopped


def make_chat_service(settings, reactor=None, tls_options=None):
    """
    Build chatd from its settings.

    @param settings: L{chatd.config.Settings}.
    @param reactor: the reactor to listen and time with; the global one
        when L{None} (imported here, never at module level).
    @param tls_options: the listener's TLS options when C{[server] tls} is
        on; made from C{[tls]} when L{None} (twistd's C{Options} make them
        before start-up, so a bad key stops it with one line).
    @return: a L{ChatService}, not started.
    """
    if reactor is None:
        from twisted.internet import reactor
    broker = make_broker(settings, reactor)
    hooks = WebhookService.from_settings(settings, reactor)
    # What this instance's hub and server API accept goes to the webhook from here.
    chat_broker = broker if hooks is None else AcceptingBroker(broker, hooks)
    hub = Hub(chat_broker, max_pending_bytes=settings.limits.max_send_buffer_bytes)
    verifier = TokenVerifier.from_settings(settings)
    connection_guard = guard.ConnectionGuard.from_settings(settings, reactor)
    ws_factory = ws.ChatServerFactory(settings, chat_broker, hub, verifier, connection_guard, reactor)
    chat_broker.set_control(ControlDispatcher(_connections_of(ws_factory), hub.kick))
    api_resource = ApiResource.from_settings(settings, BrokerApiBackend(chat_broker))
    echo_factory = None
    if settings.conformance.echo:
        echo_factory = ws.EchoServerFactory(settings, connection_guard, reactor)
    site = web.make_site(
        settings, broker, verifier, ws_factory, echo_factory,
        request_factory=connection_guard.guard_requests(server.Request), reactor=reactor,
        api_resource=api_resource,
    )
    listening = site
    if settings.server.tls:
        if tls_options is None:
            tls_options = tls.certificate_options(settings)
        listening = TLSMemoryBIOFactory(tls_options, False, site)
    listener = strports.service(
        settings.server.endpoint, connection_guard.wrap(listening), reactor=reactor
    )
    return ChatService(broker, listener, ClientsService(ws_factory, reactor), webhooks=hooks)
