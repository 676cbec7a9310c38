# -*- test-case-name: tests.test_operations -*-
"""
docs/operations.md, with real processes: a real twistd chatd told by a
notify socket this test binds, scraped on its admin listener, reloaded and
drained with real signals, started by systemd-socket-activate.
"""

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import rawws, support
from tests.support import http, make_dev_files, mint_token, wait_for, ws_refusal


@pytest.fixture
def notify_socket(tmp_path):
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    yield path, sock
    sock.close()


def next_message(sock, timeout=support.START_TIMEOUT):
    """The next notification as a dict of its fields."""
    sock.settimeout(timeout)
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def until(sock, key, timeout=support.START_TIMEOUT, limit=100):
    """Notifications up to and including the first carrying C{key}."""
    seen = []
    deadline = time.monotonic() + timeout
    for _ in range(limit):
        message = next_message(sock, max(0.01, deadline - time.monotonic()))
        seen.append(message)
        if key in message:
            return seen
    raise AssertionError(f"no {key} in {seen}")


def scrape(url):
    """{(name, frozenset(labels)): value} from a /metrics page."""
    status, headers, body = http("GET", url)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples, body.decode()


# --- readiness ----------------------------------------------------------------------


def test_ready_once_listening(start_chatd, notify_socket):
    """
    READY=1 arrives after the listener is bound (/healthz answers at that
    moment); a SIGHUP is RELOADING=1 then READY=1; SIGTERM is STOPPING=1.
    """
    path, sock = notify_socket
    server = start_chatd(wait=False, env={"NOTIFY_SOCKET": path})
    messages = until(sock, "READY")
    assert messages[-1]["READY"] == "1" and "STATUS" in messages[-1]
    status, _, body = http("GET", server.base + "/healthz")
    assert status == 200 and body["status"] == "ok"
    # SIGHUP: RELOADING=1 with systemd's clock, then READY=1 again.
    server.proc.send_signal(signal.SIGHUP)
    reloading = until(sock, "RELOADING")[-1]
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    ready = until(sock, "READY")[-1]
    assert ready["STATUS"] == "serving; jwt reloaded, tls reloaded"
    server.proc.send_signal(signal.SIGTERM)
    assert until(sock, "STOPPING")[-1]["STOPPING"] == "1"
    assert server.proc.wait(support.STOP_TIMEOUT) is not None


def test_ready_waits_for_redis(start_chatd, start_redis, notify_socket, tmp_path):
    """With Redis configured and down, no READY=1; it comes once Redis is up."""
    path, sock = notify_socket
    port = support.free_port()
    server = start_chatd(wait=False, env={"NOTIFY_SOCKET": path},
                         redis__url=f"redis://127.0.0.1:{port}/0", redis__timeout="1")
    wait_for(lambda: _answers(server.base + "/healthz"), support.START_TIMEOUT, "the listener")
    sock.settimeout(1.0)
    with pytest.raises(TimeoutError):
        while "READY" not in next_message(sock, 1.0):
            pass
    start_redis(port)
    assert until(sock, "READY")[-1]["READY"] == "1"


def _answers(url):
    try:
        return http("GET", url, timeout=1)[0]
    except OSError:
        return None


def test_watchdog_pings(start_chatd, notify_socket):
    """With WATCHDOG_USEC set, WATCHDOG=1 comes from the running reactor, repeatedly."""
    path, sock = notify_socket
    server = start_chatd(wait=False, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
    until(sock, "READY")
    pings = [m for m in (next_message(sock, 5) for _ in range(4)) if m.get("WATCHDOG") == "1"]
    assert len(pings) >= 3
    # SIGSTOP wedges the process: the pings stop, as systemd would notice.
    server.proc.send_signal(signal.SIGSTOP)
    try:
        sock.settimeout(0.2)
        while True:  # drain what was sent before the stop
            try:
                sock.recv(4096)
            except TimeoutError:
                break
        with pytest.raises(TimeoutError):
            sock.recv(4096)
            sock.settimeout(1.0)
            sock.recv(4096)
    finally:
        server.proc.send_signal(signal.SIGCONT)


# --- admin listener and metrics --------------------------------------------------------


def test_metrics_scrape(start_chatd, clients):
    """The admin listener serves probes and a scrape that reflects real traffic."""
    admin_port = support.free_port()
    server = start_chatd(admin__endpoint=f"tcp:{admin_port}:interface=127.0.0.1")
    admin = f"http://127.0.0.1:{admin_port}"
    assert http("GET", admin + "/livez")[0] == 200
    assert http("GET", admin + "/readyz")[2] == {"status": "ready"}
    alice = server.connect("alice")
    bob = server.connect("bob")
    clients.extend([alice, bob])
    alice.enter("lobby")
    bob.enter("lobby")
    alice.recv()  # bob's ENTER
    alice.talk("lobby", "hello")
    bob.recv()
    assert ws_refusal(server.ws_base + "/ws?ticket=forged") == 401
    samples, text = scrape(admin + "/metrics")
    assert samples[("chatd_connections", frozenset())] == 2
    assert samples[("chatd_rooms", frozenset())] == 1
    assert samples[("chatd_broker_up", frozenset())] == 1
    assert samples[("chatd_messages_received_total", frozenset({("type", "TALK")}))] == 1
    assert samples[("chatd_messages_received_total", frozenset({("type", "ENTER")}))] == 2
    assert samples[("chatd_handshakes_rejected_total", frozenset({("status", "401")}))] == 1
    # WELCOME x2, ENTER x3 (alice's own, bob's to both), TALK x2
    assert samples[("chatd_events_sent_total", frozenset())] >= 7
    assert samples[("chatd_fanout_seconds_count", frozenset())] >= 3
    assert samples[("chatd_tls_certificate_expiry_timestamp_seconds", frozenset())] > time.time()
    assert any(name == "chatd_build_info" for name, _ in samples)
    sent_before = samples[("chatd_events_sent_total", frozenset())]
    alice.close()
    bob.recv()  # alice's QUIT
    wait_for(lambda: scrape(admin + "/metrics")[0].get(("chatd_connections", frozenset())) == 1,
             support.RECV_TIMEOUT, "the gauge to follow the close")
    after, _ = scrape(admin + "/metrics")
    # A closed connection's frames stay counted, and bob's QUIT frame is one more.
    assert after[("chatd_events_sent_total", frozenset())] == sent_before + 1
    assert after[("chatd_closes_total", frozenset({("code", "1000")}))] == 1
    print("\n--- /metrics excerpt ---\n" + "\n".join(
        line for line in text.splitlines() if line.startswith("chatd_") and "_bucket" not in line))


# --- reload -------------------------------------------------------------------------


def _served_certificate(port):
    """The DER certificate a new TLS handshake on C{port} gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with support.client_tls().wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def _fingerprint_of(pem_path):
    with open(pem_path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def test_reload_swaps_certificate_and_key_without_dropping(start_chatd, clients, tmp_path, dev_dir):
    """
    SIGHUP: a new handshake gets the new certificate while an open WebSocket
    keeps chatting; a JWT signed with the old secret is refused, the new one
    accepted; then broken files are refused with one line and it keeps serving.
    """
    live = tmp_path / "live"
    live.mkdir()
    for name in ("fullchain.pem", "privkey.pem", "jwt.secret"):
        shutil.copy(os.path.join(dev_dir[0], name), live / name)
    server = start_chatd(tls__certificate=str(live / "fullchain.pem"),
                         tls__private_key=str(live / "privkey.pem"),
                         auth__secret_file=str(live / "jwt.secret"))
    old_cert = _served_certificate(server.port)
    assert old_cert == _fingerprint_of(live / "fullchain.pem")
    alice = server.connect("alice")
    clients.append(alice)
    alice.enter("lobby")

    new = tmp_path / "new"
    new_secret = make_dev_files(str(new))
    for name in ("fullchain.pem", "privkey.pem", "jwt.secret"):
        shutil.copy(new / name, live / name)
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload done" in server.log_text(), support.RECV_TIMEOUT, "the reload")

    assert _served_certificate(server.port) == _fingerprint_of(new / "fullchain.pem") != old_cert
    old_token = mint_token(server.secret, "mallory")
    assert http("POST", server.base + "/auth/ticket", token=old_token)[0] == 401
    server.secret = new_secret
    bob = server.connect("bob")
    clients.append(bob)
    bob.enter("lobby")
    alice.recv()  # bob's ENTER, on the connection opened before the reload
    said = alice.talk("lobby", "still here")
    assert bob.recv()["id"] == said["id"]

    # A key that does not match the certificate: refused, old material kept.
    other = tmp_path / "other"
    make_dev_files(str(other))
    shutil.copy(other / "privkey.pem", live / "privkey.pem")
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: server.log_text().count("reload done") == 2, support.RECV_TIMEOUT, "the second reload")
    refusals = [line for line in server.log_text().splitlines() if "reload refused:" in line]
    assert len(refusals) == 1
    assert str(live / "privkey.pem") in refusals[0] and "does not match" in refusals[0]
    assert _served_certificate(server.port) == _fingerprint_of(new / "fullchain.pem")
    assert alice.talk("lobby", "and still")["type"] == "TALK"


# --- drain --------------------------------------------------------------------------


def test_drain_spreads_closes_and_other_instances_see_quits(start_chatd, start_redis, clients):
    """
    SIGTERM: /healthz and /readyz say draining at once, new upgrades get 503,
    the clients are closed with 1001 across drain_time, the other instance
    sees every QUIT with the right userCount, and the process exits once the
    last one is gone.
    """
    drain_time = 2.0
    count = 12
    redis = start_redis()
    admin_port = support.free_port()
    leaving = start_chatd(redis__url=redis.url, server__drain_time=str(drain_time),
                          admin__endpoint=f"tcp:{admin_port}:interface=127.0.0.1")
    staying = start_chatd(redis__url=redis.url)
    watcher = staying.connect("watcher")
    clients.append(watcher)
    watcher.enter("lobby")
    members = []
    for i in range(count):
        member = leaving.connect(f"user{i}")
        clients.append(member)
        member.enter("lobby")
        members.append(member)
    watcher.recv_until(lambda f: f.get("type") == "ENTER" and f["userCount"] == count + 1)
    ticket = leaving.ticket("late")

    closes = {}

    def wait_close(i, member):
        closes[i] = (member.closed_with(timeout=drain_time + 5), time.monotonic())

    threads = [threading.Thread(target=wait_close, args=(i, m)) for i, m in enumerate(members)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    leaving.proc.send_signal(signal.SIGTERM)
    status, _, body = http("GET", leaving.base + "/healthz")
    assert (status, body["status"]) == (503, "draining")
    status, _, body = http("GET", f"http://127.0.0.1:{admin_port}/readyz")
    assert (status, body) == (503, {"status": "draining"})
    assert ws_refusal(leaving.ws_base + "/ws?ticket=" + ticket) == 503
    for thread in threads:
        thread.join(drain_time + 10)
    leaving.proc.wait(drain_time + 5)
    exited = time.monotonic() - started

    codes = {code for code, _ in closes.values()}
    offsets = sorted(at - started for _, at in closes.values())
    assert codes == {1001}
    assert offsets[-1] - offsets[0] > drain_time / 3, offsets  # spread, not all at once
    assert offsets[-1] < drain_time + 1.0
    assert exited < drain_time + 2.0 + 1.0
    quits = watcher.recv_until(lambda f: f.get("type") == "QUIT" and f["userCount"] == 1)
    counts = [f["userCount"] for f in quits if f.get("type") == "QUIT"]
    assert counts == list(range(count, 0, -1))
    print(f"\ndrain of {count} clients over {drain_time} s: closes at "
          + ", ".join(f"{o:.2f}" for o in offsets) + f" s; exit after {exited:.2f} s")


def test_drain_ends_at_once_without_clients(start_chatd):
    """No client: the process exits well before drain_time."""
    server = start_chatd(server__drain_time="5")
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(10)
    assert time.monotonic() - started < 4.0


def test_sighup_during_drain_is_ignored(start_chatd, clients):
    """
    A SIGHUP while draining is logged as ignored and changes nothing.

    A second client that never answers the server's close frame keeps the
    drain going (until Autobahn's close handshake timeout or drain_time +
    GRACE), wherever in drain_time the member's close falls: with the
    member alone, a close early in the drain let the process exit before
    the test looked (a refused /healthz under load).
    """
    server = start_chatd(server__drain_time="3")
    member = server.connect("alice")
    clients.append(member)
    silent = rawws.RawWebSocket(server.port)
    try:
        status, head = silent.upgrade("/ws?ticket=" + server.ticket("dave"))
        assert status == 101, head
        assert silent.recv_json()["type"] == "WELCOME"
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: http("GET", server.base + "/healthz")[0] == 503, 5, "the drain")
        server.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP ignored" in server.log_text(), 5, "the ignored SIGHUP")
        assert member.closed_with(timeout=5) == 1001
        server.proc.wait(10)
        assert server.proc.returncode is not None
    finally:
        silent.sock.close()


# --- socket activation ------------------------------------------------------------------


def test_socket_activation(start_chatd, clients):
    """systemd-socket-activate holds the port; chatd does TLS on the inherited socket."""
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate is not installed: run `make test` (system-deps)"
    port = support.free_port()
    server = start_chatd(
        wait=False, # --fdname: Twisted wants LISTEN_FDNAMES, which systemd sets for every socket unit.
        wrapper=(activate, "-l", f"127.0.0.1:{port}", "--fdname=chatd"),
        server__endpoint="systemd:domain=INET:index=0",
        server__allowed_origins=f"https://localhost:{port}",
    )
    server.port = port
    server.wait_ready()  # the first connection makes systemd-socket-activate exec chatd
    alice = server.connect("alice")
    bob = server.connect("bob")
    clients.extend([alice, bob])
    alice.enter("lobby")
    bob.enter("lobby")
    said = alice.talk("lobby", "through the inherited socket")
    assert bob.recv_until(lambda f: f.get("type") == "TALK")[-1]["id"] == said["id"]


def _refused_upgrade(port):
    """One plain-HTTP upgrade with a bad ticket; the status line's code."""
    with socket.create_connection(("127.0.0.1", port), timeout=support.RECV_TIMEOUT) as sock:
        sock.sendall(
            b"GET /ws?ticket=nope HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chatd.v1\r\n\r\n"
        )
        return int(sock.recv(64).split()[1])


def test_refusal_flood_does_not_flood_the_log(start_chatd):
    """
    200 refused upgrades as fast as one client can: every one is answered
    401, but the log gets at most the budget (a burst of 20, then 2 a
    second) and a count of the lines left out.
    """
    server = start_chatd(server__tls="off")
    started = time.monotonic()
    for _ in range(200):
        assert _refused_upgrade(server.port) == 401
    elapsed = time.monotonic() - started
    logged = server.log_text().count("refused 401")

    def summary_logged():
        # The count of lines left out comes with the next line the budget allows.
        _refused_upgrade(server.port)
        return "websocket refusals were not logged" in server.log_text()

    wait_for(summary_logged, 5, "the count of lines left out", interval=0.3)
    assert 20 <= logged <= 20 + 2 * (time.monotonic() - started) + 1, (logged, elapsed)
    assert logged < 201


def test_admin_port_taken_stops_start_up(start_chatd):
    """An admin endpoint that cannot be bound stops chatd with a non-zero exit, like the main one."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = start_chatd(wait=False, admin__endpoint=f"tcp:{port}:interface=127.0.0.1")
        assert server.proc.wait(support.START_TIMEOUT) != 0
    # tap's trial bind names it in one line before twistd starts.
    assert "[admin] endpoint:" in server.log_text() and "in use" in server.log_text()
