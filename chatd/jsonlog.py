# -*- test-case-name: tests.test_jsonlog -*-
"""
C{[server] log_format = json}: one JSON object per line, for log shippers.

Each line has C{ts} (ISO 8601, UTC, milliseconds), C{level}, C{event} (a
stable name), C{msg} (the rendered text) and the event's structured fields.
The stable name is the event's own C{event} field when the code gave one,
else the logger's namespace and the words of its format string (which are
constants: a name changes only when the code does), e.g.
C{chatd.ws.ChatServerProtocol:websocket_closed}.

Every text value, C{msg} included, goes through L{chatd.logs.redact}, so
tickets, JWTs, bearer tokens and secret query parameters never appear
(the code redacts what it logs already; this is the second belt).
Failures add C{error} and C{traceback}, redacted too.

twistd picks its log observer before C{makeService} runs, so
L{chatd.tap} installs L{observer_factory} as twistd's C{--logger} when the
configuration asks for json.
"""

import datetime
import json
import re
import sys

from twisted.logger import FileLogObserver, formatEvent

from chatd.logs import redact

# Keys of Twisted's legacy log events, shown through msg or not at all.
_LEGACY = frozenset({"message", "format", "isError", "system", "why", "failure", "time", "printed"})
_FIELD = re.compile(r"\{[^{}]*\}")
_WORD = re.compile(r"[a-z0-9]+")
_SLUG_WORDS = 6


def event_name(event):
    """The stable name of a log event (see the module docstring)."""
    given = event.get("event")
    if isinstance(given, str) and given:
        return given
    namespace = event.get("log_namespace") or "log"
    template = event.get("log_format") or ""
    words = _WORD.findall(_FIELD.sub(" ", template).lower())[:_SLUG_WORDS]
    return f"{namespace}:{'_'.join(words)}" if words else namespace


def _value(value):
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(value)


def _timestamp(seconds):
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_json(event):
    """
    One log event as one line of JSON (with its newline), as
    C{FileLogObserver} wants a formatter.
    """
    level = event.get("log_level")
    record = {
        "ts": _timestamp(event.get("log_time") or 0),
        "level": level.name if level is not None else "info",
        "event": event_name(event),
        "msg": redact(formatEvent(event)),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _LEGACY or key in record:
            continue
        record[key] = _value(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = redact(failure.getErrorMessage())
        record["traceback"] = redact(failure.getTraceback())
    return json.dumps(record, ensure_ascii=False) + "\n"


def json_observer(stream):
    """An C{ILogObserver} writing L{format_json} lines to C{stream}."""
    return FileLogObserver(stream, format_json)


def observer_for(logfile="-", nodaemon=True):
    """
    The JSON observer where twistd would write: standard output for C{-n}
    without C{--logfile} (or C{--logfile=-}), else the file (twistd's
    C{twistd.log} by default when daemonized).
    """
    if logfile == "-" or (not logfile and nodaemon):
        return json_observer(sys.stdout)
    return json_observer(open(logfile or "twistd.log", "a", encoding="utf-8"))


_twistd_options = None


def for_twistd(options):
    """
    Remember twistd's C{ServerOptions} and return the C{--logger} value
    naming L{twistd_observer}: twistd imports that name once it has parsed
    every option, and calls it with no arguments when logging starts.
    """
    global _twistd_options
    _twistd_options = options
    return __name__ + ".twistd_observer"


def twistd_observer():
    """twistd's C{--logger} factory: L{observer_for} with twistd's options."""
    options = _twistd_options or {}
    return observer_for(options.get("logfile") or "", bool(options.get("nodaemon")))
