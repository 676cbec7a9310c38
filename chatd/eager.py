# -*- test-case-name: tests.test_eager -*-
"""
TCP connections that send at once when nothing is waiting to be sent.

Twisted's TCP transport buffers every C{write}, asks the reactor to watch
the socket for writability (C{startWriting}: an C{epoll_ctl}), and sends at
the reactor's next iteration, when it also stops watching (another
C{epoll_ctl}).  For a chat server's small messages that is two system
calls and a write event's dispatch per message on top of the C{send}
itself: in chatd's small-rooms benchmark about as much as its own chat
code (docs/performance.md).  libuv, Node and asyncio instead try the
C{send} first when their buffer is empty, and buffer only what the kernel
did not take; L{EagerServer} does the same, and otherwise is Twisted's
C{tcp.Server} unchanged (Twisted issue 5303 asks for this in Twisted
itself).

What stays Twisted's:

 - Errors.  A failed C{send} is never reported from C{write} (which would
   call C{connectionLost} from inside the caller's code): the bytes go to
   Twisted's buffer as if nothing had been tried, and the reactor's
   C{doWrite} meets the error and reports the lost connection as ever.
 - Order.  The eager path runs only when Twisted's buffer is empty, so
   nothing can overtake bytes written earlier; the rest of a partial
   C{send} is buffered before any later write.
 - Flow control.  A streaming producer is paused when the buffer passes
   C{bufferSize}, as before: the buffer now holds only what the kernel
   refused.  With a pull (non-streaming) producer, a closing or half-closed
   connection, an aborted one, or TLS started on the transport itself,
   writes take Twisted's path unchanged.

L{EagerWrites} wraps a server endpoint so that the TCP ports it makes
build L{EagerServer}s: C{tcp:} and C{tcp6:} ports and sockets adopted from
systemd (C{systemd:domain=INET}) alike; anything else (a UNIX socket) is
left as it is.
"""

from twisted.application import strports
from twisted.internet import tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from zope.interface import implementer


class EagerServer(tcp.Server):
    """
    A server-side TCP connection whose C{write} sends at once when nothing
    is buffered (see the module's docstring), else buffers as Twisted does.
    """

    def _eager(self):
        """Whether a write may be sent now: nothing buffered, nothing special going on."""
        return not (
            self._tempDataLen or self.dataBuffer or self.disconnecting or self._writeDisconnecting
            or self._aborting or self.TLS or not self.connected
            or (self.producer is not None and not self.streamingProducer)
        )

    def write(self, data):
        """
        Send C{data} now if nothing is buffered, buffering what the kernel
        does not take; otherwise (or on any error) Twisted's C{write}.
        """
        if data.__class__ is bytes and data and self._eager():
            try:
                # As writeSomeData, at most SEND_LIMIT bytes at a time, but
                # without its untilConcludes (Python retries EINTR itself,
                # PEP 475) and memoryview for the small writes of chat.
                sent = self.socket.send(
                    data if len(data) <= self.SEND_LIMIT else memoryview(data)[:self.SEND_LIMIT]
                )
            except OSError:
                # The kernel's buffer is full (EAGAIN, ENOBUFS), or an error,
                # which doWrite meets again and reports: all of it is buffered.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]  # the rest is buffered, the socket watched, the producer paused if due
        tcp.Server.write(self, data)

    def writeSequence(self, iovec):
        """As L{write}, the pieces joined, when the eager path may run."""
        if self._eager():
            self.write(b"".join(iovec))
        else:
            tcp.Server.writeSequence(self, iovec)


def eager_port(port):
    """
    Make a listening TCP port build L{EagerServer}s from now on.

    @param port: what a server endpoint's C{listen} gave.
    @return: C{port}; changed only if it is a plain TCP port (its
        C{transport} Twisted's C{tcp.Server}).
    """
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = EagerServer
    return port


@implementer(IStreamServerEndpoint)
class EagerWrites:
    """A server endpoint whose TCP ports build L{EagerServer}s (L{eager_port})."""

    def __init__(self, endpoint):
        """
        @param endpoint: the C{IStreamServerEndpoint} to listen with, such
            as one from C{serverFromString}.
        """
        self.endpoint = endpoint

    def listen(self, factory):
        """
        Listen with the wrapped endpoint.

        @return: a Deferred of its listening port, made eager.
        """
        return self.endpoint.listen(factory).addCallback(eager_port)


def service(description, factory, reactor=None):
    """
    C{strports.service}, its endpoint wrapped in L{EagerWrites}: a
    listening service whose TCP connections send at once.

    @param description: a server endpoint string (C{[server] endpoint}).
    @param factory: the listening factory.
    @param reactor: the reactor; the global one when L{None}.
    @return: a C{StreamServerEndpointService}, not started.
    """
    listening = strports.service(description, factory, reactor=reactor)
    listening.endpoint = EagerWrites(listening.endpoint)
    return listening
