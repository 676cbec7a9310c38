# -*- test-case-name: tests.test_bench -*-
"""
What one connection of scenario 2 costs chatd's Python, in process: the
ticket request (C{POST /auth/ticket} with a Bearer JWT, on one kept-alive
HTTP connection) and the upgrade (C{GET /ws?ticket=...} to the 101 and
WELCOME), each driven through chatd's real listening factory on memory
transports, without TLS, sockets or a running reactor.

The scenario 2 figure (C{bench/run.py 2}) is the one to quote; this one
says where a change moved it, and runs in seconds, steadier than a
benchmark on a shared machine.  CPU time of this thread per ticket
request and per upgrade, over C{--connections} of each per round, tokens
made outside the timing; the median and the range of C{--rounds}.

    .venv/bin/python bench/inprocess.py                       # µs per ticket request and per upgrade
    .venv/bin/python bench/inprocess.py --profile upgrade     # cProfile of the upgrades instead
    PYTHONPATH=/path/to/other/tree .venv/bin/python bench/inprocess.py   # another tree's chatd
"""

import argparse
import base64
import dataclasses
import itertools
import json
import os
import statistics
import time

import jwt
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

SECRET = b"s" * 32
HOST = b"127.0.0.1:8443"


class _Transport(StringTransport):
    """A StringTransport that takes what chatd's TCP transports are asked."""

    def setTcpNoDelay(self, enabled):
        pass

    def abortConnection(self):
        self.loseConnection()

    def unregisterProducer(self):
        self.producer = None


class Server:
    """
    chatd's listening factory, built as twistd builds it, without TLS, on
    the global reactor, which never runs (its timers keep a heap, where
    C{task.Clock} sorts every call it holds on each new one).
    """

    def __init__(self):
        from twisted.internet import reactor

        from chatd import config, guard, service

        settings = dataclasses.replace(config.defaults(
            server__tls=False, server__access_log=False, server__endpoint="tcp:0:interface=127.0.0.1",
            limits__max_connections=10**6, limits__max_connections_per_ip=10**6,
            limits__max_pending_per_ip=10**6, auth__ticket_rate=10.0**6,
        ), jwt_key=SECRET)
        self.service = service.make_chat_service(settings, reactor=reactor, environ={})
        factories = [getattr(s, "factory", None) for s in self.service]
        self.factory = next(f for f in factories if isinstance(f, guard.GuardedFactory))
        self._ports = itertools.count(10000)
        self.kept = []  # the open connections, as scenario 2 keeps them
        self.http, self.http_transport = self.connect()

    def connect(self):
        """A new connection's protocol and transport, from a new client port."""
        port = next(self._ports)
        peer = IPv4Address("TCP", "127.0.0.1", port)
        protocol = self.factory.buildProtocol(peer)
        transport = _Transport(peerAddress=peer, hostAddress=IPv4Address("TCP", "127.0.0.1", 8443))
        protocol.makeConnection(transport)
        return protocol, transport


def token(sub):
    now = int(time.time())
    return jwt.encode({"sub": sub, "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")


def ticket_request(bearer):
    return (
        b"POST /auth/ticket HTTP/1.1\r\nHost: %s\r\nAuthorization: Bearer %s\r\nContent-Length: 0\r\n\r\n"
        % (HOST, bearer.encode())
    )


def upgrade_request(ticket):
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET /ws?ticket=%s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chatd.v1\r\n\r\n"
        % (ticket.encode(), HOST, key)
    )


def one_connection(server, bearer, timed):
    """
    One ticket request and one upgrade; C{timed(seconds_ticket, seconds_upgrade)}.

    @raise AssertionError: if chatd did not answer 200 and then 101.
    """
    request = ticket_request(bearer)
    server.http_transport.clear()
    start = time.thread_time()
    server.http.dataReceived(request)
    ticket_done = time.thread_time()
    answer = server.http_transport.value()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    ticket = json.loads(answer.split(b"\r\n\r\n", 1)[1])["ticket"]
    upgrade = upgrade_request(ticket)
    start_upgrade = time.thread_time()
    protocol, transport = server.connect()
    protocol.dataReceived(upgrade)
    upgrade_done = time.thread_time()
    assert transport.value().startswith(b"HTTP/1.1 101 "), transport.value()[:200]
    server.kept.append((protocol, transport))
    timed(ticket_done - start, upgrade_done - start_upgrade)


def measure(connections, rounds, warm=200):
    """
    @return: C{{"ticket_us": [per round], "upgrade_us": [per round]}},
        microseconds of CPU per ticket request and per upgrade.
    """
    server = Server()
    subs = itertools.count()
    for _ in range(warm):
        one_connection(server, token(f"warm{next(subs)}"), lambda *_: None)
    results = {"ticket_us": [], "upgrade_us": []}
    for _ in range(rounds):
        bearers = [token(f"u{next(subs)}") for _ in range(connections)]
        spent = [0.0, 0.0]

        def timed(ticket, upgrade):
            spent[0] += ticket
            spent[1] += upgrade

        for bearer in bearers:
            one_connection(server, bearer, timed)
        results["ticket_us"].append(spent[0] / connections * 1e6)
        results["upgrade_us"].append(spent[1] / connections * 1e6)
    return results


def profile(which, connections):
    """cProfile of C{connections} ticket requests or upgrades; prints the top functions."""
    import cProfile
    import pstats

    server = Server()
    for n in range(200):
        one_connection(server, token(f"warm{n}"), lambda *_: None)
    bearers = [token(f"p{n}") for n in range(connections)]
    profiler = cProfile.Profile()
    if which == "ticket":
        profiler.enable()
        for bearer in bearers:
            server.http_transport.clear()
            server.http.dataReceived(ticket_request(bearer))
        profiler.disable()
    else:
        upgrades = []
        for bearer in bearers:
            server.http_transport.clear()
            server.http.dataReceived(ticket_request(bearer))
            ticket = json.loads(server.http_transport.value().split(b"\r\n\r\n", 1)[1])["ticket"]
            upgrades.append(upgrade_request(ticket))
        profiler.enable()
        for upgrade in upgrades:
            protocol, transport = server.connect()
            protocol.dataReceived(upgrade)
            server.kept.append((protocol, transport))
        profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000, help="connections per round (2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (5)")
    parser.add_argument("--profile", choices=("ticket", "upgrade"), help="cProfile one part instead")
    args = parser.parse_args(argv)
    if args.profile:
        profile(args.profile, args.connections)
        return
    results = measure(args.connections, args.rounds)
    summary = {
        name: {"median": round(statistics.median(values), 1), "min": round(min(values), 1),
               "max": round(max(values), 1), "rounds": len(values)}
        for name, values in results.items()
    }
    import chatd

    print(json.dumps({"inprocess": True, "chatd": os.path.dirname(chatd.__file__),
                      "connections": args.connections, **summary}))


if __name__ == "__main__":
    main()
