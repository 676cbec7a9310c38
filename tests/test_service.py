# -*- test-case-name: tests.test_service -*-
"""
chatd.service in process: L{make_chat_service} on a C{MemoryReactorClock}
builds one listener (the guard around TLS around the Site), and stops the
clients (1001), then the listener, then the broker, with the grace period
on the clock.  A real Autobahn client reaches /ws through the whole stack
over in-memory transports.  tests/test_tap.py and tests/test_flow.py run
the same service in a real twistd.
"""

import dataclasses
import json

import pytest
import pytest_twisted
import txaio
from autobahn.twisted.testing import create_memory_agent
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory

from chatd import admin, config, drain, eager, errors, guard, service, tls, web
from chatd.auth import Principal
from tests.fakes import MemoryClient, Pumps

SECRET = b"s" * 32
DRAIN_TIME = config.defaults().server.drain_time


def make_settings(dev_dir=None, **overrides):
    overrides.setdefault("server__endpoint", "tcp:8443:interface=127.0.0.1")
    overrides.setdefault("server__allowed_origins", ("*",))
    overrides.setdefault("server__tls", False)
    overrides.setdefault("websocket__ping_interval", 0)
    if dev_dir is not None:
        overrides.update(
            server__tls=True,
            tls__certificate=f"{dev_dir}/fullchain.pem",
            tls__private_key=f"{dev_dir}/privkey.pem",
        )
    return dataclasses.replace(config.defaults(**overrides), jwt_key=SECRET)


@pytest.fixture
def reactor():
    """A MemoryReactorClock that also runs Autobahn's (txaio's) timers."""
    saved = txaio.config.loop
    reactor = txaio.config.loop = MemoryReactorClock()
    yield reactor
    txaio.config.loop = saved


def listening_factory(reactor):
    """The one factory the service listens with."""
    assert reactor.sslServers == [] and reactor.unixServers == []
    [(port, factory, backlog, interface)] = reactor.tcpServers
    assert (port, interface) == (8443, "127.0.0.1")
    return factory


def test_one_tls_listener(reactor, dev_dir):
    """With TLS on: one TCP listener, eager, the guard around TLS around the direct upgrades around the Site."""
    settings = make_settings(dev_dir[0])
    top = service.make_chat_service(settings, reactor, tls.certificate_options(settings))
    assert reactor.tcpServers == []  # built, not listening yet
    top.startService()
    factory = listening_factory(reactor)
    assert isinstance(factory, guard.GuardedFactory)
    assert isinstance(factory.wrappedFactory, TLSMemoryBIOFactory)
    direct = factory.wrappedFactory.wrappedFactory
    assert isinstance(direct, web.DirectUpgrades)
    assert isinstance(direct.wrappedFactory, web.ChatSite)
    assert list(direct.routes) == [b"/ws"]
    # Its TCP connections send at once (chatd/eager.py).
    [listener] = [child for child in top if isinstance(child, StreamServerEndpointService)]
    assert isinstance(listener.endpoint, eager.EagerWrites)


class _Answer(Protocol):
    """Sends one HTTP/1.0 request; C{done} fires with all the server sent, once it closes."""

    def __init__(self, request):
        self.request = request
        self.received = []
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.received))


@pytest_twisted.ensureDeferred
async def test_admin_listener_sends_eagerly_on_a_real_port():
    """
    The admin listener listens through EagerWrites as the public one does:
    on a real loopback port its connections are EagerServers, and /livez
    answers through one.
    """
    from twisted.internet import reactor

    settings = make_settings(admin__endpoint="tcp:0:interface=127.0.0.1")
    top = service.make_chat_service(settings, reactor, environ={})
    [listener] = [child for child in top if isinstance(getattr(child, "factory", None), admin.AdminSite)]
    assert isinstance(listener.endpoint, eager.EagerWrites)
    site = listener.factory
    transports = []

    def build(addr, build=site.buildProtocol):
        """The site's channel, noting the transport the port connects it to."""
        channel = build(addr)
        make = channel.makeConnection

        def connect(transport):
            transports.append(transport)
            make(transport)

        channel.makeConnection = connect
        return channel

    site.buildProtocol = build
    port = await listener.endpoint.listen(site)
    try:
        assert port.transport is eager.EagerServer
        client = _Answer(b"GET /livez HTTP/1.0\r\n\r\n")
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, timeout=10)
        await endpoints.connectProtocol(endpoint, client)
        answer = await client.done.addTimeout(10, reactor)
        assert answer.startswith(b"HTTP/1.0 200 ") and answer.endswith(b'{"status": "alive"}')
        [transport] = transports
        assert isinstance(transport, eager.EagerServer)
    finally:
        await port.stopListening()


def test_one_plain_listener(reactor):
    """With TLS off (behind a proxy): the guard around the direct upgrades around the Site."""
    top = service.make_chat_service(make_settings(), reactor)
    top.startService()
    factory = listening_factory(reactor)
    assert isinstance(factory.wrappedFactory, web.DirectUpgrades)
    assert isinstance(factory.wrappedFactory.wrappedFactory, web.ChatSite)
    assert top.broker.running




class Running:
    """A started service and Autobahn clients connected to its listener in memory."""

    def __init__(self, reactor, settings=None):
        self.reactor = reactor
        self.top = service.make_chat_service(settings or make_settings(), reactor)
        self.top.startService()
        self.factory = listening_factory(reactor)
        self.pumps = Pumps()
        peers = iter(range(40000, 41000))
        self.agent = create_memory_agent(
            reactor, self.pumps,
            lambda: self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", next(peers))),
        )
        self.clients = []

    def connect(self, sub):
        ticket = f"t-{sub}"
        grant = Principal(sub=sub, name=sub, exp=int(self.reactor.seconds()) + 3600)
        self.top.broker.issue_ticket(ticket, grant, 30)
        opened = []
        self.agent.open(f"ws://localhost:8443/ws?ticket={ticket}", {}, protocol_class=MemoryClient).addCallback(
            opened.append
        )
        self.pumps.flush()
        [client] = opened
        self.clients.append(client)
        return client

    def send(self, client, frame):
        client.sendMessage(json.dumps(frame).encode())
        self.pumps.flush()


@pytest.fixture
def running(reactor):
    return Running(reactor)


def spy_on_broker_stop(top):
    """Record the broker's rooms at the moment it is stopped."""
    rooms_then = []
    original = top.broker.stopService

    def stop():
        rooms_then.append(top.broker.list_rooms().result)
        return original()

    top.broker.stopService = stop
    return rooms_then


def test_stop_closes_1001_then_listener_then_broker(running):
    """
    Stopping closes each WebSocket with 1001; once they have gone (their
    QUITs through the still-running broker), the listener and then the
    broker stop.
    """
    alice, bob = running.connect("alice"), running.connect("bob")
    for client in (alice, bob):
        running.send(client, {"type": "ENTER", "room": "lobby"})
    rooms_then = spy_on_broker_stop(running.top)
    stopped = running.top.stopService()
    assert not stopped.called and running.top.broker.running
    running.reactor.advance(DRAIN_TIME)  # every 1001 is sent within drain_time
    running.pumps.flush()  # the clients answer the close
    assert (alice.closed, bob.closed) == (errors.CLOSE_GOING_AWAY, errors.CLOSE_GOING_AWAY)
    assert stopped.called and not running.top.broker.running
    assert rooms_then == [[]]  # both had QUIT through the broker before it stopped


def test_stop_hands_shutdown_quits_to_the_webhook_after_the_broker_stops(reactor):
    """
    With a webhook: the QUITs of the connections closed on shutdown are
    queued for it before it stops, and it stops (sending them, within its
    timeout) after the broker, whose goodbye (Redis) makes QUITs too.
    """
    settings = make_settings(webhook__url="https://backend.example/hook", webhook__events=frozenset({"quit"}))
    running = Running(reactor, dataclasses.replace(settings, webhook_secret=b"w" * 32))
    hooks = running.top.webhooks
    alice = running.connect("alice")
    running.send(alice, {"type": "ENTER", "room": "lobby"})
    seen = []
    original = hooks.stopService

    def stop():
        seen.append((hooks.queued_events, running.top.broker.running))
        return original()

    hooks.stopService = stop
    done = []
    running.top.stopService().addCallback(done.append)
    reactor.advance(DRAIN_TIME)  # every 1001 is sent within drain_time
    running.pumps.flush()
    assert seen == [(1, False)]  # alice's QUIT queued; the broker stopped first
    assert done == []  # the POST has no answer (memory reactor)
    reactor.advance(settings.webhook.timeout)
    assert len(done) == 1


def test_disconnect_during_the_opening_handshake(running, monkeypatch):
    """
    The server API disconnects a user whose ticket was redeemed while the
    upgrade is still under way: the connection is closed with 4003 as it
    opens and never gets a WELCOME; another user's opening is untouched.
    """
    from chatd import handshake

    choose = handshake.choose_subprotocol

    def disconnect_then_choose(offered, supported):
        if not running.top.broker.disconnect("mallory", "banned").called:  # the memory broker: at once
            raise AssertionError("the disconnect did not happen at once")
        return choose(offered, supported)

    monkeypatch.setattr(handshake, "choose_subprotocol", disconnect_then_choose)
    mallory = running.connect("mallory")
    alice = running.connect("alice")
    running.pumps.flush()
    assert mallory.closed == errors.CLOSE_DISCONNECTED
    assert [f["type"] for f in mallory.received] == []
    assert alice.closed is None and alice.received[0]["type"] == "WELCOME"


def test_stop_waits_out_the_grace_for_silent_clients(running):
    """A client that never answers the 1001 holds the stop for drain_time + GRACE, no longer."""
    running.connect("alice")
    stopped = running.top.stopService()  # nothing pumped: the client never answers
    running.reactor.advance(DRAIN_TIME + drain.GRACE - 0.1)
    assert not stopped.called and running.top.broker.running
    running.reactor.advance(0.2)
    assert stopped.called and not running.top.broker.running


def test_stop_with_no_clients_is_immediate(running):
    """With no WebSocket open, stopping does not wait."""
    stopped = running.top.stopService()
    assert stopped.called and not running.top.broker.running


def test_listener_serves_http_through_the_guard(running):
    """Through the guard and the Site, an upgrade reaches /ws and the guard lets it go."""
    alice = running.connect("alice")
    assert alice.received[0]["type"] == "WELCOME"
    server = running.pumps.pumps[-1].server
    assert server.upgraded  # the guard was told: no deadline, out of its caps
    running.reactor.advance(3600 - 1)
    assert alice.closed is None
