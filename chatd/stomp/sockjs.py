# -*- test-case-name: tests.test_sockjs -*-
"""
SockJS framing for its WebSocket transport, and the URLs chatd answers
under C{[stomp] sockjs_path}.  Pure, no I/O.

Only the WebSocket transport is served: C{/info} says so, and the HTTP
fallbacks (xhr, eventsource, iframe, jsonp) are 404, so sockjs-client uses
WebSocket or fails plainly.  Server frames: C{o} on open, C{h} every
L{HEARTBEAT_SECONDS}, C{a[...]} carrying messages, C{c[code,"reason"]}
before the close.  Client frames are JSON arrays of strings.
"""

import json
import re

OPEN = "o"
HEARTBEAT = "h"
HEARTBEAT_SECONDS = 25.0

GREETING = b"Welcome to SockJS!\n"


class SockJSError(ValueError):
    """A client message that is not a JSON array of strings."""


# sockjs-node's "escapable" set: characters browsers and proxies are known
# to mangle (controls, surrogates, invisible formatting, non-characters).
_ESCAPE = re.compile("[\x00-\x1f\ud800-\udfff\u200c-\u200f\u2028-\u202f\u2060-\u206f\ufff0-\uffff]")


def _quote(text):
    return _ESCAPE.sub(lambda m: "\\u%04x" % ord(m.group(0)), text)


def _dumps(value):
    return _quote(json.dumps(value, ensure_ascii=False, separators=(",", ":")))


def messages_frame(texts):
    """C{a[...]}: one or more messages for the client."""
    return "a" + _dumps(list(texts))


def close_frame(code, reason):
    """C{c[code,"reason"]}: sent before the WebSocket closes."""
    return "c" + _dumps([code, reason])


def parse_client(text):
    """
    A client WebSocket message as the messages it carries: a JSON array of
    strings (or, as sockjs-node also takes, one JSON string); an empty
    message carries none.

    @raise SockJSError: anything else.
    """
    if not text:
        return []
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise SockJSError("a SockJS frame is a JSON array of strings") from None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise SockJSError("a SockJS frame is a JSON array of strings")
    return value


def info_body(entropy):
    """The C{/info} answer: WebSocket only, no cookie, any origin."""
    return json.dumps(
        {"websocket": True, "cookie_needed": False, "origins": ["*:*"], "entropy": entropy}
    ).encode("ascii")


# --- routes ------------------------------------------------------------------

INFO = "info"
GREET = "greeting"
SOCKJS_WEBSOCKET = "sockjs-websocket"
RAW_WEBSOCKET = "raw-websocket"

# sockjs-protocol: server and session ids are any non-empty segment without a dot.
_ID = re.compile(r"[^/.]+\Z")


def route(segments):
    """
    The kind of request at C{sockjs_path}/C{segments} (a list of str), or
    C{None} for 404: C{info}, the greeting, a SockJS WebSocket
    (C{/{server}/{session}/websocket}) or a plain one (C{/websocket}).
    Every HTTP fallback transport falls through to C{None}.
    """
    segments = list(segments)
    if segments in ([], [""]):
        return GREET
    if segments == [INFO]:
        return INFO
    if segments == ["websocket"]:
        return RAW_WEBSOCKET
    if len(segments) == 3 and segments[2] == "websocket" and all(
        _ID.match(part) for part in segments[:2]
    ):
        return SOCKJS_WEBSOCKET
    return None
