# -*- test-case-name: tests.test_bench -*-
"""
The floor of scenario 2: the least a Twisted TLS WebSocket server does per
connection, measured so that a CPU-per-connection figure can be read
against what no design on this stack goes below.

Same TLS as chatd and the reference (L{chatd.tls.certificate_options} on
the same certificate, Twisted's own TLS layer, as the reference uses).
Per connection it accepts, completes the TLS handshake, reads the upgrade
request's head, answers C{101} with the C{Sec-WebSocket-Accept} of RFC 6455
and chatd.v1's WELCOME in the same write, and then ignores everything:
no HTTP parser, no Autobahn, no timers, no ticket, no JWT.  It is not a
server anyone should run; it only speaks enough for bench/loadgen.py's
scenario 2 (C{bench/run.py 2 --yardstick floor}).

    python bench/floor.py --port P --certificate fullchain.pem --private-key privkey.pem
"""

import base64
import hashlib
import re

from twisted.internet.protocol import Factory, Protocol

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = re.compile(rb"\r\nsec-websocket-key:[ \t]*([A-Za-z0-9+/=]{24})[ \t]*\r\n", re.IGNORECASE)
WELCOME = b'{"type":"WELCOME","user":"bench","expires":0}'
HEAD_LIMIT = 8192


def accept_for(key):
    """RFC 6455 section 4.2.2: the Sec-WebSocket-Accept for C{key}."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def answer(head):
    """
    @param head: the request up to and including its blank line.
    @return: the bytes to send (the 101 and the WELCOME frame), or L{None}
        when C{head} has no usable key.
    """
    found = KEY.search(head)
    if found is None:
        return None
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_for(found.group(1)) + b"\r\nSec-WebSocket-Protocol: chatd.v1\r\n\r\n"
        + bytes([0x81, len(WELCOME)]) + WELCOME
    )


class Upgrade(Protocol):
    """Read the request's head, answer it once, then drop whatever comes."""

    head = b""
    upgraded = False

    def dataReceived(self, data):
        if self.upgraded:
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.head) > HEAD_LIMIT:
                self.transport.abortConnection()
            return
        reply = answer(self.head[:end + 4])
        self.head = b""
        if reply is None:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.transport.loseConnection()
            return
        self.upgraded = True
        self.transport.write(reply)


def make_factory():
    return Factory.forProtocol(Upgrade)


def main(argv=None):
    from reference import serve  # bench/ is the script's directory, first on sys.path

    serve(make_factory, "floor", argv)


if __name__ == "__main__":
    main()
