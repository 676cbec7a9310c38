# -*- test-case-name: tests.test_eager -*-
"""
chatd.eager: TCP connections that send at once when nothing is buffered.

The transport is tested on real loopback TCP sockets (the kernel's partial
sends, EAGAIN and reset connections are what it is about) with a
C{MemoryReactorClock} standing in for the reactor, so each test sees whether the
socket was left to the reactor to watch and drives C{doWrite} itself.  The
endpoint wrapper is tested on the real reactor with real listening ports:
TCP, a socket adopted as systemd hands it over, and a UNIX socket it must
leave alone.
"""

import select
import socket

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, endpoints, error, interfaces, protocol, tcp, unix
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from chatd import eager

WAIT = 5.0  # seconds any single socket wait may take
SMALL_BUFFER = 4096  # the kernel doubles it, and rounds up to its minimum


class Recorder(protocol.Protocol):
    """Records connectionLost calls (a failed write must not make one)."""

    def __init__(self):
        self.lost = []

    def connectionLost(self, reason):
        self.lost.append(reason)


@implementer(interfaces.IPushProducer)
class Producer:
    """A streaming producer that records being paused and resumed."""

    def __init__(self):
        self.calls = []

    def pauseProducing(self):
        self.calls.append("pause")

    def resumeProducing(self):
        self.calls.append("resume")

    def stopProducing(self):
        self.calls.append("stop")


@implementer(interfaces.IPullProducer)
class PullProducer:
    """A pull producer: Twisted asks it for more whenever its buffer empties."""

    def __init__(self):
        self.asked = 0

    def resumeProducing(self):
        self.asked += 1

    def stopProducing(self):
        pass


def tcp_pair(small=False):
    """
    A connected loopback TCP pair: (server socket, peer socket).  With
    C{small}, both kernel buffers are small, so a few KiB fill them.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        peer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if small:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)
        peer.settimeout(WAIT)
        peer.connect(listener.getsockname())
        listener.settimeout(WAIT)
        server, _ = listener.accept()
    finally:
        listener.close()
    if small:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    return server, peer


@pytest.fixture
def pair():
    """An L{eager.EagerServer} on one end of a loopback pair, the peer socket, and the reactor."""
    made = []

    def make(small=False, cls=eager.EagerServer):
        server, peer = tcp_pair(small)
        reactor = MemoryReactorClock()
        proto = Recorder()
        transport = cls(server, proto, server.getpeername(), None, 0, reactor)
        proto.makeConnection(transport)
        made.append((server, peer))
        return transport, peer, reactor

    yield make
    for server, peer in made:
        server.close()
        peer.close()


def receive(peer, count):
    """Exactly C{count} bytes from the peer socket, waiting at most L{WAIT} per read."""
    chunks = []
    while count > 0:
        chunk = peer.recv(min(count, 65536))
        assert chunk, "the connection closed early"
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def buffered(transport):
    """How many bytes Twisted holds for the transport."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def drain(transport, peer, reactor, expected):
    """
    Let the peer read while the reactor's part (doWrite while watched) runs,
    until it has C{expected} bytes and Twisted holds nothing: everything the
    peer got.

    Counting bytes, not stopping at the first empty read: with small kernel
    buffers the last bytes sent may still be in the sender's socket buffer,
    moving to the peer's, when the peer first finds nothing to read.
    """
    got = []
    received = 0
    peer.setblocking(False)
    for _ in range(10_000):
        if transport in reactor.getWriters():
            assert transport.doWrite() is None
        if received >= expected and not buffered(transport) and transport not in reactor.getWriters():
            break
        try:
            data = peer.recv(65536)
        except BlockingIOError:
            if not select.select([peer], [], [], WAIT)[0] and transport not in reactor.getWriters():
                pytest.fail(f"{expected - received} bytes never arrived")
            continue
        got.append(data)
        received += len(data)
    else:
        pytest.fail("the transport never drained")
    return b"".join(got)


def test_write_sends_at_once(pair):
    """With nothing buffered, a write is sent in the call: the reactor is not asked to watch the socket."""
    transport, peer, reactor = pair()
    transport.write(b"hello")
    assert reactor.getWriters() == []
    assert buffered(transport) == 0
    assert receive(peer, 5) == b"hello"
    transport.writeSequence([b"a", b"bc", b""])
    assert reactor.getWriters() == []
    assert receive(peer, 3) == b"abc"


def test_twisted_server_waits_for_the_reactor(pair):
    """The same write on Twisted's own transport waits for doWrite: what the eager path saves."""
    transport, peer, reactor = pair(cls=tcp.Server)
    transport.write(b"hello")
    assert reactor.getWriters() == [transport]
    assert buffered(transport) == 5


def test_partial_send_buffers_the_rest_in_order(pair):
    """A write the kernel takes only part of: the rest is buffered and watched, later writes queue behind it."""
    transport, peer, reactor = pair(small=True)
    big = bytes(range(256)) * 2048  # 512 KiB: far more than both small buffers
    transport.write(big)
    assert 0 < buffered(transport) < len(big)
    assert reactor.getWriters() == [transport]
    transport.write(b"after")  # must not overtake what is buffered
    assert buffered(transport) > len(b"after")
    assert drain(transport, peer, reactor, len(big) + 5) == big + b"after"
    assert transport.connected and transport.protocol.lost == []


def test_full_kernel_buffer_buffers_everything(pair):
    """EAGAIN (the kernel's buffer full, nothing sent): all of the write is buffered and watched."""
    transport, peer, reactor = pair(small=True)
    # Fill the kernel's buffers directly, as a peer that stopped reading would.
    filler = b"f" * 65536
    sent = 0
    for _ in range(1000):
        try:
            sent += transport.socket.send(filler)
        except BlockingIOError:
            break
    else:
        pytest.fail("the kernel buffer never filled")
    transport.write(b"queued")
    assert buffered(transport) == len(b"queued")
    assert reactor.getWriters() == [transport]
    assert drain(transport, peer, reactor, sent + 6) == b"f" * sent + b"queued"


def test_streaming_producer_paused_only_when_the_kernel_refuses(pair):
    """A streaming producer is paused once the buffer (what the kernel refused) passes bufferSize, and resumed once drained."""
    transport, peer, reactor = pair(small=True)
    producer = Producer()
    transport.registerProducer(producer, True)
    transport.write(b"x" * 1000)
    assert producer.calls == []  # all taken by the kernel: nothing held
    big = b"y" * (transport.bufferSize * 4)
    transport.write(big)
    assert buffered(transport) > transport.bufferSize
    assert producer.calls == ["pause"]
    assert drain(transport, peer, reactor, 1000 + len(big)) == b"x" * 1000 + big
    assert producer.calls == ["pause", "resume"]


def test_send_error_is_reported_by_do_write_not_write(pair):
    """A reset connection: write neither raises nor calls connectionLost; the reactor's doWrite meets the error."""
    transport, peer, reactor = pair()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    peer.close()  # with linger 0: a reset
    assert select.select([transport.socket], [], [], WAIT)[0], "the reset never arrived"
    transport.write(b"to nobody")
    assert transport.protocol.lost == []
    assert transport.connected
    assert reactor.getWriters() == [transport]
    assert buffered(transport) == len(b"to nobody")
    result = transport.doWrite()
    assert isinstance(result, error.ConnectionLost)


def test_closing_connection_takes_twisted_path(pair):
    """After loseConnection, writes are buffered behind the close as in Twisted, not sent around it."""
    transport, peer, reactor = pair()
    transport.write(b"first")
    transport.loseConnection()
    transport.write(b"second")
    assert buffered(transport) == len(b"second")
    assert reactor.getWriters() == [transport]
    assert receive(peer, 5) == b"first"


def test_aborted_connection_sends_nothing(pair):
    """After abortConnection, a write is not sent (Twisted drops it)."""
    transport, peer, reactor = pair()
    proto = transport.protocol
    transport.abortConnection()
    transport.write(b"never")
    reactor.advance(0)  # Twisted's abort: connectionLost at the next turn
    assert len(proto.lost) == 1
    # The peer sees the reset and nothing before it.
    with pytest.raises(ConnectionResetError):
        peer.recv(10)


def test_pull_producer_takes_twisted_path(pair):
    """With a pull producer, writes wait for doWrite, which is what asks the producer for more."""
    transport, peer, reactor = pair()
    producer = PullProducer()
    transport.registerProducer(producer, False)
    assert producer.asked == 1
    transport.write(b"chunk")
    assert reactor.getWriters() == [transport]
    assert transport.doWrite() is None
    assert producer.asked == 2
    assert receive(peer, 5) == b"chunk"


def test_str_refused_as_by_twisted(pair):
    """Text, not bytes: the TypeError Twisted's write raises."""
    transport, peer, reactor = pair()
    with pytest.raises(TypeError):
        transport.write("text")


operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(1, 20_000)),
        st.tuples(st.just("sequence"), st.lists(st.integers(0, 3000), max_size=4)),
        st.tuples(st.just("read"), st.integers(1, 40_000)),
        st.tuples(st.just("reactor"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations)
def test_any_writes_and_reads_arrive_in_order(pair, ops):
    """
    Any interleaving of writes, the peer's reads and the reactor's doWrite
    on small kernel buffers (so sends are partial or refused): the peer
    gets every byte, in order, and whatever Twisted holds, the reactor is
    watching the socket for.
    """
    transport, peer, reactor = pair(small=True)
    peer.setblocking(False)
    written = []
    got = []
    counter = 0

    def piece(n):
        nonlocal counter
        data = bytes((counter + i) % 251 for i in range(n))
        counter += n
        return data

    for op, arg in ops:
        if op == "write":
            data = piece(arg)
            written.append(data)
            transport.write(data)
        elif op == "sequence":
            pieces = [piece(n) for n in arg]
            written.extend(pieces)
            transport.writeSequence(pieces)
        elif op == "read":
            try:
                got.append(peer.recv(arg))
            except BlockingIOError:
                pass
        elif transport in reactor.getWriters():
            assert transport.doWrite() is None
        if buffered(transport):
            assert transport in reactor.getWriters()
    got.append(drain(transport, peer, reactor, sum(map(len, written)) - sum(map(len, got))))
    assert b"".join(got) == b"".join(written)
    assert transport.protocol.lost == []


# --- the endpoint wrapper, on the real reactor ---------------------------------


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Collect(protocol.Protocol):
    """A client that fires C{done} with what it got once it has C{expected} bytes."""

    def __init__(self, expected):
        self.expected = expected
        self.got = b""
        self.done = defer.Deferred()

    def dataReceived(self, data):
        self.got += data
        if len(self.got) >= self.expected and not self.done.called:
            self.done.callback(self.got)


async def round_trip(reactor, port, message):
    """Connect to C{port}, send C{message}, and return what comes back."""
    client = Collect(len(message))
    endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, timeout=WAIT)
    connected = await endpoints.connectProtocol(endpoint, client)
    try:
        connected.transport.write(message)
        return await client.done.addTimeout(WAIT, reactor)
    finally:
        connected.transport.loseConnection()


def echo_factory():
    factory = protocol.Factory.forProtocol(Echo)
    factory.built = []
    build = factory.buildProtocol

    def remember(addr):
        proto = build(addr)
        factory.built.append(proto)
        return proto

    factory.buildProtocol = remember
    return factory


@pytest_twisted.ensureDeferred
async def test_tcp_endpoint_builds_eager_connections():
    """A tcp: endpoint through EagerWrites: its port builds EagerServers, which carry data both ways."""
    from twisted.internet import reactor

    factory = echo_factory()
    port = await eager.EagerWrites(
        endpoints.serverFromString(reactor, "tcp:0:interface=127.0.0.1")
    ).listen(factory)
    try:
        assert port.transport is eager.EagerServer
        assert await round_trip(reactor, port, b"ping" * 1000) == b"ping" * 1000
        assert isinstance(factory.built[0].transport, eager.EagerServer)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_adopted_socket_builds_eager_connections():
    """A listening socket adopted as systemd passes it (systemd:domain=INET): its port builds EagerServers."""
    from twisted.internet import reactor

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.setblocking(False)
    # The endpoint takes the descriptor over (it closes it once adopted).
    endpoint = endpoints.AdoptedStreamServerEndpoint(reactor, listener.detach(), socket.AF_INET)
    port = await eager.EagerWrites(endpoint).listen(echo_factory())
    try:
        assert port.transport is eager.EagerServer
        assert await round_trip(reactor, port, b"pong") == b"pong"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_unix_endpoint_left_alone(tmp_path):
    """A UNIX socket's port is not a TCP port: EagerWrites leaves its transport Twisted's."""
    from twisted.internet import reactor

    endpoint = endpoints.serverFromString(reactor, f"unix:{tmp_path / 's.sock'}")
    port = await eager.EagerWrites(endpoint).listen(echo_factory())
    try:
        assert port.transport is unix.Server
    finally:
        await port.stopListening()


def test_service_wraps_the_endpoint():
    """eager.service is strports.service with its endpoint wrapped: bind errors still raise at start."""
    from twisted.internet import reactor

    service = eager.service("tcp:0:interface=127.0.0.1", echo_factory(), reactor=reactor)
    assert isinstance(service, StreamServerEndpointService)
    assert isinstance(service.endpoint, eager.EagerWrites)
    assert isinstance(service.endpoint.endpoint, endpoints.TCP4ServerEndpoint)


def test_service_bind_error_raises_at_start():
    """As with strports.service, a port in use stops start-up with CannotListenError, not a logged failure."""
    from twisted.internet import reactor

    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        number = taken.getsockname()[1]
        service = eager.service(f"tcp:{number}:interface=127.0.0.1", echo_factory(), reactor=reactor)
        with pytest.raises(error.CannotListenError):
            service.privilegedStartService()
    finally:
        taken.close()


def test_eager_port_leaves_other_transports():
    """eager_port changes only a port whose transport is Twisted's plain tcp.Server."""

    class Custom(tcp.Server):
        pass

    port = tcp.Port(0, protocol.Factory())
    port.transport = Custom
    assert eager.eager_port(port) is port
    assert port.transport is Custom
    plain = tcp.Port(0, protocol.Factory())
    assert eager.eager_port(plain).transport is eager.EagerServer
    assert eager.eager_port("not a port") == "not a port"

