# -*- test-case-name: tests.test_logs -*-
"""
Redaction: tickets, JWTs and query strings never reach a log line.

Everything chatd logs about a request goes through L{redact_uri} or
L{redact}; user-supplied names go through L{printable} so a log line cannot
be forged with control characters.
"""

import re

_JWT = re.compile(r"eyJ[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]*\.[A-Za-z0-9_\-]*")
# Any *ticket / *token name: id_token, refresh_token and the like too.
_SECRET_PARAM = re.compile(r"(?i)\b(\w*(?:ticket|token)|jwt)=[^&\s\"']*")
_BEARER = re.compile(r"(?i)\bBearer\s+\S+")
# The same as a JSON or Python dict entry: {"ticket": "..."} in a response body.
_SECRET_ENTRY = re.compile(r"""(?i)(["']\w*(?:ticket|token)["']\s*:\s*["'])[^"']*""")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


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
    text = _CONTROL.sub(lambda m: "\\x%02x" % ord(m.group()) if ord(m.group()) < 256 else "\\u%04x" % ord(m.group()), str(text))
    return text if len(text) <= limit else text[:limit] + "…"
