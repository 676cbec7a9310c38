# -*- test-case-name: tests.test_systemd -*-
"""
chatd.systemd: the sd_notify datagrams, checked on a real AF_UNIX datagram
socket this test binds (path and abstract), and the reactor-driven watchdog
on a Clock.
"""

import os
import shutil
import socket
import subprocess
import uuid

import pytest
from twisted.internet.task import Clock

from chatd import systemd
from tests import support


@pytest.fixture
def listener(tmp_path):
    """A bound datagram socket standing in for systemd's notify socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def fields(datagram):
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


def test_address_forms():
    """Paths are used as is, @names go to the abstract namespace, others are ignored."""
    assert systemd.notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert systemd.notify_address({"NOTIFY_SOCKET": "@chatd/x"}) == "\0chatd/x"
    assert systemd.notify_address({"NOTIFY_SOCKET": "vsock:2:999"}) is None
    assert systemd.notify_address({}) is None


def test_watchdog_interval_is_half_and_for_this_process_only():
    """Half of WATCHDOG_USEC; none when off, malformed or for another PID."""
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "20000000"}, 42) == 10.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "42"}, 42) == 10.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "7"}, 42) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}, 42) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}, 42) is None
    assert systemd.watchdog_interval({}, 42) is None


def test_message_keeps_values_on_one_line():
    """A newline in a STATUS cannot forge a second field."""
    assert systemd.message(READY=1, STATUS="a\nREADY=0") == b"READY=1\nSTATUS=a READY=0"


def test_without_notify_socket_nothing_is_sent():
    """No NOTIFY_SOCKET: every call is a no-op that says so."""
    notifier = systemd.Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.ready("up") is False
    assert notifier.watchdog() is False


def test_lifecycle_messages_reach_the_socket(listener):
    """READY/STATUS, RELOADING with MONOTONIC_USEC, STOPPING and WATCHDOG arrive as sent."""
    path, sock = listener
    notifier = systemd.Notifier.from_environ({"NOTIFY_SOCKET": path})
    try:
        assert notifier.ready("serving on port 1")
        assert fields(sock.recv(4096)) == {"READY": "1", "STATUS": "serving on port 1"}
        assert notifier.reloading()
        got = fields(sock.recv(4096))
        assert got["RELOADING"] == "1" and got["STATUS"] == "reloading"
        # Same clock as systemd's: close to ours now, in microseconds.
        now = systemd.monotonic_usec()
        assert 0 <= now - int(got["MONOTONIC_USEC"]) < 5_000_000
        assert notifier.stopping()
        assert fields(sock.recv(4096)) == {"STOPPING": "1", "STATUS": "draining"}
        assert notifier.watchdog()
        assert fields(sock.recv(4096)) == {"WATCHDOG": "1"}
    finally:
        notifier.close()


def test_abstract_socket():
    """An @name NOTIFY_SOCKET reaches a socket bound in the abstract namespace."""
    name = "chatd-test-" + uuid.uuid4().hex
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    notifier = systemd.Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
    try:
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        notifier.close()
        sock.close()


def test_gone_socket_is_reported_not_raised(tmp_path):
    """systemd's socket missing: the send fails, returns False, and chatd carries on."""
    notifier = systemd.Notifier(str(tmp_path / "nobody-here"))
    assert notifier.ready() is False
    assert notifier.ready() is False
    notifier.close()


def test_watchdog_pings_on_the_reactor_clock(listener):
    """The watchdog service pings at once, then every half WATCHDOG_USEC of reactor time."""
    path, sock = listener
    clock = Clock()
    notifier = systemd.Notifier(path)
    environ = {"WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    service = systemd.WatchdogService.from_environ(notifier, clock, environ)
    assert service.step == 2.0
    service.startService()
    try:
        assert sock.recv(4096) == b"WATCHDOG=1"
        sock.setblocking(False)
        clock.advance(1.9)
        with pytest.raises(BlockingIOError):
            sock.recv(4096)
        clock.advance(0.1)
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        service.stopService()
        notifier.close()


def test_no_watchdog_without_systemd():
    """No WATCHDOG_USEC, or no notify socket: no service at all."""
    assert systemd.WatchdogService.from_environ(systemd.Notifier(None), Clock(), {"WATCHDOG_USEC": "4000000"}) is None
    assert systemd.WatchdogService.from_environ(systemd.Notifier("/x"), Clock(), {}) is None


# --- the shipped units -------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED_TWISTD = "/opt/chatd/venv/bin/twistd"


def unit(name):
    with open(os.path.join(ROOT, "etc", name)) as f:
        return f.read()


def unit_keys(text):
    """{key: [values]} of a unit file (all sections; chatd's keys are unique)."""
    keys = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def test_units_pass_systemd_analyze_verify(tmp_path):
    """
    systemd-analyze verify accepts etc/chatd.service and etc/chatd.socket
    without a single warning.  verify checks that ExecStart exists, so the
    copies point it at this venv's twistd; nothing else is changed.
    """
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is not installed: run `make test` (system-deps)"
    service = unit("chatd.service")
    assert SHIPPED_TWISTD in service
    (tmp_path / "chatd.service").write_text(service.replace(SHIPPED_TWISTD, support.TWISTD))
    (tmp_path / "chatd.socket").write_text(unit("chatd.socket"))
    proc = subprocess.run(
        [analyze, "verify", str(tmp_path / "chatd.service"), str(tmp_path / "chatd.socket")],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout + proc.stderr == ""


def test_verify_would_catch_a_mistake(tmp_path):
    """The check above can fail: a misspelt key is reported."""
    (tmp_path / "chatd.socket").write_text(unit("chatd.socket").replace("Backlog=", "Backlgo="))
    proc = subprocess.run(
        [shutil.which("systemd-analyze"), "verify", str(tmp_path / "chatd.socket")],
        capture_output=True, text=True, timeout=60,
    )
    assert "Unknown key 'Backlgo'" in proc.stdout + proc.stderr


def test_service_unit_contract():
    """Notify with a HUP reload, unprivileged, hardened, many files, restarted on failure."""
    keys = unit_keys(unit("chatd.service"))
    assert keys["Type"] == ["notify"]
    assert keys["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert keys["User"] == ["chatd"]
    for key in ("NoNewPrivileges", "PrivateTmp"):
        assert keys[key] == ["true"], key
    assert keys["ProtectSystem"] == ["strict"]
    assert keys["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert keys["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert int(keys["LimitNOFILE"][0]) >= 65536
    assert keys["Restart"] == ["on-failure"]
    assert "-n" in keys["ExecStart"][0].split()
    # The stop timeout covers the drain (default 5 s) plus its 2 s of grace.
    assert int(keys["TimeoutStopSec"][0].rstrip("s")) > 7


def test_socket_unit_contract():
    """The socket unit listens on a stream socket and is not tied to the service's stops."""
    keys = unit_keys(unit("chatd.socket"))
    assert keys["ListenStream"]
    assert "PartOf" not in keys
