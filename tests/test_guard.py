# -*- test-case-name: tests.test_guard -*-
"""
The connection limits' bookkeeping, without sockets: per-address counting
(L{chatd.limits.ConnectionCaps}, L{chatd.limits.client_key}), the send
buffer budget (L{chatd.limits.SendBudget}) and the handshake guard
(L{chatd.guard.ConnectionGuard}) on a Clock with in-memory transports.
tests/test_abuse.py shows the same behaviour on a real twistd over TLS.
"""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from chatd import errors
from chatd.guard import ConnectionGuard
from chatd.limits import CapReached, ConnectionCaps, SendBudget, client_key


# --- client_key ------------------------------------------------------------------


def test_client_key_ipv4():
    """An IPv4 address counts as itself."""
    assert client_key("203.0.113.7") == "203.0.113.7"


def test_client_key_ipv6_counts_per_64():
    """IPv6 addresses count per /64: one subscriber usually holds the whole /64."""
    assert client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")


def test_client_key_mapped_and_other():
    """IPv4-mapped IPv6 counts as the IPv4 address; a non-IP peer as itself."""
    assert client_key("::ffff:203.0.113.7") == "203.0.113.7"
    assert client_key("/run/chatd.sock") == "/run/chatd.sock"


# --- ConnectionCaps --------------------------------------------------------------


def refusal(caps, key, host):
    with pytest.raises(CapReached) as refused:
        caps.admit(key, host)
    return refused.value.status


def test_per_address_cap_is_429():
    """Over its own share an address is refused with 429; another address is not."""
    caps = ConnectionCaps(max_total=10, max_per_address=2)
    caps.admit("a", "198.51.100.1")
    caps.admit("b", "198.51.100.1")
    assert refusal(caps, "c", "198.51.100.1") == errors.HTTP_TOO_MANY_REQUESTS
    caps.admit("d", "198.51.100.2")
    assert caps.count("198.51.100.1") == 2 and len(caps) == 3


def test_total_cap_is_503():
    """With every slot taken, a new address is refused with 503."""
    caps = ConnectionCaps(max_total=2, max_per_address=5)
    caps.admit("a", "198.51.100.1")
    caps.admit("b", "198.51.100.2")
    assert refusal(caps, "c", "198.51.100.3") == errors.HTTP_UNAVAILABLE


def test_per_address_checked_before_total():
    """An address at its own cap hears 429 even when all slots are taken too."""
    caps = ConnectionCaps(max_total=2, max_per_address=2)
    caps.admit("a", "198.51.100.1")
    caps.admit("b", "198.51.100.1")
    assert refusal(caps, "c", "198.51.100.1") == errors.HTTP_TOO_MANY_REQUESTS


def test_release_frees_the_slot_once():
    """Release gives the slot back; releasing again (or an unknown key) is harmless."""
    caps = ConnectionCaps(max_total=1, max_per_address=1)
    caps.admit("a", "198.51.100.1")
    caps.release("a")
    caps.release("a")
    caps.release("never-admitted")
    caps.admit("b", "198.51.100.1")
    assert len(caps) == 1 and caps.count("198.51.100.1") == 1


def test_memory_is_bounded_by_held_connections():
    """Addresses whose count drops to zero are forgotten (no growth with churn)."""
    caps = ConnectionCaps(max_total=10, max_per_address=10)
    for i in range(1000):
        caps.admit(i, f"10.0.{i // 256}.{i % 256}")
        caps.release(i)
    assert len(caps) == 0 and caps._per_address == {}


def test_admit_same_key_twice_takes_one_slot():
    """Admitting a key that holds a slot already does not count it twice."""
    caps = ConnectionCaps(max_total=1, max_per_address=1)
    caps.admit("a", "198.51.100.1")
    caps.admit("a", "198.51.100.1")
    assert len(caps) == 1


# --- SendBudget ------------------------------------------------------------------


def test_budget_counts_only_while_paused():
    """Writes while the transport keeps up cost nothing; while it is full they add up."""
    overflows = []
    budget = SendBudget(100, overflows.append)
    budget.wrote(10_000)
    assert budget.unsent == 0
    budget.pauseProducing()
    budget.wrote(60)
    budget.wrote(40)
    assert budget.unsent == 100 and overflows == []
    budget.wrote(1)
    assert overflows == [101] and budget.over


def test_budget_resets_when_the_buffer_drains():
    """resumeProducing means the buffer drained: the count starts again."""
    overflows = []
    budget = SendBudget(100, overflows.append)
    budget.pauseProducing()
    budget.wrote(90)
    budget.resumeProducing()
    budget.pauseProducing()
    budget.wrote(90)
    assert overflows == [] and budget.unsent == 90


def test_budget_overflows_once():
    """The slow-consumer callback runs once, however much more is written."""
    overflows = []
    budget = SendBudget(10, overflows.append)
    budget.pauseProducing()
    for _ in range(5):
        budget.wrote(100)
    assert overflows == [100]


# --- ConnectionGuard -----------------------------------------------------------------


class _Recorder(Protocol):
    def __init__(self):
        self.lost = False

    def connectionLost(self, reason):
        self.lost = True


def make_guard(timeout=10.0, max_total=100, max_per_address=100):
    clock = Clock()
    guard = ConnectionGuard(timeout, max_total, max_per_address, clock)
    listener = guard.wrap(Factory.forProtocol(_Recorder))
    listener.doStart()
    return guard, listener, clock


def connect(listener, host="198.51.100.1", port=40000):
    peer = IPv4Address("TCP", host, port)
    protocol = listener.buildProtocol(peer)
    if protocol is None:
        return None, None
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    return protocol, transport


def test_wrapper_provides_what_its_transport_provides():
    """
    The guard's wrapper declares its transport's interfaces (as Twisted's
    wrappers do); wrappers over the same kind of transport share one
    declaration, and another kind gets its own.
    """
    from twisted.internet.interfaces import ITCPTransport
    from zope.interface import directlyProvides, providedBy

    _, listener, _ = make_guard()
    first, transport = connect(listener, port=1)
    second, _ = connect(listener, port=2)
    assert set(providedBy(transport)) <= set(providedBy(first))
    assert first.__provides__ is second.__provides__
    assert not ITCPTransport.providedBy(first)
    peer = IPv4Address("TCP", "198.51.100.1", 3)
    tcp_like = StringTransport(peerAddress=peer)
    directlyProvides(tcp_like, ITCPTransport)
    third = listener.buildProtocol(peer)
    third.makeConnection(tcp_like)
    assert ITCPTransport.providedBy(third) and not ITCPTransport.providedBy(first)
    assert third.wrappedProtocol.transport is third and listener.protocols.keys() >= {first, second, third}


def test_silent_connection_is_aborted_at_the_deadline():
    """A connection that neither opens a WebSocket nor completes a request is aborted."""
    guard, listener, clock = make_guard(timeout=10)
    _, transport = connect(listener)
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting
    assert len(guard.pending) == 0


def test_bytes_do_not_extend_the_deadline():
    """A client dribbling bytes (slowloris) is aborted at the same deadline as a silent one."""
    guard, listener, clock = make_guard(timeout=10)
    protocol, transport = connect(listener)
    for _ in range(99):
        clock.advance(0.1)
        protocol.dataReceived(b"x")
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting and len(guard.pending) == 0


def test_upgraded_connection_has_no_deadline():
    """Once its WebSocket opens, the guard leaves the connection alone."""
    guard, listener, clock = make_guard(timeout=10)
    protocol, transport = connect(listener)
    guard.upgraded(transport.getPeer())
    clock.advance(1000)
    assert not transport.disconnecting
    assert len(guard.pending) == 0 and protocol.upgraded


def test_peer_address_kept_until_upgraded():
    """
    The guard's connection answers getPeer with the address its transport
    gave on connect until it is a WebSocket; an open WebSocket keeps none
    and asks its transport.
    """
    guard, listener, _ = make_guard()
    protocol, transport = connect(listener)
    taken = transport.peerAddr
    transport.peerAddr = IPv4Address("TCP", "192.0.2.9", 1)  # what the transport would say now
    assert protocol.getPeer() is taken
    guard.upgraded(taken)
    assert "_peer" not in vars(protocol)
    assert protocol.getPeer() is transport.peerAddr


def test_finished_request_rearms_the_deadline():
    """Each completed HTTP request buys another timeout; idle keep-alive ends after one."""
    guard, listener, clock = make_guard(timeout=10)
    _, transport = connect(listener)
    clock.advance(8)
    guard.request_done(transport.getPeer())
    clock.advance(8)
    assert not transport.disconnecting
    clock.advance(2.1)
    assert transport.disconnecting


def test_lost_connection_cancels_its_deadline():
    """A connection that goes away leaves no timer and no slot behind."""
    guard, listener, clock = make_guard(timeout=10)
    protocol, transport = connect(listener)
    protocol.connectionLost(None)
    assert clock.getDelayedCalls() == [] and len(guard.pending) == 0
    guard.request_done(transport.getPeer())  # late report for a gone connection
    assert clock.getDelayedCalls() == []


def test_deadlines_share_one_clock_call():
    """
    However many connections wait, the guard holds one clock call, for the
    soonest deadline; with none left waiting, it holds none.
    """
    guard, listener, clock = make_guard(timeout=10)
    first, _ = connect(listener, port=1)
    clock.advance(1)
    second, second_transport = connect(listener, port=2)
    assert len(clock.getDelayedCalls()) == 1
    first.connectionLost(None)
    assert len(clock.getDelayedCalls()) == 1  # now early for the second, which is fine
    clock.advance(9)  # the first's deadline: nothing due, the call moves on
    assert not second_transport.disconnecting and len(clock.getDelayedCalls()) == 1
    clock.advance(1)
    assert second_transport.disconnecting and clock.getDelayedCalls() == []


_STEPS = st.lists(
    st.tuples(
        st.sampled_from(["connect", "advance", "request_done", "upgraded", "lost"]),
        st.integers(0, 7),  # which connection (of those made so far, modulo)
        st.sampled_from([0.0, 0.5, 1.0, 2.5, 4.0, 7.5]),  # seconds, for advance
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(_STEPS)
def test_deadlines_as_one_timer_per_connection(steps):
    """
    Any sequence of accepts, finished requests, upgrades, lost connections
    and clock advances aborts exactly the connections, at exactly the
    moments, that a timer per connection (armed on accept and on each
    finished request, cancelled on upgrade and loss, as TimeoutMixin did)
    would; and the guard holds at most one clock call.
    """
    timeout = 4.0
    guard, listener, clock = make_guard(timeout=timeout)
    made = []  # (protocol, transport)
    due = {}  # index -> the moment a timer per connection would fire
    for action, which, seconds in steps:
        if action == "connect":
            made.append(connect(listener, port=len(made) + 1))
            due[len(made) - 1] = clock.seconds() + timeout
        elif action == "advance":
            clock.advance(seconds)
            for index, when in list(due.items()):
                if when <= clock.seconds():
                    del due[index]
        elif made:
            index = which % len(made)
            protocol, transport = made[index]
            if transport.disconnecting:
                continue  # aborted: the transport would report it lost, nothing else
            if action == "request_done" and not protocol.upgraded:
                guard.request_done(transport.getPeer())
                due[index] = clock.seconds() + timeout
            elif action == "upgraded":
                guard.upgraded(transport.getPeer())
                due.pop(index, None)
            elif action == "lost":
                protocol.connectionLost(None)
                transport.disconnecting = True  # gone: no more steps on it
                due.pop(index, None)
        aborted = {i for i, (_, transport) in enumerate(made) if transport.disconnecting}
        assert aborted.isdisjoint(due)
        assert {i for i in range(len(made)) if i not in aborted} <= set(due) | {
            i for i, (protocol, _) in enumerate(made) if protocol.upgraded
        }
        assert len(clock.getDelayedCalls()) == (1 if due else 0)


def test_handshake_cap_per_address_and_total():
    """
    Connections still in their handshake are capped per address; with every
    slot taken, the longest waiting is aborted to make room for a new one.
    """
    guard, listener, _ = make_guard(max_total=3, max_per_address=2)
    _, first = connect(listener, port=1)
    assert connect(listener, port=2)[0] is not None
    assert connect(listener, port=3)[0] is None  # third from the same address
    _, other = connect(listener, host="198.51.100.2", port=4)
    assert not first.disconnecting
    assert connect(listener, host="198.51.100.3", port=5)[0] is not None  # all three slots taken
    assert first.disconnecting and not other.disconnecting
    assert len(guard.pending) == 3


def test_eviction_takes_the_longest_waiting_not_an_upgraded_one():
    """An upgraded connection is out of the handshake stage and never evicted."""
    guard, listener, _ = make_guard(max_total=2, max_per_address=5)
    _, upgraded = connect(listener, host="198.51.100.1", port=1)
    guard.upgraded(upgraded.getPeer())
    _, waiting = connect(listener, host="198.51.100.2", port=2)
    _, newer = connect(listener, host="198.51.100.3", port=3)
    assert connect(listener, host="198.51.100.4", port=4)[0] is not None
    assert waiting.disconnecting and not newer.disconnecting and not upgraded.disconnecting


def test_pending_cap_per_address_from_settings():
    """The cap in effect is [limits] max_pending_per_ip, or max_connections_per_ip if smaller."""
    from chatd import config

    settings = config.replace(config.defaults(), limits__max_pending_per_ip=16, limits__max_connections_per_ip=100)
    guard = ConnectionGuard.from_settings(settings, Clock())
    assert guard.pending.max_per_address == 16 and guard.pending.max_total == 10000
    settings = config.replace(settings, limits__max_connections_per_ip=3)
    assert ConnectionGuard.from_settings(settings, Clock()).pending.max_per_address == 3


def test_trusted_proxy_is_not_one_address():
    """A trusted proxy's connections each count alone (it carries many clients); the total cap holds."""
    clock = Clock()
    guard = ConnectionGuard(10.0, 4, 1, clock, trusted_proxy=lambda host: host == "127.0.0.1")
    listener = guard.wrap(Factory.forProtocol(_Recorder))
    listener.doStart()
    proxied = [connect(listener, host="127.0.0.1", port=port)[1] for port in (1, 2, 3)]
    assert all(transport is not None for transport in proxied)
    assert connect(listener, host="198.51.100.1", port=4)[0] is not None
    assert connect(listener, host="198.51.100.1", port=5)[0] is None  # per address, untrusted
    # The total: a fifth makes room by evicting the longest waiting, never a fifth slot.
    assert connect(listener, host="127.0.0.1", port=6)[0] is not None
    assert proxied[0].disconnecting and not proxied[1].disconnecting
    assert len(guard.pending) == 4


def test_upgrade_frees_a_handshake_slot():
    """An opened WebSocket no longer counts against the handshake caps."""
    guard, listener, _ = make_guard(max_total=10, max_per_address=1)
    _, transport = connect(listener, port=1)
    assert connect(listener, port=2)[0] is None
    guard.upgraded(transport.getPeer())
    assert connect(listener, port=3)[0] is not None


def test_ipv6_addresses_share_their_64():
    """Two addresses in one IPv6 /64 share one per-address allowance."""
    guard, listener, _ = make_guard(max_per_address=1)
    first = IPv6Address("TCP", "2001:db8::1", 1)
    listener.buildProtocol(first).makeConnection(StringTransport(peerAddress=first))
    assert listener.buildProtocol(IPv6Address("TCP", "2001:db8::2", 2)) is None
    assert listener.buildProtocol(IPv6Address("TCP", "2001:db8:0:1::1", 3)) is not None


# --- on a real chatd ---------------------------------------------------------------


def _raw_request(server, request, timeout):
    """Send C{request} over TLS to C{server}; (seconds until the answer or EOF, the bytes)."""
    import socket
    import time

    from tests.support import client_tls

    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as raw:
        with client_tls().wrap_socket(raw) as tls:
            started = time.monotonic()
            tls.sendall(request)
            data = b""
            try:
                while len(data) < 65536:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except (socket.timeout, ConnectionResetError):
                pass
            return time.monotonic() - started, data


def test_header_line_over_16k_is_431_at_once(start_chatd):
    """
    A header line over twisted.web's 16 KiB line limit is answered 431 with
    a JSON body; twisted.web's default answered nothing and the client
    waited for the handshake deadline (10 s by default, 30 s here: the
    socket's 20 s timeout would expire first).
    """
    server = start_chatd(websocket__handshake_timeout="30")
    request = (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 17000 + b"\r\n\r\n")
    _, data = _raw_request(server, request, timeout=20)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), data[:200]
    assert b"application/json" in head
    assert json.loads(body)["error"] == "header_too_large"
    # The server carries on.
    assert _raw_request(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 10)[1].startswith(b"HTTP/1.1 200")


def _healthz_from(server, source):
    """GET /healthz over TLS from loopback address C{source}: the status line."""
    from tests import rawws
    from tests.support import client_tls

    with client_tls().wrap_socket(rawws.tcp_connect(server.port, source=source)) as tls:
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return tls.recv(4096).split(b"\r\n", 1)[0]


def test_idle_sockets_per_address_are_bounded(start_chatd):
    """
    A real chatd at the defaults: one address holds at most
    max_pending_per_ip (16) sockets that never start TLS; the 17th is
    closed at once (it used to be held, up to 100, for the whole 10 s
    deadline), and another address still gets its answer.
    """
    from tests import rawws

    server = start_chatd()
    idle = [rawws.tcp_connect(server.port, source="127.0.0.5") for _ in range(16)]
    extra = rawws.tcp_connect(server.port, source="127.0.0.5")
    try:
        assert rawws.ended(extra, 5)
        assert all(rawws.still_open(sock) for sock in idle)
        assert _healthz_from(server, "127.0.0.6") == b"HTTP/1.1 200 OK"
    finally:
        for sock in idle + [extra]:
            sock.close()
    assert "too many connections from your address" in server.log_text()


def test_full_handshake_stage_drops_the_longest_waiting(start_chatd):
    """
    Idle sockets from many addresses fill every handshake slot: a new client
    is still served, and the socket that waited longest is the one dropped
    (it used to be the newcomer refused, until the deadline freed a slot).
    """
    from tests import rawws

    server = start_chatd(limits__max_connections="4")
    idle = [rawws.tcp_connect(server.port, source=f"127.0.0.{10 + i}") for i in range(4)]
    try:
        assert all(rawws.still_open(sock) for sock in idle)
        assert _healthz_from(server, "127.0.0.20") == b"HTTP/1.1 200 OK"
        assert rawws.ended(idle[0], 5)
        assert all(rawws.still_open(sock) for sock in idle[1:])
    finally:
        for sock in idle:
            sock.close()
    assert "longest waiting of 4 connections in handshake" in server.log_text()
