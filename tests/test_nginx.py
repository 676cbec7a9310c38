# -*- test-case-name: tests.test_nginx -*-
"""
etc/nginx/chatd.conf with Debian's nginx: the shipped file is valid, says
what docs/operations.md promises about the WebSocket location, and works in
front of a real tls = off chatd with [server] trusted_proxies: chat through
it, per-IP caps on the forwarded address, forged headers ignored.  Clients
connect from distinct loopback addresses (127.0.0.2-4); nginx reaches chatd
from 127.0.0.1, the one trusted proxy.
"""

import os
import re
import socket

import pytest
from websockets.exceptions import InvalidStatus

from tests import support
from tests.support import http


def test_shipped_config_passes_nginx_t(tmp_path, dev_dir):
    """nginx -t accepts etc/nginx/chatd.conf (names, ports and paths filled in)."""
    nginx = support.Nginx(str(tmp_path), support.free_port(),
                          os.path.join(dev_dir[0], "fullchain.pem"), os.path.join(dev_dir[0], "privkey.pem"))
    status, output = nginx.check()
    assert status == 0, output
    assert "syntax is ok" in output


def test_websocket_location():
    """/ws passes the upgrade headers, X-Forwarded-For, no buffering, timeouts above ping interval + timeout."""
    with open(support.NGINX_SITE) as f:
        text = f.read()
    ws = text.split("location = /ws {", 1)[1].split("}", 1)[0]
    assert "proxy_set_header Upgrade $http_upgrade;" in ws
    assert "proxy_set_header Connection $chatd_connection;" in ws
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in ws
    assert "proxy_buffering off;" in ws
    timeout = int(re.search(r"proxy_read_timeout (\d+)s;", ws).group(1))
    assert timeout > 30 + 20  # [websocket] ping_interval + ping_timeout defaults
    stomp = text.split("location /ws-stomp/ {", 1)[1].split("}", 1)[0]
    assert "proxy_set_header Upgrade $http_upgrade;" in stomp and "proxy_buffering off;" in stomp
    for path in ("location = / {", "location /auth/ {", "location = /rooms {"):
        assert path in text, path


# --- nginx in front of a real chatd ----------------------------------------------------

CLIENT_A, CLIENT_B, CLIENT_C = "127.0.0.2", "127.0.0.3", "127.0.0.4"


def ws_from(url, source, headers=None, tls=True):
    """A chatd.v1 WebSocket opened from the loopback address C{source}."""
    host, port = url.split("://", 1)[1].split("/", 1)[0].split(":")
    sock = socket.create_connection((host, int(port)), timeout=support.RECV_TIMEOUT,
                                    source_address=(source, 0))
    ws = support.ws_open(
        url, sock=sock, server_hostname="localhost" if tls else None, additional_headers=headers,
    )
    client = support.Client(ws)
    client.welcome = client.recv()
    return client


def refusal_from(url, source, headers=None, tls=True):
    """The HTTP status an upgrade from C{source} is refused with."""
    try:
        client = ws_from(url, source, headers, tls)
    except InvalidStatus as e:
        return e.response.status_code
    client.close()
    raise AssertionError("upgraded")


@pytest.fixture
def behind_nginx(start_chatd, tmp_path, dev_dir):
    """A tls = off chatd trusting 127.0.0.1, and Debian's nginx in front of it."""
    server = start_chatd(
        server__tls="off", server__trusted_proxies="127.0.0.1",
        limits__max_connections_per_ip="2",
    )
    nginx = support.Nginx(str(tmp_path), server.port,
                          os.path.join(dev_dir[0], "fullchain.pem"), os.path.join(dev_dir[0], "privkey.pem"))
    nginx.start()
    yield server, nginx
    nginx.stop()


def test_chat_through_nginx(behind_nginx, clients):
    """Ticket over HTTPS, wss through nginx, two users chat; chatd logs the real client."""
    server, nginx = behind_nginx
    tickets = []
    for sub in ("alice", "bob"):
        status, _, body = http("POST", nginx.base + "/auth/ticket", token=server.token(sub))
        assert status == 200, body
        tickets.append(body["ticket"])
    alice = ws_from(nginx.ws_base + "/ws?ticket=" + tickets[0], CLIENT_A)
    bob = ws_from(nginx.ws_base + "/ws?ticket=" + tickets[1], CLIENT_B)
    clients.extend([alice, bob])
    assert alice.welcome["type"] == bob.welcome["type"] == "WELCOME"
    alice.enter("lobby")
    bob.enter("lobby")
    said = alice.talk("lobby", "hello through nginx")
    assert bob.recv_until(lambda f: f.get("type") == "TALK")[-1]["id"] == said["id"]
    assert http("GET", nginx.base + "/healthz")[0] == 200
    log = server.log_text()
    assert f"{CLIENT_A} alice connected" in log or f"websocket {CLIENT_A} " in log, log[-2000:]
    assert tickets[0] not in log
    with open(os.path.join(nginx.workdir, "access.log")) as f:
        assert tickets[0] not in f.read()


def test_per_ip_cap_counts_the_forwarded_address(behind_nginx, clients):
    """
    The per-address cap (2) counts each client behind nginx, not nginx: a
    third connection from one client is 429, another client still gets in,
    and a forged X-Forwarded-For sent through nginx does not escape the cap.
    """
    server, nginx = behind_nginx
    url = lambda sub: nginx.ws_base + "/ws?ticket=" + server.ticket(sub)  # noqa: E731
    clients.extend([ws_from(url("a1"), CLIENT_A), ws_from(url("a2"), CLIENT_A)])
    assert refusal_from(url("a3"), CLIENT_A) == 429
    assert refusal_from(url("a4"), CLIENT_A, {"X-Forwarded-For": "198.51.100.7"}) == 429
    clients.append(ws_from(url("b1"), CLIENT_B))


def test_forged_header_from_an_untrusted_peer_changes_nothing(behind_nginx, clients):
    """Straight to chatd (not a trusted proxy), X-Forwarded-For is ignored: the cap still holds."""
    server, _ = behind_nginx
    url = lambda sub: server.ws_base + "/ws?ticket=" + server.ticket(sub)  # noqa: E731
    clients.append(ws_from(url("c1"), CLIENT_C, {"X-Forwarded-For": "198.51.100.1"}, tls=False))
    clients.append(ws_from(url("c2"), CLIENT_C, {"X-Forwarded-For": "198.51.100.2"}, tls=False))
    assert refusal_from(url("c3"), CLIENT_C, {"X-Forwarded-For": "198.51.100.3"}, tls=False) == 429
    assert "198.51.100." not in server.log_text()
