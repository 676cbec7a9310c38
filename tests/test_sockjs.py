# -*- test-case-name: tests.test_sockjs -*-
"""
chatd.stomp.sockjs: the SockJS WebSocket transport's framing as
sockjs-client 1.6.1 reads and writes it, /info, and which URLs exist.
"""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.stomp import sockjs
from chatd.stomp.sockjs import SockJSError


def test_fixed_frames():
    """Open and heart-beat frames are single letters; heart-beats every 25 s."""
    assert (sockjs.OPEN, sockjs.HEARTBEAT, sockjs.HEARTBEAT_SECONDS) == ("o", "h", 25.0)


def test_messages_frame():
    """a[...] is a JSON array of the messages, compact, non-ASCII kept as is."""
    frame = sockjs.messages_frame(["CONNECTED\nversion:1.2\n\n\0", "caf\u00e9"])
    assert frame == 'a["CONNECTED\\nversion:1.2\\n\\n\\u0000","caf\u00e9"]'


def test_messages_frame_escapes_what_browsers_mangle():
    """Line and paragraph separators and non-characters are \\u-escaped, as sockjs-node does."""
    frame = sockjs.messages_frame(["a\u2028b\u2029c\ufffe\u200d"])
    assert frame == 'a["a\\u2028b\\u2029c\\ufffe\\u200d"]'
    assert json.loads(frame[1:]) == ["a\u2028b\u2029c\ufffe\u200d"]


def test_close_frame():
    """c[code,"reason"] before the WebSocket closes."""
    assert sockjs.close_frame(1009, "too large") == 'c[1009,"too large"]'


@pytest.mark.parametrize(
    "text,parsed",
    [
        ('["SEND\\ndestination:/d\\n\\nhi\\u0000"]', ["SEND\ndestination:/d\n\nhi\0"]),
        ('["a","b"]', ["a", "b"]),
        ("[]", []),
        ("", []),
        ('"one"', ["one"]),
    ],
)
def test_parse_client(text, parsed):
    """Client messages: a JSON array of strings (or one string); empty carries none."""
    assert sockjs.parse_client(text) == parsed


@pytest.mark.parametrize("text", ["a[\"x\"]", "[1]", '["a", null]', "{}", "[", "42"])
def test_parse_client_refusals(text):
    """Anything but strings in a JSON array is a SockJSError."""
    with pytest.raises(SockJSError):
        sockjs.parse_client(text)


@given(st.lists(st.text(max_size=30), max_size=5))
@settings(max_examples=200, deadline=None)
def test_server_frame_is_what_a_client_decodes(texts):
    """What the server frames, JSON.parse of frame[1:] reads back (sockjs-client does exactly that)."""
    assert json.loads(sockjs.messages_frame(texts)[1:]) == texts


def test_info_body():
    """/info: WebSocket available, no cookie, any origin, the given entropy."""
    assert json.loads(sockjs.info_body(12345)) == {
        "websocket": True, "cookie_needed": False, "origins": ["*:*"], "entropy": 12345,
    }


@pytest.mark.parametrize(
    "path,kind",
    [
        ("", sockjs.GREET),
        ("info", sockjs.INFO),
        ("websocket", sockjs.RAW_WEBSOCKET),
        ("123/abcdefgh/websocket", sockjs.SOCKJS_WEBSOCKET),
        ("0/x/websocket", sockjs.SOCKJS_WEBSOCKET),
        ("123/abcdefgh/xhr", None),
        ("123/abcdefgh/xhr_send", None),
        ("123/abcdefgh/xhr_streaming", None),
        ("123/abcdefgh/eventsource", None),
        ("123/abcdefgh/htmlfile", None),
        ("123/abcdefgh/jsonp", None),
        ("iframe.html", None),
        ("iframe-1.6.1.html", None),
        ("1.2/abc/websocket", None),
        ("123//websocket", None),
        ("123/abc/websocket/extra", None),
        ("info/x", None),
    ],
)
def test_routes(path, kind):
    """Only /info, the greeting and the two WebSocket URLs exist; HTTP fallbacks are 404."""
    assert sockjs.route(path.split("/") if path else []) == kind
