# -*- test-case-name: tests.test_logs -*-
"""
Redaction and escaping: tickets, JWTs and query strings never reach a log
line, and no log line can be forged.

Everything chatd logs about a request goes through L{redact_uri} or
L{redact}; user-supplied names go through L{printable}.  Libraries log
client text too (Autobahn puts a refused Origin header in its message), so
the log observer itself is wrapped in L{EscapingObserver}: every event,
chatd's and its libraries', is written with C0/C1 controls, line and
paragraph separators and bidi controls escaped.
"""

import re

from twisted.logger import ILogObserver, formatEvent
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
