# -*- test-case-name: tests.test_logs -*-
"""chatd.logs: secrets never reach a log line, and names cannot forge lines."""

import calendar
import io
import os
import socket
import time

import pytest
from constantly import NamedConstant, Names
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.logger import (
    LogLevel,
    LogPublisher,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    textFileLogObserver,
    timeFormatRFC3339,
)
from twisted.logger import Logger as TwistedLogger
from twisted.logger._flatten import flattenEvent
from twisted.logger._format import CallMapping
from twisted.python.failure import Failure
from twisted.python.reflect import safe_repr

from chatd import logs
from chatd.logs import (
    EscapedClassicFormat,
    EscapingFileObserver,
    EscapingObserver,
    Logger,
    escape_event,
    printable,
    redact,
    redact_uri,
)
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


# --- the one-pass text format ---------------------------------------------------------------------


def _today(event):
    """What chatd's text log wrote before EscapedClassicFormat: escape, then Twisted's format."""
    return formatEventAsClassicLogText(
        escape_event(event), formatTime=lambda t: formatTime(t, timeFormatRFC3339)
    )


def _outcome(format_event, event):
    try:
        return "text", format_event(event)
    except Exception as e:
        return "raised", type(e)


class _Thing:
    """A field with an attribute, items and a repr, all holding client text."""

    def __init__(self, text):
        self.text = text

    def __getitem__(self, key):
        return self.text + str(key)

    def __repr__(self):
        return f"Thing({self.text!r})"


class _Call:
    """A field Twisted calls: C{{name()}}."""

    def __init__(self, text):
        self.text = text

    def __call__(self):
        return self.text

    def __repr__(self):
        return f"Call({self.text!r})"


class _Unformattable:
    """A field that cannot be formatted (Twisted then quotes the event's repr)."""

    def __format__(self, spec):
        raise ValueError("no format\x1b[2J")

    def __repr__(self):
        return "<unformattable\x85" + FORGED + ">"


class _Unrepresentable(_Unformattable):
    """A field that cannot be formatted nor repr'd ("MESSAGE LOST", with a traceback)."""

    def __repr__(self):
        raise RuntimeError("no repr\u2028" + FORGED)

    def _repr_pretty_(self, printer, cycle):  # how Hypothesis shows a failing example
        printer.text("_Unrepresentable()")


class _Level:
    """A log_level that is not one of LogLevel's constants, with a name of client text."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"Level({self.name!r})"


# A few namespaces that come round again in a run, as a class's logger's do.
NAMESPACES = ["chatd.ws.ChatServerProtocol", "chatd.hub", "-", "", "a\x1bb"]


class _NoTraceback:
    """A log_failure whose traceback cannot be had."""

    def getTraceback(self):
        raise RuntimeError("no traceback\x1b" + FORGED)


def _failure(message):
    try:
        raise ValueError(message)
    except ValueError:
        return Failure()


SPECIAL = "\x00\x07\t\n\r\x0b\x0c\x1b\x1c\x7f\x80\x85\x9b\x9f\u2028\u2029\u202a\u202e\u2066\u2069{}{}é日"
texts = st.text(st.one_of(st.sampled_from(SPECIAL), st.characters(max_codepoint=0x2100)), max_size=10)
values = st.one_of(
    texts, st.integers(), st.floats(), st.none(), st.lists(texts, max_size=3),
    st.builds(_Thing, texts), st.builds(_Call, texts),
    st.builds(_Unformattable), st.builds(_Unrepresentable),
)
fields = st.builds(
    "{}{}{}{}".format,
    st.sampled_from(["a", "b", "c", "missing", "log_level", "log_namespace", "0", ""]),
    st.sampled_from(["", "()", ".text", "[0]", "[k]", ".text()", ".__class__", "._wrapped"]),
    st.sampled_from(["", "!r", "!s", "!a"]),
    st.sampled_from(["", ":>8", ":x", ":.3", ":{w}"]),  # w: a width from WIDTHS, not gigabytes
).map(lambda field: "{" + field + "}")
# Literal text with braces but no ":": a field it happens to spell cannot ask for a giant width.
literals = st.text(
    st.one_of(st.sampled_from(SPECIAL), st.characters(max_codepoint=0x2100, exclude_characters=":")), max_size=10
)
formats = st.lists(st.one_of(literals, fields), max_size=5).map("".join)
WIDTHS = ["", ">5", "x", ".2", "%", "{", 7, 2.5, None, _Thing("")]
# Whole seconds, within one, and where rounding to the microsecond carries
# into the next second (datetime.fromtimestamp rounds half to even).
FRACTIONS = [0.0, 1e-7, 0.25, 0.5, 0.999999, 0.9999994, 0.9999995, 0.9999996, 0.9999999, -1e-7, -0.5]


def _events(times):
    return st.fixed_dictionaries(
        {"a": values, "b": values, "c": values, "w": st.sampled_from(WIDTHS)},
        optional={
            "log_format": st.one_of(formats, formats, st.none(), formats.map(str.encode)),
            "log_failure": st.one_of(st.builds(_failure, texts), st.none(), st.builds(_NoTraceback)),
            "log_system": st.one_of(texts, st.none(), st.integers()),
            "log_time": times,
            "log_level": st.one_of(
                st.sampled_from(list(LogLevel.iterconstants())), st.none(), st.builds(_Level, texts), st.integers(),
                st.lists(texts, max_size=1),
            ),
            "log_namespace": st.one_of(texts, st.none(), st.sampled_from(NAMESPACES), st.integers()),
        },
    )


@st.composite
def event_runs(draw):
    """A few events in a row, their times often in one second or the next: one formatter's work."""
    base = draw(st.integers(-(2**31), 2**34))
    near = st.builds(lambda n, fraction: base + n + fraction, st.integers(0, 1), st.sampled_from(FRACTIONS))
    times = st.one_of(
        st.none(),
        near, near, near,
        st.integers(0, 2**34),
        st.floats(-1e9, 1e10),
        st.just(float("nan")),
    )
    events = draw(st.lists(_events(times), min_size=1, max_size=6))
    for event in events:
        if draw(st.booleans()):
            try:
                flattenEvent(event)  # as Twisted's JSON log and legacy observers hand them on
            except Exception:
                pass
    return events


@given(event_runs())
@example([{"log_format": "x", "log_time": t} for t in (5.25, 5.9999999, 6.5, -1.5, -0.5, -1e-7, 0.25)])
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_one_pass_format_writes_what_escaping_then_twisted_wrote(events):
    """
    EscapedClassicFormat, one formatter over a run of events, gives each
    exactly what escape_event then Twisted's classic format gave (or raises
    what it raised): fields holding controls, separators, bidi controls and
    braces; events without a format, with bytes or flattened ones, with
    failures whose text holds controls or whose traceback cannot be had,
    with or without a system, level and namespace; times unset, whole,
    fractional, next to and across a second's edge; unformattable fields.
    """
    format_event = EscapedClassicFormat()
    for event in events:
        assert _outcome(format_event, event) == _outcome(_today, event), safe_repr(event)


def test_one_pass_format_of_a_chatd_line():
    """The line chatd writes per connection: the same text, fields escaped, as before."""
    event = {
        "log_format": "websocket {peer} {user} connected as {connection}",
        "peer": "tcp4:127.0.0.1:5555", "user": "Zoë\x1b[2J", "connection": 42,
        "log_level": LogLevel.info, "log_namespace": "chatd.ws.ChatServerProtocol",
        "log_time": 1796000000.5,
    }
    text = EscapedClassicFormat()(event)
    assert text == _today(event)
    assert text.endswith(" [chatd.ws.ChatServerProtocol#info] websocket tcp4:127.0.0.1:5555 Zoë\\x1b[2J connected as 42\n")


def test_no_text_no_line():
    """An event without a format or failure gives no line, as Twisted's format gives none."""
    assert EscapedClassicFormat()({"log_time": 1.5, "log_system": "x"}) is None
    assert EscapedClassicFormat()({"log_format": "", "log_time": float("nan")}) is None


@pytest.fixture
def local_zone():
    """Sets the process's local time zone (TZ, time.tzset) for one test; restores it after."""
    saved = os.environ.get("TZ")

    def set_zone(zone):
        os.environ["TZ"] = zone
        time.tzset()

    yield set_zone
    if saved is None:
        os.environ.pop("TZ", None)
    else:
        os.environ["TZ"] = saved
    time.tzset()


@pytest.mark.parametrize(
    "zone,switch,before,after,next_second",
    [
        # New York's summer time begins: 02:00 EST becomes 03:00 EDT (07:00 UTC).
        ("EST+5EDT,M3.2.0,M11.1.0", (2026, 3, 8, 7, 0, 0),
         "2026-03-08T01:59:59-0500", "2026-03-08T03:00:00-0400", "2026-03-08T03:00:01-0400"),
        # Berlin's ends: 03:00 CEST becomes 02:00 CET (01:00 UTC), the hour's stamps again.
        ("CET-1CEST,M3.5.0,M10.5.0/3", (2026, 10, 25, 1, 0, 0),
         "2026-10-25T02:59:59+0200", "2026-10-25T02:00:00+0100", "2026-10-25T02:00:01+0100"),
    ],
)
def test_time_stamp_kept_per_second_follows_the_offset(local_zone, zone, switch, before, after, next_second):
    """
    The stamp is worked out once per second: two events within one second
    share it, the next second gets its own, with the offset local time has
    then (here across a switch to and from summer time, west and east of
    UTC), and a time that rounds to the microsecond into the next second
    gets that second's, all as formatTime gives them.
    """
    local_zone(zone)
    second = calendar.timegm(switch)
    format_event = EscapedClassicFormat()
    times_and_stamps = [
        (second - 1 + 0.25, before), (second - 1 + 0.75, before),  # within one second
        (second - 1e-7, after),  # rounds up into the switch's second
        (second + 0.5, after), (second + 0.999, after),
        (second - 0.5, before),  # back again
        (second + 1, next_second),
    ]
    for when, stamp in times_and_stamps:
        assert formatTime(when, timeFormatRFC3339) == stamp
        line = format_event({"log_format": "x", "log_time": when, "log_system": "s"})
        assert line == f"{stamp} [s] x\n", when


@pytest.mark.parametrize("out", [io.StringIO, io.BytesIO])
def test_escaping_file_observer_writes_what_twisted_wrote(out):
    """EscapingFileObserver writes (and encodes) what Twisted's text file observer wrote of escaped events."""
    new, old = out(), out()
    events = [
        {"log_format": "refused {origin}", "origin": "evil\x85" + FORGED, "log_time": 1796000000.25},
        {"log_format": "oops", "log_failure": _failure("bad\u2028" + FORGED), "log_time": 1796000000.5},
        {"log_system": "no text", "log_time": 1796000001.0},
        {"log_format": "Zoë {n}", "n": 1, "log_namespace": "chatd", "log_level": LogLevel.warn},
    ]
    observer = EscapingFileObserver(new)
    for event in events:
        observer(event)
        EscapingObserver(textFileLogObserver(old))(event)
    assert isinstance(observer, EscapingObserver)
    assert new.getvalue() == old.getvalue()
    text = new.getvalue() if out is io.StringIO else new.getvalue().decode("utf-8")
    assert len(text.splitlines()) == text.count("\n") and "\x85" not in text


def test_escaping_file_observer_line_leaves_as_it_is_logged(tmp_path):
    """Each line is in the file when the observer returns: flushed, not kept in a buffer a kill could lose."""
    path = tmp_path / "chatd.log"
    with open(path, "w", encoding="utf-8") as out:  # block-buffered, as twistd's stdout to a file is
        observer = EscapingFileObserver(out)
        for n in range(3):
            observer({"log_format": "line {n}", "n": n, "log_time": 1796000000.5, "log_system": "s"})
            assert path.read_text(encoding="utf-8").count("\n") == n + 1


# --- the event's text, over the event itself where Twisted's wrapper changes nothing -------------


def _main_event_text(event):
    """What chatd.logs._event_text did before it formatted over the event itself: CallMapping always."""
    log_format = event.get("log_format")
    if log_format.__class__ is str and "log_flattened" not in event:
        try:
            return log_format.format_map(CallMapping(event))
        except BaseException:
            pass
    return formatEvent(event)


class _Odd:
    """
    A field with attributes named as CallMapping's wrapper's (C{_wrapped}, and
    C{__class__} and C{__dict__} of course), a method, items and its own format.
    """

    _wrapped = "own _wrapped"

    def __init__(self, text):
        self.text = text

    def call(self):
        return "called " + self.text

    def __getitem__(self, key):
        return _Odd(f"{self.text}[{key!r}]")

    def __format__(self, spec):
        return "odd:" + format(self.text, spec)

    def __repr__(self):
        return f"Odd({self.text!r})"


odd_values = st.one_of(
    texts, st.integers(), st.none(), st.lists(texts, max_size=3), st.dictionaries(texts, texts, max_size=2),
    st.builds(_Odd, texts), st.builds(_Call, texts), st.builds(_Thing, texts), st.builds(_Unformattable),
)
odd_names = st.sampled_from(["a", "b", "missing", "0", "", "a()", "log_level", "w"])
odd_paths = st.lists(
    st.sampled_from([
        ".text", "._wrapped", ".__class__", ".__dict__", "._x", ".call", ".call()", ".name", ".real",
        "[0]", "[1]", "[k]", "[k()]", "[_wrapped]", "[]", ".", "[",
    ]),
    max_size=2,
).map("".join)
odd_fields = st.builds(
    lambda name, path, conversion, spec: "{" + name + path + conversion + spec + "}",
    odd_names, odd_paths,
    st.sampled_from(["", "!r", "!s", "!a", "!x"]),
    st.sampled_from(["", ":>6", ":x", ":.2", ":{w}", ":>{w}", ":{a.text}", ":{a._wrapped}", ":{a.call()}", ":{0}",
                     ":{a:{w}}", ":{a()}"]),
)
odd_literals = st.lists(
    st.one_of(st.sampled_from(["{{", "}}", "{", "}", "()", "(", "!", ".", "[", "é", "\x1b"]),
              st.characters(max_codepoint=0x7f, exclude_characters="{}:")),
    max_size=6,
).map("".join)
odd_formats = st.lists(st.one_of(odd_literals, odd_fields), max_size=4).map("".join)


@given(
    st.fixed_dictionaries(
        {"log_format": odd_formats, "a": odd_values, "b": odd_values, "log_level": st.sampled_from(list(LogLevel.iterconstants()))},
        optional={"w": st.sampled_from(WIDTHS + [3])},
    )
)
@settings(max_examples=3000, deadline=None)
def test_event_text_over_the_event_reads_as_over_call_mapping(event):
    """
    An event's text, formatted over the event itself where the format's
    fields read the same there, is what formatting it over Twisted's
    CallMapping gave, and Twisted's formatEvent gives: fields that are
    called ({a()}, {a.call()}), positional or numbered, attributes
    Twisted's wrapper answers itself ({a.__class__}, {a._wrapped}), items,
    conversions, nested specs holding any of these, and formats that do
    not parse.  Twice each: once as a new format, once as one seen before.
    """
    first = logs._event_text(event)
    assert first == logs._event_text(event) == _main_event_text(event) == formatEvent(event)


@pytest.mark.parametrize(
    "log_format,plain",
    [
        ("websocket {peer} {user} connected as {connection}", True),
        ("{a.text} {a[0]} {a[k]!r:>{w}}", True),
        ("no fields, f() and {{braces}}", True),
        ("{a()}", False), ("{a.call()}", False), ("{a:{b()}}", False),
        ("{a.__class__}", False), ("{a._wrapped}", False), ("{a:{b._x}}", False),
        ("{}", False), ("{0}", False), ("{a[0]}{1}", False),
        ("{a", False), ("{a.}", False),
    ],
)
def test_plain_formats(log_format, plain):
    """Which formats are formatted over the event itself: plain names, items and public attributes only."""
    assert logs._plain_format(log_format) is plain


def test_only_unprintable_text_can_need_escaping():
    """Every character the log escapes is one str.isprintable refuses, so printable text is written as it is."""
    unprintable = {c for c in map(chr, range(0x110000)) if not c.isprintable()}
    assert all(char in unprintable for char in map(chr, range(0x110000)) if logs.escape_log_text(char) != char)


# --- chatd's Logger ------------------------------------------------------------------------------


def _emitted(logger_class, monkeypatch, level, format, fields):
    """
    What one emit hands the observer (at a fixed time; the logger and the
    observer named, not shown, as each run has its own), or the exception it raised.
    """
    monkeypatch.setattr("twisted.logger._logger.time", lambda: 1796000000.25)
    monkeypatch.setattr("chatd.logs.time", lambda: 1796000000.25)
    seen = []
    observer = seen.append
    log = logger_class(namespace="chatd.test", source="a source", observer=observer)

    def named(value):
        return "LOGGER" if value is log else "OBSERVER" if value is observer else value

    try:
        log.emit(level, format, **fields)
    except Exception as e:
        return "raised", type(e)
    events = []
    for event in seen:
        if "log_failure" in event:  # Twisted's refusal: a new Failure each time
            events.append(("refused", sorted(event), event["log_format"], event["invalidLevel"] is level))
            continue
        items = [(key, "TRACE" if key == "log_trace" else named(value)) for key, value in event.items()]
        trace = [tuple(map(named, step)) for step in event.get("log_trace", ())]
        events.append((items, trace))
    return events


class _Other:
    """A level that is none of LogLevel's constants."""

    name = "info"


class _Colours(Names):
    """Named constants that are not log levels."""

    info = NamedConstant()


@given(
    st.one_of(
        st.sampled_from(list(LogLevel.iterconstants())), st.sampled_from([None, "info", 20, _Other(), _Colours.info, []])
    ),
    st.one_of(st.none(), formats),
    st.dictionaries(st.sampled_from(["a", "b", "log_level", "log_time", "log_namespace", "format", "level", "x y"]), values, max_size=3),
    st.booleans(),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_logger_emits_what_twisteds_emits(monkeypatch, level, format, fields, trace):
    """
    chatd's Logger hands its observer the same event, its keys in the same
    order, as Twisted's Logger: every level, fields that clash with the
    event's own keys, a log_trace; and refuses a level that is not a
    LogLevel as Twisted's does (an event with a failure).
    """
    if trace:
        fields = dict(fields, log_trace=[])
    ours = _emitted(Logger, monkeypatch, level, format, dict(fields))
    if trace:
        fields = dict(fields, log_trace=[])  # a new trace for Twisted's
    theirs = _emitted(TwistedLogger, monkeypatch, level, format, dict(fields))
    assert ours == theirs


def test_logger_traces_as_twisteds():
    """A log_trace gets the logger and its observer, then the publisher and each of its observers."""
    seen = []
    publisher = LogPublisher(seen.append)
    log = Logger(namespace="chatd.test", observer=publisher)
    log.info("traced", log_trace=[])
    assert seen[0]["log_trace"] == [(log, publisher), (publisher, seen.append)]


class _Owner:
    """A class with a chatd Logger, as chatd's protocols have."""

    log = Logger()


def test_logger_on_a_class_names_the_class():
    """As Twisted's: a Logger read from an instance has the class's namespace, the instance as source, and is chatd's."""
    owner = _Owner()
    assert isinstance(owner.log, Logger)
    assert (owner.log.namespace, owner.log.source) == (f"{__name__}._Owner", owner)
