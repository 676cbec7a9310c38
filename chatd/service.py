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
handshake), then TLS when it is on, then L{web.DirectUpgrades} (a first
request that upgrades /ws goes straight to the WebSocket factory), then
the Site.

On stop, WebSocket clients are closed with 1001 and the listener stops;
the broker stops only after both (see L{ChatService}).
"""

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger

from chatd import admin, drain, eager, errors, guard, systemd, tls, web, ws
from chatd.api import ApiResource
from chatd.api_backend import BrokerApiBackend, ControlDispatcher
from chatd.auth import TokenVerifier
from chatd.hub import Hub
from chatd.metrics import Metrics, certificate_expiry
from chatd.proxies import TrustedProxies
from chatd.reload import ReloadableServerTLS, Reloader, ReloadService
from chatd.webhooks import AcceptingBroker, WebhookService

log = Logger()


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


def user_connections(ws_factory):
    """C{sub -> the open WebSocket connections of that user here}, for the server API's disconnect."""

    def sub_of(protocol):
        principal = getattr(protocol, "principal", None)
        if principal is not None:
            return principal.sub
        # A STOMP connection with connect_auth learns its user from CONNECT.
        return getattr(getattr(protocol, "session", None), "sub", None)

    def connections_of(sub):
        return [protocol for protocol in ws_factory.connections if sub_of(protocol) == sub]

    return connections_of


class ClientsService(Service):
    """
    Owns the WebSocket clients' lifetime: on stop, the drain (see
    L{chatd.drain}): the state says draining at once (probes and upgrades
    answer 503), systemd hears STOPPING=1, and the clients are closed with
    1001 across C{[server] drain_time}.
    """

    def __init__(self, factory, clock, drain_time=0.0, drain_state=None, notifier=None):
        """
        @param factory: the L{ws.ChatServerFactory} whose connections these are.
        @param clock: the C{IReactorTime} the drain runs on.
        @param drain_time: seconds to spread the closes over.
        @param drain_state: the L{drain.DrainState} to set.
        @param notifier: a L{systemd.Notifier}.
        """
        self._factory = factory
        self._clock = clock
        self._drain_time = drain_time
        self._drain_state = drain_state if drain_state is not None else drain.DrainState()
        self._notifier = notifier

    def stopService(self):
        """The drain; fires once all left, or at drain_time + GRACE."""
        super().stopService()
        self._drain_state.draining = True
        if self._notifier is not None:
            self._notifier.stopping(f"draining {len(self._factory.connections)} connections")
        return drain.drain(
            self._factory.connections,
            lambda protocol: protocol.close(errors.CLOSE_GOING_AWAY, "server going away"),
            self._drain_time, self._clock, self._factory.when_empty,
        )


class ChatService(MultiService):
    """
    chatd's top service: the broker, and the services that use it.

    C{MultiService} stops all its children at once.  The broker has to go
    last: connections closed on shutdown still QUIT their rooms through it,
    and the Redis broker's goodbye must come after those QUITs, or the
    rooms would see two QUITs for one connection.

    The webhook service, when there is one, stops after the broker: it sends
    what the others' shutdown produced, the QUITs of closed connections and
    those of the Redis broker's goodbye (connections still open after the
    drain), which the webhook would miss if it stopped first.

    @ivar broker: the broker service, stopped after the clients and listeners.
    @ivar webhooks: the L{chatd.webhooks.WebhookService} or L{None}.
    """

    def __init__(self, broker, clients, *others, webhooks=None, notifier=None):
        """
        @param broker: the broker; started first, stopped last.
        @param clients: the L{ClientsService}; stopped (drained) first, while
            the listeners still answer (503 to upgrades and probes).
        @param others: the other services that use the broker (listeners).
        @param webhooks: stopped last, after the broker.
        @param notifier: a L{systemd.Notifier}, told READY=1 once started
            and the broker is usable.
        """
        super().__init__()
        self.broker = broker
        self.clients = clients
        self.webhooks = webhooks
        self._notifier = notifier if notifier is not None else systemd.Notifier(None)
        broker.setServiceParent(self)
        for service in others:
            service.setServiceParent(self)
        clients.setServiceParent(self)
        if webhooks is not None:
            webhooks.setServiceParent(self)

    def startService(self):
        """
        Start every child (a listener that cannot bind raises here), then
        READY=1 once the broker can serve (Redis connected and subscribed).
        """
        super().startService()
        when_available = getattr(self.broker, "when_available", None)
        ready = defer.maybeDeferred(when_available) if when_available else defer.succeed(None)
        ready.addCallback(lambda _: self._notifier.ready("serving"))
        ready.addErrback(lambda f: log.failure("readiness", f))

    def stopService(self):
        """
        Drain the clients, then stop the other children (in reverse), then
        the broker, then the webhooks.
        """
        Service.stopService(self)
        last = (self.broker, self.clients, self.webhooks)
        others = [s for s in reversed(list(self)) if s not in last]
        stopped = defer.maybeDeferred(self.clients.stopService)
        stopped.addBoth(lambda _: defer.DeferredList([defer.maybeDeferred(s.stopService) for s in others]))
        stopped.addCallback(lambda _: self.broker.stopService())
        if self.webhooks is not None:
            webhooks = self.webhooks
            stopped.addBoth(lambda result: defer.maybeDeferred(webhooks.stopService).addCallback(lambda _: result))
        return stopped


def make_chat_service(settings, reactor=None, tls_options=None, environ=None):
    """
    Build chatd from its settings.

    @param settings: L{chatd.config.Settings}.
    @param reactor: the reactor to listen and time with; the global one
        when L{None} (imported here, never at module level).
    @param tls_options: the listener's TLS options when C{[server] tls} is
        on; made from C{[tls]} when L{None} (twistd's C{Options} make them
        before start-up, so a bad key stops it with one line).
    @param environ: the environment systemd's variables are read from
        (C{NOTIFY_SOCKET}, C{WATCHDOG_USEC}); C{os.environ} when L{None}.
    @return: a L{ChatService}, not started.
    """
    if reactor is None:
        from twisted.internet import reactor
    broker = make_broker(settings, reactor)
    hooks = WebhookService.from_settings(settings, reactor)
    # What this instance's hub and server API accept goes to the webhook from here.
    chat_broker = broker if hooks is None else AcceptingBroker(broker, hooks)
    # The TLS layer's writes of a reactor turn, which the hub's fan-out of a
    # Redis burst flushes a slice of members at a time (docs/performance.md).
    turn = tls.TurnFlush(reactor) if settings.server.tls else None
    hub = Hub(
        chat_broker, max_pending_bytes=settings.limits.max_send_buffer_bytes,
        flush_writes=turn.flush_now if turn is not None else None,
    )
    metrics = Metrics()
    chat_broker.set_feed(
        metrics.timed_feed(hub.deliver, hub.local_users),
        metrics.timed_burst(hub.deliver_burst, hub.local_users),
    )
    drain_state = drain.DrainState(broker.is_available)
    proxies = TrustedProxies(settings.server.trusted_proxies)
    notifier = systemd.Notifier.from_environ(environ)
    verifier = TokenVerifier.from_settings(settings)
    connection_guard = guard.ConnectionGuard.from_settings(settings, reactor)
    ws_factory = ws.ChatServerFactory(
        settings, chat_broker, hub, verifier, connection_guard, reactor,
        metrics=metrics, drain_state=drain_state, proxies=proxies,
    )
    chat_broker.set_control(ControlDispatcher(user_connections(ws_factory), hub.kick))
    api_resource = ApiResource.from_settings(settings, BrokerApiBackend(chat_broker))
    metrics.watch(
        connections=lambda: len(ws_factory.connections), rooms=hub.room_count,
        broker_up=broker.is_available, webhooks=hooks, sent_by_open=ws_factory.sent_by_open,
    )
    echo_factory = None
    if settings.conformance.echo:
        echo_factory = ws.EchoServerFactory(settings, connection_guard, reactor)
    site = web.make_site(
        settings, broker, verifier, ws_factory, echo_factory,
        request_factory=connection_guard.guard_requests(web.ChatRequest), reactor=reactor,
        api_resource=api_resource, drain_state=drain_state, proxies=proxies,
    )
    routes = {b"/ws": ws_factory}
    if echo_factory is not None:
        routes[b"/echo"] = echo_factory
    listening = web.DirectUpgrades(site, routes)
    server_tls = None
    if settings.server.tls:
        if tls_options is None:
            tls_options = tls.certificate_options(settings)
        server_tls = ReloadableServerTLS(tls_options)
        metrics.certificate_expiry = certificate_expiry(tls_options.certificate)
        listening = tls.CoalescingTLSFactory(server_tls, listening, reactor, turn)
    others = [eager.service(
        settings.server.endpoint, connection_guard.wrap(listening), reactor=reactor
    )]
    if settings.admin.endpoint:
        admin_site = admin.make_admin_site(metrics, drain_state.readiness, api_resource=api_resource)
        others.append(eager.service(settings.admin.endpoint, admin_site, reactor=reactor))
    reloader = Reloader(
        settings, verifier, server_tls, notifier, metrics, lambda: drain_state.draining
    )
    others.append(ReloadService(reloader, reactor))
    watchdog = systemd.WatchdogService.from_environ(notifier, reactor, environ)
    if watchdog is not None:
        others.append(watchdog)
    clients = ClientsService(ws_factory, reactor, settings.server.drain_time, drain_state, notifier)
    return ChatService(broker, clients, *others, webhooks=hooks, notifier=notifier)
