# -*- test-case-name: tests.test_logs -*-
"""chatd.logs: secrets never reach a log line, and names cannot forge lines."""

import pytest

from chatd.logs import printable, redact, redact_uri

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
