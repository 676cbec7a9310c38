"""
A raw WebSocket client for abuse tests: a plain socket, real TLS, a
hand-made upgrade and hand-made frames.

The websockets library is a well-behaved client: it answers pings, reads in
a background thread and refuses to send invalid frames.  The abuse tests
need the opposite, a client that misbehaves on purpose: one that never
reads, never answers a ping, sends invalid UTF-8 or stops half-way through
a handshake.  Every read here has a timeout and every loop a bound.
"""

import base64
import json
import os
import socket
import ssl
import struct
import time

from tests.support import RECV_TIMEOUT, client_tls

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class Closed(Exception):
    """The server ended the connection (EOF, reset or TLS shutdown)."""


def tcp_connect(port, source=None, rcvbuf=None, timeout=RECV_TIMEOUT):
    """
    A TCP connection to chatd on loopback.  C{rcvbuf} shrinks the receive
    window (set before connecting, so the window is negotiated small): a
    client that stops reading then fills the server's buffers sooner.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if source is not None:
        sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def tls_connect(port, **kwargs):
    sock = tcp_connect(port, **kwargs)
    return client_tls().wrap_socket(sock, server_hostname="localhost")


def ended(sock, timeout, limit=64 * 1024 * 1024):
    """
    Read and discard until the server ends the connection; True if it did
    within C{timeout}, False if the connection was still open by then.
    Reads at most C{limit} bytes.
    """
    deadline = time.monotonic() + timeout
    received = 0
    while received < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return False
        except (ConnectionError, ssl.SSLError, OSError):
            return True
        if not data:
            return True
        received += len(data)
    raise AssertionError(f"read {limit} bytes and the connection is still open")


def mask(payload, key):
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def frame(opcode, payload=b"", fin=True, masked=True, length=None, rsv1=False):
    """
    One client frame; C{length} overrides the declared payload length,
    C{rsv1} marks a permessage-deflate compressed message.
    """
    declared = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode])
    bit = 0x80 if masked else 0
    if declared < 126:
        head += bytes([bit | declared])
    elif declared < 65536:
        head += bytes([bit | 126]) + struct.pack("!H", declared)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", declared)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + mask(payload, key)


class RawWebSocket:
    """One hand-driven connection; C{upgrade} then C{send}/C{recv_frame}."""

    def __init__(self, port, **connect_kwargs):
        self.port = port
        self.sock = tls_connect(port, **connect_kwargs)
        self._buffer = b""

    def upgrade(self, path, subprotocol="chatd.v1", extra_headers=()):
        """Send the upgrade; return the response's status code and head."""
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: localhost:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
        ]
        if subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
        lines.extend(extra_headers)
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        head = self._read_until(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, head

    def send_raw(self, data):
        self.sock.sendall(data)

    def send_frame(self, opcode, payload=b"", **kwargs):
        self.sock.sendall(frame(opcode, payload, **kwargs))

    def send_json(self, obj):
        self.send_frame(OP_TEXT, json.dumps(obj).encode("utf-8"))

    def recv_frame(self, timeout=RECV_TIMEOUT):
        """The next frame as (opcode, payload); fragments are not joined."""
        deadline = time.monotonic() + timeout
        head = self._read_exactly(2, deadline)
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._read_exactly(2, deadline))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._read_exactly(8, deadline))[0]
        return opcode, self._read_exactly(length, deadline)

    def recv_json(self, timeout=RECV_TIMEOUT):
        """The next text frame as JSON, skipping control frames (bounded)."""
        for _ in range(100):
            opcode, payload = self.recv_frame(timeout)
            if opcode == OP_TEXT:
                return json.loads(payload)
            if opcode == OP_CLOSE:
                raise Closed(close_code(payload))
        raise AssertionError("100 control frames in a row")

    def close_code(self, timeout=RECV_TIMEOUT, limit=10000):
        """Read frames until the server's close frame; return its code."""
        for _ in range(limit):
            opcode, payload = self.recv_frame(timeout)
            if opcode == OP_CLOSE:
                return close_code(payload)
        raise AssertionError(f"no close frame in {limit} frames")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no data from chatd in time")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except (ConnectionError, ssl.SSLError) as e:
            raise Closed(str(e)) from None
        if not data:
            raise Closed("EOF")
        self._buffer += data

    def _read_exactly(self, n, deadline):
        while len(self._buffer) < n:
            self._fill(deadline)
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _read_until(self, marker, limit=65536):
        deadline = time.monotonic() + RECV_TIMEOUT
        while marker not in self._buffer:
            if len(self._buffer) > limit:
                raise AssertionError("response head too long")
            self._fill(deadline)
        head, _, self._buffer = self._buffer.partition(marker)
        return head


def close_code(payload):
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None


def still_open(sock):
    """True if the server has not closed C{sock} (nothing to read, no EOF)."""
    sock.setblocking(False)
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, ssl.SSLWantReadError):
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)
    return bool(data)
