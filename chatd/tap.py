# -*- test-case-name: tests.test_tap -*-
"""
C{twistd chatd}: command-line options and C{makeService}, nothing else.

Configuration is loaded and checked in C{postOptions}, before twistd logs,
forks or changes directory: a bad file stops start-up with one line naming
file, section and key, and exit status 1.
"""

import re
import sys

from twisted.python import usage

from chatd import config, tls


class Options(usage.Options):
    synopsis = "[--config PATH]"
    longdesc = (
        "chatd: a secure real-time chat server. HTTP and WebSocket on one "
        "(TLS) listener; see README.md and docs/configuration.md."
    )
    optParameters = [["config", "c", "etc/chatd.ini", "Path to the INI configuration file."]]

    def postOptions(self):
        try:
            settings = config.load(self["config"])
            self["tls_options"] = tls.certificate_options(settings) if settings.server.tls else None
            _check_endpoint(settings, "server", settings.server.endpoint)
            if settings.admin.endpoint:
                _check_endpoint(settings, "admin", settings.admin.endpoint)
        except config.ConfigError as e:
            # One line, no usage text, no traceback, exit 1.
            sys.stderr.write(f"chatd: {e}\n")
            raise SystemExit(1) from None
        self["settings"] = settings
        if settings.server.log_format == "json" and self.parent is not None:
            # twistd starts logging before makeService runs; its --logger
            # option is the one hook that comes early enough.
            from chatd import jsonlog

            self.parent["logger"] = jsonlog.for_twistd(self.parent)


def _check_endpoint(settings, section, description):
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, description)
    except (ValueError, TypeError, KeyError, OSError) as e:  # ssl: reads files
        raise config.ConfigError(
            settings.path, section, "endpoint", f"not a Twisted server endpoint: {e}"
        ) from None
    port = _tcp_port(description)
    if port is not None and not 0 <= port <= 65535:
        # Twisted parses it, and only bind() refuses it, with a traceback.
        raise config.ConfigError(
            settings.path, section, "endpoint", f"port {port} is not between 0 and 65535"
        )


def _tcp_port(description):
    """The port of a tcp/tcp6/ssl description Twisted has parsed already, else None."""
    kind, *parts = re.split(r"(?<!\\):", description)
    if kind.lower() not in ("tcp", "tcp6", "ssl"):
        return None
    named = dict(part.split("=", 1) for part in parts if "=" in part)
    positional = [part for part in parts if "=" not in part]
    port = named.get("port", positional[0] if positional else None)
    return int(port) if port is not None else None


def makeService(options):
    """twistd's entry point: the service L{chatd.service.make_chat_service} builds."""
    from chatd.service import make_chat_service

    return make_chat_service(options["settings"], tls_options=options["tls_options"])
