# -*- test-case-name: tests.test_systemd -*-
"""
Telling systemd how chatd is doing: the sd_notify protocol, by hand.

systemd passes C{NOTIFY_SOCKET} (a path, or C{@name} for the abstract
namespace) to services with C{Type=notify}; one datagram per message, lines
of C{KEY=value}.  chatd sends:

  - C{READY=1} once the listener is bound and the broker is usable;
  - C{STATUS=...} lines a human reads in C{systemctl status};
  - C{RELOADING=1} with C{MONOTONIC_USEC=} when a SIGHUP reload starts,
    then C{READY=1} when it is done;
  - C{STOPPING=1} when a drain starts;
  - C{WATCHDOG=1} from a timer on the reactor, so a reactor that is stuck
    stops the pings and systemd restarts the process (C{WatchdogSec=}).

Without C{NOTIFY_SOCKET} every call is a no-op, so nothing else needs to
know whether systemd is there.  No libsystemd: the protocol is one
C{sendto}, and a C binding would be another dependency to build.
"""

import os
import socket
import time

from twisted.application.internet import TimerService
from twisted.logger import Logger

log = Logger()


def notify_address(environ):
    """
    The C{sendto} address C{NOTIFY_SOCKET} names, or L{None} when unset or
    of a kind chatd does not speak (C{vsock:}).
    """
    value = environ.get("NOTIFY_SOCKET", "")
    if value.startswith("@"):
        return "\0" + value[1:]  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ, pid):
    """
    Seconds between C{WATCHDOG=1} pings: half of C{WATCHDOG_USEC}, as
    sd_watchdog_enabled(3) advises; L{None} when the watchdog is off or
    meant for another process (C{WATCHDOG_PID}).
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    return int(usec) / 1e6 / 2


def monotonic_usec():
    """CLOCK_MONOTONIC in microseconds, the clock C{MONOTONIC_USEC} is on."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def message(**fields):
    """
    One notification datagram: C{message(READY=1, STATUS="x")} ->
    C{b"READY=1\\nSTATUS=x"}.  Values are single lines (a newline would
    start a new, forged, field).
    """
    lines = []
    for key, value in fields.items():
        text = str(value).replace("\n", " ")
        lines.append(f"{key}={text}")
    return "\n".join(lines).encode("utf-8")


class Notifier:
    """
    Sends sd_notify messages; every method is a no-op without an address.

    The socket is non-blocking: if systemd stops reading, a notification is
    dropped (and logged once) rather than stalling the reactor.
    """

    def __init__(self, address, clock_usec=monotonic_usec):
        """
        @param address: from L{notify_address}, or L{None}.
        @param clock_usec: the monotonic clock, in microseconds (for tests).
        """
        self.address = address
        self._clock_usec = clock_usec
        self._socket = None
        self._failed = False

    @classmethod
    def from_environ(cls, environ=None):
        return cls(notify_address(os.environ if environ is None else environ))

    @property
    def enabled(self):
        return self.address is not None

    def send(self, **fields):
        """
        @return: whether the datagram was handed to the kernel.
        """
        if self.address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message(**fields), self.address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                log.warn("cannot notify systemd at {address}: {error}",
                         address=self.address.replace("\0", "@"), error=e.strerror or str(e))
            return False
        self._failed = False
        return True

    def ready(self, status=None):
        """The service is up (or back up after a reload)."""
        fields = {"READY": 1}
        if status:
            fields["STATUS"] = status
        return self.send(**fields)

    def status(self, text):
        return self.send(STATUS=text)

    def reloading(self, status="reloading"):
        """A reload starts; systemd wants the monotonic time with it."""
        return self.send(RELOADING=1, MONOTONIC_USEC=self._clock_usec(), STATUS=status)

    def stopping(self, status="draining"):
        return self.send(STOPPING=1, STATUS=status)

    def watchdog(self):
        return self.send(WATCHDOG=1)

    def close(self):
        if self._socket is not None:
            self._socket.close()
            self._socket = None


class WatchdogService(TimerService):
    """
    C{WATCHDOG=1} every C{interval} seconds from the reactor's own timer:
    if the reactor is wedged the pings stop, which is the point.
    """

    def __init__(self, interval, notifier, clock=None):
        super().__init__(interval, notifier.watchdog)
        if clock is not None:
            self.clock = clock

    @classmethod
    def from_environ(cls, notifier, clock=None, environ=None, pid=None):
        """
        @return: the service, or L{None} when systemd asked for no watchdog.
        """
        environ = os.environ if environ is None else environ
        interval = watchdog_interval(environ, os.getpid() if pid is None else pid)
        if interval is None or not notifier.enabled:
            return None
        return cls(interval, notifier, clock)
