# -*- test-case-name: tests.test_tap -*-
"""
C{twistd chatd}: command-line options and C{makeService}, nothing else.

Configuration is loaded and checked in C{postOptions}, before twistd logs,
forks or changes directory: a bad file stops start-up with one line naming
file, section and key, and exit status 1.

The log: unless C{--logger} names another, C{postOptions} makes
L{log_observer} twistd's logger: the observer twistd would make itself
(stdout, C{--logfile} or C{--syslog}) as a L{chatd.logs.EscapingObserver},
so no event, chatd's or a library's, writes control characters raw.
"""

import errno
import gc
import os
import re
import socket
import sys

from twisted.python import usage

from chatd import config, logs, tls

# twistd's own options (the parent of ours), for log_observer: twistd calls
# a --logger with no arguments.
_server_options = None


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
        else:
            _escape_twistd_log(self.parent)


def _escape_twistd_log(server_options):
    """Make L{log_observer} twistd's logger, unless the command line chose one."""
    global _server_options
    if server_options is None or server_options.get("logger") is not None:
        return  # not under twistd (tests), or the operator's own --logger
    _server_options = server_options
    server_options["logger"] = f"{__name__}.log_observer"  # twistd imports it by name


def log_observer():
    """
    twistd's C{--logger}: the observer twistd would make from its options
    (syslog, C{--logfile} with rotation on SIGUSR1, or stdout with C{-n}),
    escaping: L{chatd.logs.EscapingObserver} around syslog's, and for text
    L{chatd.logs.EscapingFileObserver}, which writes what Twisted's text
    file observer would write of the escaped event, in one pass.
    """
    from twisted.logger import LegacyLogObserverWrapper
    from twisted.python import logfile

    options = _server_options or {}
    if options.get("syslog"):
        from twisted.python import syslog

        emit = syslog.SyslogObserver(options.get("prefix") or "chatd").emit
        return logs.EscapingObserver(LegacyLogObserverWrapper(emit))
    name = options.get("logfile") or ""
    nodaemon = options.get("nodaemon", False)
    if name == "-" or (nodaemon and not name):
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        return logs.EscapingFileObserver(sys.stdout)
    out = logfile.LogFile.fromFullPath(name or "twistd.log")
    _rotate_on_sigusr1(out)
    return logs.EscapingFileObserver(out)


def _rotate_on_sigusr1(out):
    """As twistd does for its log file: SIGUSR1 rotates it, unless a handler is set."""
    import signal

    if not signal.getsignal(signal.SIGUSR1):
        def rotate(signum, frame):
            from twisted.internet import reactor

            reactor.callFromThread(out.rotate)

        signal.signal(signal.SIGUSR1, rotate)


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
    why = _cannot_listen(description)
    if why is not None:
        raise config.ConfigError(settings.path, section, "endpoint", why)


def _unescape(text):
    return re.sub(r"\\(.)", r"\1", text)


def _parts(description):
    """A description's kind, named and positional arguments (unescaped)."""
    kind, *parts = re.split(r"(?<!\\):", description)
    named = {k: _unescape(v) for k, _, v in (p.partition("=") for p in parts if "=" in p)}
    positional = [_unescape(p) for p in parts if "=" not in p]
    return kind.lower(), named, positional


def _cannot_listen(description):
    """
    Why the listener could not be opened, or None.

    twistd opens the listener after start-up has begun, and a failure there
    is a 40-line traceback.  So the usual causes are tried first, here: a
    trial bind (with SO_REUSEADDR, as Twisted's TCP port sets it) for a port
    in use, an address not on this host or a privileged port, and the
    directory of a UNIX socket.  The real bind can still lose a race; this
    is for the mistakes an operator makes.
    """
    kind, named, positional = _parts(description)
    if kind == "unix":
        address = named.get("address", positional[0] if positional else "")
        directory = os.path.dirname(os.path.abspath(address))
        if not os.path.isdir(directory):
            return f"directory {directory} for the UNIX socket does not exist"
        return None
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    port = _tcp_port(description)
    interface = named.get("interface", "::" if kind == "tcp6" else "")
    family = socket.AF_INET6 if kind == "tcp6" or ":" in interface else socket.AF_INET
    where = f"[{interface}]:{port}" if family == socket.AF_INET6 else f"{interface or '*'}:{port}"
    try:
        with socket.socket(family, socket.SOCK_STREAM) as trial:
            trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            trial.bind((interface, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return f"{where} is already in use"
        if e.errno == errno.EADDRNOTAVAIL:
            return f"{interface} is not an address of this host"
        if e.errno == errno.EACCES:
            return f"no permission to listen on {where} (ports below 1024 need root)"
        return f"cannot listen on {where}: {e.strerror or e}"
    return None


def _tcp_port(description):
    """The port of a tcp/tcp6/ssl description Twisted has parsed already, else None."""
    kind, named, positional = _parts(description)
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    port = named.get("port", positional[0] if positional else None)
    return int(port) if port is not None else None


def makeService(options):
    """
    twistd's entry point: the service L{chatd.service.make_chat_service}
    builds.

    What exists by then (the modules, the settings, the service tree) lives
    as long as the process, so it is frozen out of the garbage collector's
    sight: a full collection walks only what came later.  Under the
    benchmark's many small rooms a full collection stopped the reactor for
    34-95 ms without this, 14-24 ms with it (docs/performance.md).
    """
    from chatd.service import make_chat_service

    service = make_chat_service(options["settings"], tls_options=options["tls_options"])
    gc.collect()  # nothing already garbage is frozen
    gc.freeze()
    return service
