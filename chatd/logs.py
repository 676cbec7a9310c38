# -*- test-case-name: tests.test_logs -*-
"""
Redaction and escaping: tickets, JWTs and query strings never reach a log
line, and no log line can be forged.

Everything chatd logs about a request goes through L{redact_uri} or
L{redact}; user-supplied names go through L{printable}.  Libraries log
client text too (Autobahn puts a refused Origin header in its message), so
the log observer itself is an L{EscapingObserver}: every event, chatd's
and its libraries', is written with C0/C1 controls, line and paragraph
separators and bidi controls escaped.  A text log (stdout, C{--logfile})
gets L{EscapingFileObserver}, which writes what L{EscapedClassicFormat}
makes of each event: the text of L{escape_event} and Twisted's classic
format in one pass.  The WebSocket protocols log through L{Logger},
Twisted's with a cheaper level check.
"""

import re
from _string import formatter_field_name_split, formatter_parser
from math import floor
from time import time

from twisted import logger
from twisted.logger import ILogObserver, LogLevel, formatEvent, formatTime, timeFormatRFC3339

# Twisted's mapping behind formatEvent ("{f()}" calls f), not exported;
# EscapedClassicFormat formats with it as Twisted does, only in C
# (str.format_map, not string.Formatter).  tests/test_logs.py holds the
# result to Twisted's own, so a change in Twisted shows there.
from twisted.logger._format import CallMapping, PotentialCallWrapper
from twisted.python.compat import ioType
from zope.interface import implementer

_JWT = re.compile(r"eyJ[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]*")
# Any *ticket / *token name: id_token, refresh_token and the like too.
_SECRET_PARAM = re.compile(r"(?i)\b(\w*(?:ticket|token)|jwt)=[^&\s\"']*")
_BEARER = re.compile(r"(?i)\bBearer\s+\S+")
# The same as a JSON or Python dict entry: {"ticket": "..."} in a response body.
_SECRET_ENTRY = re.compile(r"""(?i)(["']\w*(?:ticket|token)["']\s*:\s*["'])[^"']*""")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# What a log line must not hold raw: C0 and C1 controls (CR, ESC, NEL U+0085,
# CSI U+009B ...), the line and paragraph separators, and the bidi
# embeddings, overrides and isolates that reorder what a terminal shows.
_LOG_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# The same but LF: a traceback's lines, which Twisted's text format indents.
_LOG_UNSAFE_BUT_LF = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape_char(match):
    code = ord(match.group())
    return "\\x%02x" % code if code < 256 else "\\u%04x" % code


def redact_uri(uri):
    """A request target with its query replaced: C{/ws?ticket=x} -> C{/ws?…}."""
    if isinstance(uri, bytes):
        uri = uri.decode("latin-1")
    path, sep, _ = uri.partition("?")
    return printable(path) + ("?[redacted]" if sep else "")


def redact(text):
    """Any free text that might carry a secret (an exception message, say)."""
    text = _JWT.sub("[jwt]", str(text))
    text = _SECRET_PARAM.sub(lambda m: m.group(1) + "=[redacted]", text)
    text = _BEARER.sub("Bearer [redacted]", text)
    text = _SECRET_ENTRY.sub(lambda m: m.group(1) + "[redacted]", text)
    return printable(text)


def printable(text, limit=200):
    """Control characters escaped and length bounded, for names in logs."""
    text = _CONTROL.sub(_escape_char, str(text))
    return text if len(text) <= limit else text[:limit] + "…"


def escape_log_text(text, keep_newlines=False):
    """
    C{text} with every character L{EscapingObserver} keeps out of the log
    escaped as C{\\xNN} or C{\\uNNNN}; with C{keep_newlines}, LF stays.
    """
    pattern = _LOG_UNSAFE_BUT_LF if keep_newlines else _LOG_UNSAFE
    return pattern.sub(_escape_char, text)


class _EscapedFailure:
    """A logged Failure whose traceback text comes out escaped (its lines kept)."""

    def __init__(self, failure):
        self._failure = failure

    def getTraceback(self, *args, **kwargs):
        return escape_log_text(self._failure.getTraceback(*args, **kwargs), keep_newlines=True)

    def __getattr__(self, name):
        return getattr(self._failure, name)


def escape_event(event):
    """
    C{event} as it may be written: the same event when nothing in its text
    needs escaping, else a copy whose C{log_format} is the escaped text (so
    the fields cannot be formatted raw again), whose failure's traceback is
    escaped line by line and whose C{log_system} is escaped.
    """
    text = formatEvent(event)
    safe = escape_log_text(text)
    failure = event.get("log_failure")
    system = event.get("log_system")
    safe_system = escape_log_text(str(system)) if system is not None else None
    if safe == text and failure is None and safe_system == system:
        return event
    escaped = dict(event)
    if "log_format" in event or safe:
        escaped["log_format"] = safe.replace("{", "{{").replace("}", "}}")
    if failure is not None:
        escaped["log_failure"] = _EscapedFailure(failure)
    if system is not None:
        escaped["log_system"] = safe_system
    return escaped


@implementer(ILogObserver)
class EscapingObserver:
    """
    Wraps the observer that writes the log (twistd's text file or stdout):
    each event reaches it through L{escape_event}.  chatd/tap.py installs it
    as twistd's C{--logger}.
    """

    def __init__(self, observer):
        self._observer = observer

    def __call__(self, event):
        self._observer(escape_event(event))


# A log level's type (constantly's NamedConstant), and the levels.
_Constant = type(LogLevel.info)
_LEVELS = frozenset(LogLevel.iterconstants())


class Logger(logger.Logger):
    """
    Twisted's L{twisted.logger.Logger}, whose C{emit} looks the level up in
    a set: Twisted's sorts C{LogLevel}'s constants for every event to see
    whether the level is one of them (about a microsecond).  Anything but
    one of those constants goes to Twisted's C{emit}, which refuses it as
    before.
    """

    def emit(self, level, format=None, **kwargs):
        """As L{twisted.logger.Logger.emit}: the same event to the same observer."""
        if level.__class__ is not _Constant or level not in _LEVELS:
            return super().emit(level, format, **kwargs)
        event = kwargs
        event["log_logger"] = self
        event["log_level"] = level
        event["log_namespace"] = self.namespace
        event["log_source"] = self.source
        event["log_format"] = format
        event["log_time"] = time()
        if "log_trace" in event:
            event["log_trace"].append((self, self.observer))
        self.observer(event)


# A fraction of a second below this cannot round (to the microsecond, as
# datetime.fromtimestamp does) up into the next second.
_CACHEABLE_FRACTION = 0.999999
# How many "namespace#level" system texts a format keeps (a class's logger
# each, at a level or two).
_SYSTEMS_KEPT = 256


class EscapedClassicFormat:
    """
    What a text log writes for an event: exactly
    C{formatEventAsClassicLogText(escape_event(event), formatTime=lambda t:
    formatTime(t, timeFormatRFC3339))}, in one pass.  That composition
    formatted each event's text twice (once to see whether it needs
    escaping, once to write it) through Twisted's C{string.Formatter} in
    Python, and worked out the time stamp (a C{datetime}, a time zone,
    C{strftime}) for every event, though it shows whole seconds only.  Here
    the text is formatted once, by C{str.format_map} (Twisted's formatter
    only for what that cannot format, so an unformattable event reads as
    before), and the stamp once per second: the last second's stamp is
    kept, keyed on the second, so a change of local time's offset, which
    happens on a whole second, starts a new stamp.  (A C{time.tzset()} in
    the process is seen from the next second on.)  The system text
    C{"namespace#level"} is kept per namespace and level, and text that
    C{str.isprintable} passes has nothing to escape.
    """

    def __init__(self):
        self._second = None
        self._stamp = None
        self._systems = {}  # (namespace, level) -> "namespace#level"

    def __call__(self, event):
        """
        @param event: a log event.
        @return: its line(s), each ending in LF (a traceback's lines
            indented with a tab), or L{None} when the event has no text.
        """
        text = _event_text(event)
        if not text.isprintable():  # all _LOG_UNSAFE is not, and most text is
            text = _LOG_UNSAFE.sub(_escape_char, text)
        system = event.get("log_system")
        if system is not None:
            system = escape_log_text(str(system))
        if "log_failure" in event:
            try:
                traceback = escape_log_text(event["log_failure"].getTraceback(), keep_newlines=True)
            except BaseException as e:  # Twisted's words, as its formatter catches
                traceback = "(UNABLE TO OBTAIN TRACEBACK FROM EVENT):" + str(e)
            text = text + "\n" + traceback
        if not text:
            return None
        stamp = self._time_stamp(event.get("log_time"))
        if system is None:
            namespace = event.get("log_namespace", "-")
            level = event.get("log_level")
            # A str and a constant (or None) always read the same: keep their text.
            kept = namespace.__class__ is str and (level is None or level.__class__ is _Constant)
            system = self._systems.get((namespace, level)) if kept else None
            if system is None:
                system = "{namespace}#{level}".format(namespace=namespace, level="-" if level is None else level.name)
                if kept and len(self._systems) < _SYSTEMS_KEPT:
                    self._systems[(namespace, level)] = system
        return f"{stamp} [{system}] {text}".replace("\n", "\n\t") + "\n"

    def _time_stamp(self, when):
        """C{formatTime(when, timeFormatRFC3339)}, worked out once per second."""
        if when is None:
            return "-"
        if when.__class__ is float or when.__class__ is int:
            try:
                second = floor(when)
            except (ValueError, OverflowError):  # NaN, infinity: formatTime's refusal
                return formatTime(when, timeFormatRFC3339)
            if when - second < _CACHEABLE_FRACTION:
                if second != self._second:
                    self._stamp = formatTime(when, timeFormatRFC3339)
                    self._second = second
                return self._stamp
        return formatTime(when, timeFormatRFC3339)


def _event_text(event):
    """
    C{formatEvent(event)}: a plain C{str} format with C{str.format_map} over
    the event itself when L{_plain_format} says its fields read the same
    there (about 0.6 against 3 µs for three fields), else over Twisted's
    C{CallMapping} (against 8 µs); whatever that cannot format, by Twisted.
    """
    log_format = event.get("log_format")
    if log_format.__class__ is str and "log_flattened" not in event:
        plain = _plain_formats.get(log_format)
        if plain is None:
            plain = _plain_format(log_format)
            if len(log_format) <= _PLAIN_FORMAT_KEPT_LENGTH and len(_plain_formats) < _PLAIN_FORMATS_KEPT:
                _plain_formats[log_format] = plain
        try:
            return log_format.format_map(event if plain else CallMapping(event))
        except BaseException:  # as Twisted's formatter: the event is still logged
            pass
    return formatEvent(event)


# What _plain_format said of the formats seen: format strings are constants,
# a few dozen in all; the bounds are for a library that makes them up.
_plain_formats = {}
_PLAIN_FORMATS_KEPT = 512
_PLAIN_FORMAT_KEPT_LENGTH = 400
# Attributes that PotentialCallWrapper, not the field's value, answers.
_WRAPPER_ATTRIBUTES = frozenset(dir(PotentialCallWrapper))


def _plain_format(log_format):
    """
    Whether C{log_format.format_map(event)} formats as C{format_map} over
    C{CallMapping(event)} does: so when no field (nor one nested in a format
    spec) is called (C{"{f()}"}, C{"{x.f()}"}), is positional, or names an
    attribute that C{CallMapping}'s wrapper would answer itself
    (C{"{x.__class__}"}, C{"{x._wrapped}"}).  A field's value, its items,
    its other attributes, conversions and format specs read the same
    through the wrapper.  A format that does not parse is not plain (the
    wrapper then raises as before, and Twisted formats the event).
    """
    try:
        for _, field, spec, _ in formatter_parser(log_format):
            if field is None:
                continue
            first, rest = formatter_field_name_split(field)
            if first.__class__ is not str or not first or first.endswith("()"):
                return False
            for is_attribute, name in rest:
                if is_attribute and (name.startswith("_") or name.endswith("()") or name in _WRAPPER_ATTRIBUTES):
                    return False
            if "{" in spec and not _plain_format(spec):
                return False
    except ValueError:
        return False
    return True


class EscapingFileObserver(EscapingObserver):
    """
    The L{EscapingObserver} of a text log (stdout, C{--logfile}): what
    Twisted's L{FileLogObserver} over L{EscapedClassicFormat} did (which
    escapes as L{escape_event} does), in one call per event: the line
    encoded as UTF-8 for a binary file, written and flushed, so that it
    leaves as it is logged.
    """

    def __init__(self, out):
        """
        @param out: the file-like object written to (text, or bytes as
            UTF-8), like C{textFileLogObserver}'s.
        """
        self._format = EscapedClassicFormat()
        self._out = out
        self._encoding = None if ioType(out) is str else "utf-8"

    def __call__(self, event):
        text = self._format(event)
        if text:
            out = self._out
            out.write(text if self._encoding is None else text.encode(self._encoding))
            out.flush()
