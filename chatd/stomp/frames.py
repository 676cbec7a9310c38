# -*- test-case-name: tests.test_stomp_frames,tests.test_stomp_frames_property -*-
"""
STOMP 1.0, 1.1 and 1.2 frames: bytes in, L{Frame}s out, and back.

Pure, no I/O.  A frame is a command line, header lines, a blank line, a
body and a NUL; lines end in LF or CRLF.  The parser takes bytes as they
arrive, in any pieces (stomp.js 2.3.3 splits a frame over WebSocket
messages of 16 KiB), skips the bare EOLs that are heart-beats, honours
C{content-length}, and holds at most one frame of C{max_frame_bytes}: a
longer one is a L{FrameTooLarge} before it is buffered.  Every refusal is a
L{FrameError}, a L{chatd.errors.ProtocolError}: the adapter answers ERROR
with its code and closes, as STOMP prescribes.

Header values are escaped as 1.1 and 1.2 say (C{\\n \\c \\\\}, and C{\\r} in
1.2), except in CONNECT, STOMP and CONNECTED, which are read before a
version is agreed; the first occurrence of a repeated header wins.
"""

import dataclasses
import re
from typing import Tuple

from chatd import errors
from chatd.errors import ProtocolError

V10 = "1.0"
V11 = "1.1"
V12 = "1.2"
VERSIONS = (V10, V11, V12)  # oldest first

# WebSocket subprotocols, best first (the STOMP-over-WebSocket convention).
SUBPROTOCOLS = {"v12.stomp": V12, "v11.stomp": V11, "v10.stomp": V10}

CLIENT_COMMANDS = frozenset(
    {"CONNECT", "STOMP", "SEND", "SUBSCRIBE", "UNSUBSCRIBE", "ACK", "NACK",
     "BEGIN", "COMMIT", "ABORT", "DISCONNECT"}
)
SERVER_COMMANDS = frozenset({"CONNECTED", "MESSAGE", "RECEIPT", "ERROR"})
COMMANDS = CLIENT_COMMANDS | SERVER_COMMANDS

# Never escaped: a client writes them before it knows the version (1.2 spec,
# "Value Encoding"; STOMP is CONNECT's 1.1+ spelling).
UNESCAPED_COMMANDS = frozenset({"CONNECT", "STOMP", "CONNECTED"})

# What chatd offers: it sends and wants a heart-beat every 10 s.
SERVER_HEART_BEAT = (10000, 10000)

_MAX_ECHO = 64  # characters of a bad value quoted back in an ERROR


class FrameError(ProtocolError):
    """A frame chatd cannot read: ERROR C{bad_request}, then close."""

    def __init__(self, message, code=errors.BAD_REQUEST):
        super().__init__(code, message)


class FrameTooLarge(FrameError):
    """A frame over the byte cap: ERROR C{too_large}, then close 1009."""

    close_code = errors.CLOSE_MESSAGE_TOO_BIG

    def __init__(self, limit):
        super().__init__(f"a frame is at most {limit} bytes", errors.TOO_LARGE)
        self.limit = limit


class VersionMismatch(FrameError):
    """CONNECT offered no version chatd speaks; ERROR carries C{version}."""

    def __init__(self):
        super().__init__("supported STOMP versions are " + ",".join(VERSIONS))


def _echo(text):
    return repr(text[:_MAX_ECHO] + ("..." if len(text) > _MAX_ECHO else ""))


@dataclasses.dataclass(frozen=True)
class Frame:
    """
    One frame.  C{headers} keeps every header in order, repeats included
    (a relay must pass them on); L{get} reads the first, which is the one
    that counts.
    """

    command: str
    headers: Tuple[Tuple[str, str], ...] = ()
    body: bytes = b""

    def get(self, name, default=None):
        """The value of the first header called C{name}, or C{default}."""
        for key, value in self.headers:
            if key == name:
                return value
        return default


# --- escaping ----------------------------------------------------------------

_ESCAPE_12 = str.maketrans({"\\": "\\\\", "\r": "\\r", "\n": "\\n", ":": "\\c"})
_ESCAPE_11 = str.maketrans({"\\": "\\\\", "\n": "\\n", ":": "\\c"})
_UNESCAPE_12 = {"\\": "\\", "r": "\r", "n": "\n", "c": ":"}
_UNESCAPE_11 = {"\\": "\\", "n": "\n", "c": ":"}
_ESCAPED = re.compile(r"\\(.?)", re.DOTALL)


def _escape(text, version):
    if version == V12:
        return text.translate(_ESCAPE_12)
    if "\r" in text:
        raise ValueError(f"STOMP {version} cannot carry CR in a header: {text!r}")
    return text.translate(_ESCAPE_11)


def _unescape(text, version):
    if "\\" not in text:
        return text
    table = _UNESCAPE_12 if version == V12 else _UNESCAPE_11

    def one(match):
        try:
            return table[match.group(1)]
        except KeyError:
            # "MUST be treated as a fatal protocol error" (1.1 and 1.2).
            raise FrameError(
                f"undefined escape {_echo(match.group(0))} in a header"
            ) from None

    return _ESCAPED.sub(one, text)


# --- encoding ----------------------------------------------------------------


def encode(frame, version=V12):
    """
    The frame as bytes, with C{content-length} added when there is a body
    and the frame names none.

    @raise ValueError: a header cannot be written in C{version} (NUL; a line
        break in CONNECTED or in 1.0; a colon in an unescaped name): chatd's
        own values never hold those.
    """
    escaped = version != V10 and frame.command not in UNESCAPED_COMMANDS
    lines = [frame.command]
    for name, value in frame.headers:
        lines.append(_header_line(name, value, version, escaped))
    if frame.body and frame.get("content-length") is None:
        lines.append(f"content-length:{len(frame.body)}")
    head = "\n".join(lines) + "\n\n"
    return head.encode("utf-8") + frame.body + b"\0"


def _header_text(text, name, version, escaped):
    """A header's name or value as written: escaped, or checked to need no escape."""
    if "\0" in text:
        raise ValueError(f"header {name!r} holds NUL, which ends a frame")
    if escaped:
        return _escape(text, version)
    if "\r" in text or "\n" in text:
        raise ValueError(f"header {name!r} cannot be written unescaped")
    return text


def _header_line(name, value, version, escaped):
    if ":" in name and not escaped:
        raise ValueError(f"header {name!r} cannot be written unescaped")
    return _header_text(name, name, version, escaped) + ":" + _header_text(value, name, version, escaped)


def header_value(value, version, name="subscription"):
    """
    The value of a server frame's header C{name} (any but CONNECTED's) as
    written in C{version}, as bytes: escaped in 1.1 and 1.2.

    @raise ValueError: as L{encode}.
    """
    return _header_text(value, name, version, version != V10).encode("utf-8")


class MessageFrames:
    """
    The MESSAGE frames of one event to one destination, in one version,
    for any subscription id: the headers around the C{subscription} value
    and the body are encoded once, so a frame per subscriber costs a
    concatenation (and the id's escaping, unless done already with
    L{header_value}) instead of a whole L{encode}.

    C{MessageFrames(d, m, b, v).encode(s) == encode(message(d, s, m, b), v)}.
    """

    __slots__ = ("_version", "_before", "_after")

    def __init__(self, destination, message_id, body, version):
        """
        @param body: the JSON body, as text.
        @raise ValueError: as L{encode}.
        """
        self._version = version
        escaped = version != V10
        whole = encode(message(destination, "", message_id, body), version)
        before = "\n".join(["MESSAGE", _header_line("destination", destination, version, escaped), "subscription:"])
        self._before = before.encode("utf-8")
        assert whole.startswith(self._before), "message() puts the subscription second"
        self._after = whole[len(self._before):]

    def encode(self, subscription):
        """
        The frame for subscription id C{subscription}, as bytes.

        @raise ValueError: as L{encode}.
        """
        return self._before + header_value(subscription, self._version) + self._after

    def encode_value(self, value):
        """
        The frame for a subscription id written as L{header_value} wrote
        it in this version.
        """
        return self._before + value + self._after


# --- parsing -----------------------------------------------------------------

_HEAD_END = re.compile(rb"\n\r?\n")
_LENGTH = re.compile(r"[0-9]{1,12}\Z")


class FrameParser:
    """
    Client bytes in, frames out, however the bytes were split.

    Memory is bounded: the buffer holds one frame of at most
    C{max_frame_bytes} plus whatever arrived with its end.  After a
    L{FrameError} the parser stays broken (the connection is closing).

    @ivar version: the negotiated version, which decides how header values
        are unescaped; the adapter sets it after CONNECTED.
    """

    def __init__(self, max_frame_bytes, version=V12):
        self.version = version
        self._max = max_frame_bytes
        self._buffer = bytearray()
        self._searched = 0  # bytes already searched for the head's end or the NUL
        self._head = None  # (command, headers, body_start, length) once read
        self._failed = None

    def feed(self, data):
        """
        Add C{data}; an iterator over the frames it completes.

        @raise FrameError: while iterating, at the first bad frame, after
            the good ones before it were yielded (so they are answered).
        """
        if self._failed is not None:
            raise self._failed
        self._buffer += data
        return self._frames()

    def _frames(self):
        while True:
            try:
                frame = self._next()
            except FrameError as e:
                self._failed = e
                self._buffer = bytearray()
                raise
            if frame is None:
                return
            yield frame

    def _skip_heart_beats(self):
        buf = self._buffer
        i = 0
        while i < len(buf):
            if buf[i] == 0x0A:
                i += 1
            elif buf[i] == 0x0D:
                if i + 1 == len(buf):
                    break  # maybe the start of CRLF: wait
                if buf[i + 1] != 0x0A:
                    raise FrameError("a CR between frames must start a CRLF")
                i += 2
            else:
                break
        if i:
            del buf[:i]

    def _next(self):
        buf = self._buffer
        if self._head is None:
            self._skip_heart_beats()
            if not buf or buf == b"\r":
                return None
            start = max(0, self._searched - 2)
            match = _HEAD_END.search(buf, start)
            if match is None:
                if buf.find(b"\0", start) >= 0:
                    raise FrameError("a frame needs a blank line between its headers and its body")
                self._searched = len(buf)
                if len(buf) > self._max:
                    raise FrameTooLarge(self._max)
                return None
            body_start = match.end()
            if body_start > self._max:
                raise FrameTooLarge(self._max)
            command, headers = self._read_head(bytes(buf[: match.start()]))
            length = _content_length(headers)
            if length is not None and body_start + length + 1 > self._max:
                raise FrameTooLarge(self._max)
            self._head = (command, headers, body_start, length)
            self._searched = body_start
        command, headers, body_start, length = self._head
        if length is not None:
            end = body_start + length
            if len(buf) <= end:
                return None
            if buf[end] != 0:
                raise FrameError("a frame's body must end in NUL after content-length bytes")
        else:
            end = buf.find(b"\0", self._searched)
            if end < 0:
                self._searched = len(buf)
                if len(buf) > self._max:
                    raise FrameTooLarge(self._max)
                return None
            if end + 1 > self._max:
                raise FrameTooLarge(self._max)
        frame = Frame(command, headers, bytes(buf[body_start:end]))
        del buf[: end + 1]
        self._head = None
        self._searched = 0
        return frame

    def _read_head(self, head):
        if b"\0" in head:
            raise FrameError("a frame needs a blank line between its headers and its body")
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError("a frame's command and headers must be UTF-8") from None
        lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
        command = lines[0]
        if command not in COMMANDS:
            raise FrameError(f"unknown command {_echo(command)}")
        escaped = self.version != V10 and command not in UNESCAPED_COMMANDS
        headers = []
        for line in lines[1:]:
            if "\r" in line:
                # CR belongs to EOL only; one kept in a value could not be
                # written back (1.0, 1.1) or would end the line early.
                raise FrameError("a header may not hold a bare CR")
            name, colon, value = line.partition(":")
            if not colon:
                raise FrameError(f"a header is name:value, got {_echo(line)}")
            if escaped:
                name = _unescape(name, self.version)
                value = _unescape(value, self.version)
            headers.append((name, value))
        return command, tuple(headers)


def _content_length(headers):
    for name, value in headers:
        if name == "content-length":
            if not _LENGTH.match(value):
                raise FrameError(f"content-length must be a number of bytes, got {_echo(value)}")
            return int(value)
    return None


# --- negotiation -------------------------------------------------------------


def stomp_subprotocol(offered):
    """
    The best STOMP WebSocket subprotocol among C{offered}, or C{None}.
    (On /ws, chatd.v1 goes first when it is offered: that is ws.py's rule.)
    """
    for name in SUBPROTOCOLS:
        if name in offered:
            return name
    return None


def negotiate_version(accept_version):
    """
    The version to speak, from CONNECT's C{accept-version} (absent: 1.0).

    @raise VersionMismatch: no version in common.
    """
    if accept_version is None:
        return V10
    offered = {word.strip() for word in accept_version.split(",")}
    for version in reversed(VERSIONS):
        if version in offered:
            return version
    raise VersionMismatch()


_HEART_BEAT = re.compile(r"\s*([0-9]{1,9})\s*,\s*([0-9]{1,9})\s*\Z")


def parse_heart_beat(value):
    """
    C{"cx,cy"} as two ints of milliseconds; absent is C{(0, 0)}.

    @raise FrameError: anything else.
    """
    if value is None:
        return (0, 0)
    match = _HEART_BEAT.match(value)
    if match is None:
        raise FrameError(f"heart-beat must be two numbers of milliseconds like 10000,10000, got {_echo(value)}")
    return (int(match.group(1)), int(match.group(2)))


def negotiate_heart_beat(client, server=SERVER_HEART_BEAT):
    """
    Heart-beat intervals as the spec computes them from the client's
    C{(cx, cy)} and the server's C{(sx, sy)}.

    @return: C{(send_ms, expect_ms)}: how often the server sends a
        heart-beat and how often it must hear from the client (0: never).
    """
    cx, cy = client
    sx, sy = server
    send = 0 if sx == 0 or cy == 0 else max(sx, cy)
    expect = 0 if cx == 0 or sy == 0 else max(cx, sy)
    return (send, expect)


# --- server frames -----------------------------------------------------------


def connected(version, heart_beat, server, user_name):
    """CONNECTED; C{heart_beat} is the server's C{(sx, sy)}."""
    return Frame(
        "CONNECTED",
        (
            ("version", version),
            ("heart-beat", f"{heart_beat[0]},{heart_beat[1]}"),
            ("server", server),
            # Never escaped, so no line break may reach it (names have none).
            ("user-name", user_name.replace("\r", " ").replace("\n", " ")),
        ),
    )


def message(destination, subscription, message_id, body):
    """
    MESSAGE carrying a JSON C{body} (text) to one subscription.
    """
    return Frame(
        "MESSAGE",
        (
            ("destination", destination),
            ("subscription", subscription),
            ("message-id", message_id),
            ("content-type", "application/json"),
        ),
        body.encode("utf-8"),
    )


def receipt(receipt_id):
    """RECEIPT for a frame that asked for one."""
    return Frame("RECEIPT", (("receipt-id", receipt_id),))


def error(code, text, receipt_id=None, version_header=False):
    """
    ERROR: C{message} is the chatd error code, the body says what went
    wrong; C{receipt-id} when the frame asked for a receipt; C{version}
    lists what chatd speaks after a L{VersionMismatch}.
    """
    assert code in errors.ERROR_CODES, code
    headers = [("message", code), ("content-type", "text/plain")]
    if receipt_id is not None:
        headers.append(("receipt-id", receipt_id))
    if version_header:
        headers.append(("version", ",".join(VERSIONS)))
    return Frame("ERROR", tuple(headers), text.encode("utf-8"))


def error_for(problem, receipt_id=None):
    """ERROR for a L{ProtocolError} (a L{FrameError} included)."""
    return error(
        problem.code, problem.message, receipt_id, isinstance(problem, VersionMismatch)
    )


HEART_BEAT = b"\n"  # what a server heart-beat is on the wire

