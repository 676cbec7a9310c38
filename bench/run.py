"""
Fan-out benchmark: how fast one instance delivers a room's TALK events to
many receivers, and what that costs in server memory.

It starts a real `twistd chatd` (embedded broker, then Redis when
redis-server is installed), connects R receivers into one room over wss,
and has one sender send M messages.  It measures the time until every
receiver has every message, and the server's RSS (from /proc) before and
after.  Each setting runs several times and the median is reported, because
a 2-core machine shared with the clients is noisy.  Nothing here is
asserted: this is for comparing changes, not for CI.

    .venv/bin/python bench/run.py [--receivers 200] [--messages 200] [--runs 3]
"""

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from websockets.asyncio.client import connect  # noqa: E402

from tests import support  # noqa: E402

DEADLINE = 120.0


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def _receiver(url, room, expected, ready, done, handshakes):
    async with handshakes:  # a few TLS handshakes at a time, not a stampede
        ws = await connect(url, ssl=support.client_tls(), max_size=2**20, ping_interval=None, open_timeout=60)
    async with ws:
        await ws.recv()  # WELCOME
        await ws.send(json.dumps({"type": "ENTER", "room": room, "ref": "e"}))
        while json.loads(await ws.recv()).get("ref") != "e":
            pass
        ready.release()
        got = 0
        while got < expected:
            frame = json.loads(await ws.recv())
            if frame["type"] == "TALK":
                got += 1
        done.append(time.perf_counter())


async def one_run(server, receivers, messages):
    room = "bench"
    ready = asyncio.Semaphore(0)
    handshakes = asyncio.Semaphore(10)
    done = []
    tasks = []
    for i in range(receivers):
        url = server.ws_base + "/ws?ticket=" + server.ticket(f"r{i}")
        tasks.append(asyncio.create_task(_receiver(url, room, messages, ready, done, handshakes)))
    for _ in range(receivers):
        await asyncio.wait_for(ready.acquire(), DEADLINE)
    rss_before = rss_kib(server.proc.pid)
    url = server.ws_base + "/ws?ticket=" + server.ticket("sender")
    async with connect(url, ssl=support.client_tls(), ping_interval=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "ENTER", "room": room, "ref": "e"}))
        while json.loads(await ws.recv()).get("ref") != "e":
            pass
        text = "x" * 100
        started = time.perf_counter()
        for n in range(messages):
            await ws.send(json.dumps({"type": "TALK", "room": room, "message": text}))
        await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)
    elapsed = max(done) - started
    rss_after = rss_kib(server.proc.pid)
    return receivers * messages / elapsed, rss_before, rss_after


def bench(label, server, args):
    rates, rss = [], []
    for _ in range(args.runs):
        rate, before, after = asyncio.run(one_run(server, args.receivers, args.messages))
        rates.append(rate)
        rss.append((before, after))
    median = statistics.median(rates)
    print(
        f"{label:10s} deliveries/s median {median:9.0f}  (runs: {', '.join(f'{r:.0f}' for r in rates)}); "
        f"server RSS {rss[-1][0] / 1024:.1f} -> {rss[-1][1] / 1024:.1f} MiB with {args.receivers} receivers"
    )
    return median


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", type=int, default=200)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="chatd-bench-")
    secret = support.make_dev_files(workdir)
    limits = dict(
        limits__rate="100000", limits__burst="100000",
        limits__max_connections_per_ip="100000", server__access_log="off",
    )
    results = {}
    server = support.Chatd(workdir, workdir, secret, name="embedded", **limits)
    try:
        server.start()
        results["embedded"] = bench("embedded", server, args)
    finally:
        server.stop()
    redis = None
    try:
        redis = support.Redis(workdir).start()
    except AssertionError as e:
        print(f"redis: skipped ({e})")
    if redis is not None:
        server = support.Chatd(workdir, workdir, secret, name="redis", redis__url=redis.url, **limits)
        try:
            server.start()  # inside the try: a chatd that fails to start must not leak redis
            results["redis"] = bench("redis", server, args)
        finally:
            server.stop()
            redis.stop()
        print(f"redis/embedded throughput ratio: {results['redis'] / results['embedded']:.2f}")


if __name__ == "__main__":
    main()
