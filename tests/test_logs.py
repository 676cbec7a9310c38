# -*- test-case-name: tests.test_logs -*-
"""chatd.logs: secrets never reach a log line, and names cannot forge lines."""

import socket

import pytest
from twisted.logger import formatEventAsClassicLogText
from twisted.python.failure import Failure

from chatd.logs import EscapingObserver, escape_event, printable, redact, redact_uri
from tests.support import client_tls, wait_for

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXBhcnQ"


def test_redact_uri_drops_query():
    """A request target keeps its path and loses its query."""
    assert redact_uri("/ws?ticket=s3cret&x=1") == "/ws?[redacted]"
    assert redact_uri(b"/ws?ticket=s3cret") == "/ws?[redacted]"
    assert redact_uri("/rooms") == "/rooms"
    assert redact_uri("/ws?") == "/ws?[redacted]"


def test_redact_uri_escapes_path():
    """Control characters in the path are escaped."""
    assert redact_uri(b"/a\r\nFAKE LINE?t=1") == "/a\\x0d\\x0aFAKE LINE?[redacted]"


def test_redact_jwt():
    """A JWT anywhere in text is replaced."""
    text = redact(f"bad token {JWT} from client")
    assert text == "bad token [jwt] from client"


@pytest.mark.parametrize(
    "name", ["ticket", "token", "access_token", "jwt", "TICKET", "id_token", "refresh_token"]
)
def test_redact_secret_params(name):
    """name=value pairs for tickets and tokens lose their value, keeping the rest."""
    assert redact(f"GET /ws?{name}=abc123&room=lobby") == f"GET /ws?{name}=[redacted]&room=lobby"


def test_redact_bearer():
    """An Authorization header value is replaced."""
    assert redact("Authorization: Bearer abc.def-ghi") == "Authorization: Bearer [redacted]"
    assert "xyz" not in redact("authorization: bearer xyz")


def test_redact_dict_entries():
    """A ticket or token inside JSON or a Python dict repr loses its value."""
    assert redact('{"ticket": "Qm9iX", "expires_in": 30}') == '{"ticket": "[redacted]", "expires_in": 30}'
    assert redact("{'refresh_token':'abc', 'room': 'lobby'}") == (
        "{'refresh_token':'[redacted]', 'room': 'lobby'}"
    )


def test_redact_leaves_plain_text():
    """Text without secrets is unchanged."""
    assert redact("connection lost: timeout") == "connection lost: timeout"


def test_redact_non_string():
    """Exceptions and other objects are redacted through str()."""
    assert redact(ValueError(f"ticket=zzz {JWT}")) == "ticket=[redacted] [jwt]"


@pytest.mark.parametrize(
    "raw,shown",
    [("a\nb", "a\\x0ab"), ("a\x00b", "a\\x00b"), ("\x1b[31mred", "\\x1b[31mred"),
     ("a\x7fb", "a\\x7fb"), ("a\x85b", "a\\x85b"), ("a\u2028b", "a\\u2028b"),
     ("a\u2029b", "a\\u2029b"), ("Zoë 日本", "Zoë 日本")],
)
def test_printable_escapes_control_characters(raw, shown):
    """Control characters (C0, DEL, C1, line/paragraph separators) are escaped."""
    assert printable(raw) == shown


def test_printable_bounds_length():
    """Long text is cut at the limit with an ellipsis."""
    assert printable("x" * 200) == "x" * 200
    assert printable("x" * 201) == "x" * 200 + "…"
    assert printable("abcdef", limit=3) == "abc…"


def test_redact_output_is_one_line():
    """Whatever goes in, what comes out has no line breaks."""
    out = redact("line1\nline2\rline3\u2028" + JWT)
    assert "\n" not in out and "\r" not in out and "\u2028" not in out


# --- the escaping observer ----------------------------------------------------------------------

FORGED = "2026-12-05T12:00:00+0000 [chatd.hub#info] admin entered lobby"
UNSAFE = ["\r", "\x0b", "\x0c", "\x1b", "\x1c", "\x85", "\x9b", "\u2028", "\u2029", "\u202e", "\u2066"]


def _classic(event):
    return formatEventAsClassicLogText(dict(event, log_time=0))


@pytest.mark.parametrize("char", UNSAFE + ["\n"])
def test_escaped_event_cannot_forge_a_line(char):
    """A field holding a line break or control character is written escaped, on one line."""
    event = {"log_format": "refused {origin}", "origin": "evil" + char + FORGED}
    text = _classic(escape_event(event))
    assert text.count("\n") == 1 and text.endswith("\n")
    assert char not in text[:-1]
    assert text.splitlines()[0].endswith(FORGED)  # still there, but not as a line of its own
    assert len(text.splitlines()) == 1


def test_escaped_failure_keeps_its_lines():
    """A traceback keeps its (indented) lines; a control character in it is escaped."""
    try:
        raise ValueError("bad\x85" + FORGED)
    except ValueError:
        failure = Failure()
    text = _classic(escape_event({"log_format": "oops", "log_failure": failure}))
    assert "\x85" not in text and "bad\\x85" + FORGED in text
    assert all(line.startswith("\t") for line in text.splitlines()[1:])
    assert not any(line.startswith(FORGED) for line in text.splitlines())


def test_clean_event_passes_unchanged():
    """An event with nothing to escape is handed on as it is, fields and all."""
    seen = []
    event = {"log_format": "{user} entered {room}", "user": "Zoë", "room": "lobby", "log_system": "-"}
    EscapingObserver(seen.append)(event)
    assert seen == [event] and seen[0] is event


def test_braces_in_escaped_text_are_not_formatted_again():
    """The escaped text becomes the format string: braces in it stay literal."""
    event = {"log_format": "got {text}", "text": "{log_format}\x1b{0}"}
    assert _classic(escape_event(event)).rstrip("\n").endswith("got {log_format}\\x1b{0}")


def test_crafted_origin_does_not_forge_a_line_in_twistds_log(chatd):
    """
    A real twistd: an Origin Autobahn cannot parse is refused and logged by
    Autobahn with the raw header; U+0085 (NEL) in it used to start a new
    line, in every reader that splits lines as Unicode does, that looked
    like one of chatd's.  Now it is written as \\x85, and no control
    character or separator reaches the log raw.
    """
    origin = "evil\u0085" + FORGED + "\u2028\u009b31m\u202e"
    request = (
        "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    ).encode() + b"Origin: " + origin.encode("utf-8") + b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", chatd.port), timeout=5) as raw:
        with client_tls().wrap_socket(raw) as tls:
            tls.sendall(request)
            assert tls.recv(4096).startswith(b"HTTP/1.1 400 ")
    wait_for(lambda: "No host part in Origin" in chatd.log_text(), 5, "the refusal in the log")
    text = chatd.log_text()
    lines = text.splitlines()  # str.splitlines breaks at NEL, U+2028, CR, FS, GS, RS, VT, FF
    assert not any(line.startswith(FORGED) for line in lines), [l for l in lines if FORGED in l]
    assert "\\x85" + FORGED in text
    assert not any(char in text for char in UNSAFE)
    assert len(lines) == text.count("\n")
