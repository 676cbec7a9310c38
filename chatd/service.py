# -*- test-case-name: tests.test_service -*-
"""
Wiring: settings in, one C{MultiService} out.

C{makeChatService} only constructs (it runs before twistd forks and drops
privileges); connections, timers and listening start with the services.
On stop, WebSocket clients are closed with 1001 and the listener stops;
the broker stops only after both (see L{ChatService}).

The listener's factory is layered, outermost first: L{guard.ConnectionGuard}
(handshake deadline and caps, so it must sit outside TLS to cover the TLS
handshake), then TLS when it is on, then the Site.
"""

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from chatd import errors, guard, tls, web, ws
from chatd.auth import TokenVerifier
from chatd.hub import Hub

log = Logger()

SHUTDOWN_GRACE = 3.0  # seconds clients get to answer the 1001 close


def make_broker(settings, reactor):
    if settings.redis.url:
        from chatd.broker.redis import RedisBroker

        return RedisBroker.from_settings(settings, reactor)
    from chatd.broker.memory import MemoryBroker

    return MemoryBroker(
        reactor, settings.history.size, max_rooms=settings.limits.max_rooms,
        max_bytes=settings.history.max_bytes, ttl=settings.history.ttl,
        max_new_rooms_per_user=settings.limits.max_new_rooms_per_user,
    )


class ClientsService(Service):
    """Owns the WebSocket clients' lifetime: on stop, close each with 1001."""

    def __init__(self, factory, clock):
        self._factory = factory
        self._clock = clock

    def stopService(self):
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
    C{MultiService} stops all its children at once.  The broker has to go
    last: connections closed on shutdown still QUIT their rooms through it,
    and the Redis broker's goodbye must come after those QUITs, or the
    rooms would see two QUITs for one connection.
    """

    broker = None

    def stopService(self):
        Service.stopService(self)
        others = [s for s in reversed(list(self)) if s is not self.broker]
        stopped = defer.DeferredList([defer.maybeDeferred(s.stopService) for s in others])
        if self.broker is not None:
            stopped.addCallback(lambda _: self.broker.stopService())
        return stopped


def makeChatService(settings, reactor=None, tls_options=None):
    if reactor is None:
        from twisted.internet import reactor
    top = ChatService()
    broker = make_broker(settings, reactor)
    broker.setServiceParent(top)
    verifier = TokenVerifier.from_settings(settings)
    ws_factory = ws.ChatServerFactory(settings, broker, verifier, reactor)
    ws_factory.hub = Hub(broker, max_pending_bytes=settings.limits.max_send_buffer_bytes)
    echo = ws.echo_factory(settings, reactor) if settings.conformance.echo else None
    site = web.make_site(settings, broker, verifier, ws_factory, echo)
    factory = site
    if settings.server.tls:
        if tls_options is None:
            tls_options = tls.certificate_options(settings)
        factory = TLSMemoryBIOFactory(tls_options, False, site)
    connection_guard = guard.ConnectionGuard.from_settings(factory, settings, reactor)
    site.requestFactory = connection_guard.guard_requests(site.requestFactory)
    for ws_side in (ws_factory, echo):
        if ws_side is not None:
            ws_side.guard = connection_guard
    listener = strports.service(settings.server.endpoint, connection_guard, reactor=reactor)
    listener.setServiceParent(top)
    ClientsService(ws_factory, reactor).setServiceParent(top)
    top.site = site  # the tests use this
    top.guard = connection_guard
    top.broker = broker
    return top
