# -*- test-case-name: tests.test_bench -*-
"""
The load generator: picows WebSocket clients on uvloop, in one process that
bench/run.py pins to its own core.  It speaks chatd.v1, or STOMP 1.2
(docs/stomp.md) when the spec says C{"protocol": "stomp"} (the ticket step
included when the target asks for it), runs one scenario once, and prints
one JSON object: the figures, its own CPU time (so a generator-bound figure
shows as such) and the server processes' CPU and memory, read from /proc.

    python bench/loadgen.py SPEC.json

The spec (written by bench/run.py) names the scenario, the targets (host,
port, whether to get a ticket first), the JWT secret, the server PIDs to
watch and the sizes.  Progress goes to stderr, one JSON line
C{{"event": ...}} per phase to stdout (bench/run.py starts the profiler on
C{measuring}), the result last.

Every TALK the generator sends carries, in its text, a marker, its
sequence number and its send time (perf_counter_ns), so a receiver finds
them with one C{bytes.find} instead of parsing JSON: parsing every delivery
would make the generator the bottleneck.  The same holds for STOMP: a
MESSAGE frame's body carries the text, so the marker is found in the raw
frame without splitting headers from body or decoding the JSON.
"""

import array
import asyncio
import json
import os
import resource
import ssl
import sys
import time

MARK = b"~B~"
SEQ_DIGITS = 8
TIME_DIGITS = 19
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def log(text):
    print(f"loadgen: {text}", file=sys.stderr, flush=True)


_T0 = time.perf_counter()


def event(name, **fields):
    log(f"{time.perf_counter() - _T0:7.1f}s {name} {fields or ''}")
    print(json.dumps(dict(event=name, **fields)), flush=True)


_TLS = []


def client_tls():
    """One client context for every connection (making one loads the CA store: ~30 ms)."""
    if not _TLS:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        _TLS.append(context)
    return _TLS[0]


def process_cpu_s(pid):
    """utime + stime of C{pid}, in seconds (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def process_rss_kib(pid):
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_KIB


def own_cpu_s():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def percentile(sorted_values, fraction):
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, int(round(fraction * (len(sorted_values) - 1))))
    return sorted_values[index]


BURST_GAP_NS = 1_000_000  # TALKs sent closer together than this went out as one burst


def talk_bursts(sent_ns, gap_ns=BURST_GAP_NS):
    """
    How the window refilled: the sizes of the bursts of TALKs (sends within
    C{gap_ns} of the one before), in order.  The sender refills the window
    as messages complete, so when the whole window completes at once (the
    servers and the generator taking turns instead of overlapping) every
    burst is the whole window.
    """
    sizes = []
    last = None
    for t in sent_ns:
        if last is not None and t - last < gap_ns:
            sizes[-1] += 1
        else:
            sizes.append(1)
        last = t
    return sizes


def burst_fields(sizes):
    """C{talk_bursts} and C{talk_burst_p50}: the size of the burst the median TALK went out in."""
    if not sizes:
        return {"talk_bursts": 0, "talk_burst_p50": None}
    half, seen = sum(sizes) / 2, 0
    for size in sorted(sizes):
        seen += size
        if seen >= half:
            return {"talk_bursts": len(sizes), "talk_burst_p50": size}


def process_counters(pid):
    """
    What the kernel counted of C{pid} (all its threads): user and system
    time (s), voluntary and involuntary context switches, and the
    scheduler's time on the core and waiting for it (s) with the number of
    time slices (C{/proc/PID/task/*/schedstat}).
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    counts = {"utime_s": int(fields[11]) / CLK_TCK, "stime_s": int(fields[12]) / CLK_TCK,
              "voluntary_switches": 0, "involuntary_switches": 0, "run_s": 0.0, "wait_s": 0.0,
              "slices": 0}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        counts["voluntary_switches"] += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        counts["involuntary_switches"] += int(line.split()[1])
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                run_ns, wait_ns, slices = f.read().split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
        counts["run_s"] += int(run_ns) / 1e9
        counts["wait_s"] += int(wait_ns) / 1e9
        counts["slices"] += int(slices)
    return counts


class Meter:
    """CPU of the watched server PIDs and of this process over one window."""

    def __init__(self, pids):
        self.pids = pids

    def start(self):
        self.t0 = time.perf_counter()
        self.each0 = [process_cpu_s(pid) for pid in self.pids]
        self.server0 = sum(self.each0)
        self.counters0 = [process_counters(pid) for pid in self.pids]
        self.own0 = own_cpu_s()

    def stop(self):
        self.wall = time.perf_counter() - self.t0
        each1 = [process_cpu_s(pid) for pid in self.pids]
        self.each = [after - before for before, after in zip(self.each0, each1)]  # per PID
        self.server_cpu = sum(each1) - self.server0
        self.counters = [
            {key: round(value - before[key], 3) for key, value in process_counters(pid).items()}
            for pid, before in zip(self.pids, self.counters0)
        ]
        self.own_cpu = own_cpu_s() - self.own0

    def fields(self):
        return {
            "wall_s": round(self.wall, 3),
            "server_cpu_s": round(self.server_cpu, 3),
            "server_cpu_pct": round(100 * self.server_cpu / self.wall, 1) if self.wall else None,
            # Per server process, in the order of the spec's server_pids.
            "server_processes": self.counters,
            "gen_cpu_s": round(self.own_cpu, 3),
            "gen_cpu_pct": round(100 * self.own_cpu / self.wall, 1) if self.wall else None,
        }


class TicketClient:
    """
    POST /auth/ticket over a few kept-alive HTTPS connections: each ticket
    costs the server one HTTP request and one JWT check, not a TLS handshake
    of its own (a browser fetches it on its pooled page connection).
    """

    def __init__(self, host, port, size):
        self.host, self.port, self.size = host, port, size
        self.idle = asyncio.Queue()

    async def open(self):
        for _ in range(self.size):
            self.idle.put_nowait(await self._connect())

    async def _connect(self):
        return await asyncio.open_connection(self.host, self.port, ssl=client_tls(), server_hostname="localhost")

    async def close(self):
        while not self.idle.empty():
            _, writer = self.idle.get_nowait()
            writer.close()

    async def ticket(self, token):
        reader, writer = await self.idle.get()
        try:
            writer.write(
                b"POST /auth/ticket HTTP/1.1\r\nHost: %s:%d\r\nAuthorization: Bearer %s\r\n"
                b"Content-Length: 0\r\n\r\n" % (self.host.encode(), self.port, token.encode())
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                if b":" in line:
                    name, value = line.split(b":", 1)
                    headers[name.strip().lower()] = value.strip().lower()
            if b"content-length" in headers:
                body = await reader.readexactly(int(headers[b"content-length"]))
            else:  # chunked: twisted.web's answer to a write-then-finish
                body = b""
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    chunk = await reader.readexactly(size + 2)
                    if size == 0:
                        break
                    body += chunk[:-2]
            if headers.get(b"connection") == b"close":
                writer.close()
                reader, writer = await self._connect()
        finally:
            self.idle.put_nowait((reader, writer))
        if status != 200:
            raise RuntimeError(f"POST /auth/ticket: {status} {body[:200]!r}")
        return json.loads(body)["ticket"]


class JSON:
    """chatd.v1 (docs/protocol.md): the frames the scenarios send."""

    subprotocol = "chatd.v1"
    greeting = b"WELCOME"

    @staticmethod
    def quote_ref(ref):
        return json.dumps(ref).encode()

    @staticmethod
    def is_error(payload):
        return b'"ERROR"' in payload

    @staticmethod
    def enter(room, ref):
        return json.dumps({"type": "ENTER", "room": room, "ref": ref}).encode()

    @staticmethod
    def talk(room, text):
        return b'{"type":"TALK","room":"%s","message":"%s"}' % (room, text)


class STOMP:
    """
    STOMP 1.2 over WebSocket (docs/stomp.md): SUBSCRIBE to /topic/<room> is
    ENTER (its RECEIPT says it is done), SEND to /app/chat/<room> is TALK, and
    every room event arrives as a MESSAGE frame with the chatd JSON body.

    The subscription id is C{sub-0} for every member, as stomp.js numbers a
    client's first subscription, so chatd may encode each MESSAGE once for
    the room; with C{unique_ids} each member's id is its own (the ENTER's
    ref), the worst case for that.
    """

    subprotocol = "v12.stomp"
    greeting = b"CONNECTED"
    unique_ids = False

    @staticmethod
    def quote_ref(ref):
        return b"receipt-id:%s\n" % ref.encode()

    @staticmethod
    def is_error(payload):
        return payload.startswith(b"ERROR")

    @classmethod
    def enter(cls, room, ref):
        return b"SUBSCRIBE\nid:%s\ndestination:/topic/%s\nreceipt:%s\n\n\0" % (
            ref.encode() if cls.unique_ids else b"sub-0", room.encode(), ref.encode(),
        )

    @staticmethod
    def talk(room, text):
        return b'SEND\ndestination:/app/chat/%s\ncontent-type:application/json\n\n{"message":"%s"}\0' % (
            room, text,
        )


PROTOCOLS = {"json": JSON, "stomp": STOMP}


def make_member_class():
    from picows import WSListener, WSMsgType

    class Member(WSListener):
        """One chatd.v1 or STOMP connection: TALK deliveries go straight to the scenario."""

        def __init__(self, gen):
            super().__init__()
            self.gen = gen
            self.transport = None
            self.first = gen.loop.create_future()  # WELCOME (or a refusal)
            self.expect = None  # (ref bytes, future) while waiting for an echo
            self.closed = False

        def on_ws_connected(self, transport):
            self.transport = transport
            if self.gen.protocol is STOMP:
                # No heart-beats: an idle member must not cost the server timers.
                transport.send(WSMsgType.TEXT, b"CONNECT\naccept-version:1.2\nheart-beat:0,0\n\n\0")

        def on_ws_frame(self, transport, frame):
            if frame.msg_type == WSMsgType.TEXT or frame.msg_type == WSMsgType.BINARY:
                payload = frame.get_payload_as_bytes()
                at = payload.find(MARK)
                if at >= 0:
                    self.gen.delivered(payload, at)
                    return
                if payload == b"\n" or payload == b"\r\n":
                    return  # a STOMP heart-beat (none is negotiated; harmless)
                self.gen.control_frames += 1
                if not self.first.done():
                    self.first.set_result(payload)
                elif self.expect is not None and self.expect[0] in payload:
                    ref, future = self.expect
                    self.expect = None
                    if not future.done():
                        future.set_result(payload)
                if self.gen.protocol.is_error(payload):
                    self.gen.errors += 1
                    if self.gen.errors <= 5:
                        log(f"ERROR frame: {payload[:200]!r}")
            elif frame.msg_type == WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()

        def on_ws_disconnected(self, transport):
            self.closed = True
            self.gen.disconnects += 1
            for future in (self.first, self.expect[1] if self.expect else None):
                if future is not None and not future.done():
                    future.set_exception(ConnectionError("disconnected"))

        def send(self, data):
            self.transport.send(WSMsgType.TEXT, data)

        async def request(self, data, ref, timeout):
            """Send C{data}; the next control frame carrying C{ref} (as the protocol quotes it) answers."""
            future = self.gen.loop.create_future()
            self.expect = (self.gen.protocol.quote_ref(ref), future)
            self.send(data)
            return await asyncio.wait_for(future, timeout)

    return Member


class Generator:
    """One scenario run against the spec's targets."""

    def __init__(self, spec):
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self.members = []
        self.errors = 0
        self.disconnects = 0
        self.control_frames = 0
        self.latencies = array.array("q")
        self.delivered_count = 0
        self.on_delivery = None
        self.Member = make_member_class()
        self.ticket_clients = {}
        self.timeout = spec.get("timeout", 300)
        self.protocol = PROTOCOLS[spec.get("protocol", "json")]
        STOMP.unique_ids = spec.get("stomp_ids") == "unique"

    # -- connections --

    def token(self, sub):
        import jwt

        now = int(time.time())
        return jwt.encode({"sub": sub, "iat": now, "exp": now + 3600}, self.spec["secret"], algorithm="HS256")

    async def open_ticket_clients(self):
        for index, target in enumerate(self.spec["targets"]):
            if target["ticket"]:
                client = TicketClient(target["host"], target["port"], self.spec.get("ticket_connections", 4))
                await client.open()
                self.ticket_clients[index] = client

    async def connect(self, target_index, sub, token=None):
        """A member connected on target C{target_index}, WELCOME read."""
        from picows import ws_connect

        target = self.spec["targets"][target_index]
        url = f"wss://{target['host']}:{target['port']}/ws"
        if target["ticket"]:
            ticket = await self.ticket_clients[target_index].ticket(token or self.token(sub))
            url += "?ticket=" + ticket
        _, member = await ws_connect(
            lambda: self.Member(self), url, ssl_context=client_tls(),
            extra_headers={"Sec-WebSocket-Protocol": self.protocol.subprotocol},
            websocket_handshake_timeout=60, max_frame_size=1 << 20,
        )
        welcome = await asyncio.wait_for(member.first, 60)
        if self.protocol.greeting not in welcome:
            raise RuntimeError(f"expected {self.protocol.greeting.decode()}, got {welcome[:200]!r}")
        self.members.append(member)
        return member

    async def connect_many(self, subs_targets, concurrency, tokens=None):
        gate = asyncio.Semaphore(concurrency)
        tokens = tokens or {}

        async def one(sub, target_index):
            async with gate:
                return await self.connect(target_index, sub, tokens.get(sub))

        return await asyncio.gather(*(one(sub, t) for sub, t in subs_targets))

    async def enter(self, member, room, index):
        ref = f"enter-{index}"
        reply = await member.request(self.protocol.enter(room, ref), ref, 120)
        if self.protocol.is_error(reply):
            raise RuntimeError(f"ENTER {room}: {reply[:200]!r}")

    async def enter_many(self, members_rooms):
        gate = asyncio.Semaphore(self.spec.get("concurrency", 20))

        async def one(index, member, room):
            async with gate:
                await self.enter(member, room, index)

        await asyncio.gather(*(one(i, m, r) for i, (m, r) in enumerate(members_rooms)))

    # -- deliveries --

    def talk(self, member, room, seq, pad):
        text = b"%s%08d%019d%s" % (MARK, seq, time.perf_counter_ns(), pad)
        member.send(self.protocol.talk(room.encode(), text))

    def delivered(self, payload, at):
        now = time.perf_counter_ns()
        start = at + len(MARK)
        seq = int(payload[start:start + SEQ_DIGITS])
        sent = int(payload[start + SEQ_DIGITS:start + SEQ_DIGITS + TIME_DIGITS])
        self.latencies.append(now - sent)
        self.delivered_count += 1
        self.last_delivery = now
        if self.on_delivery is not None:
            self.on_delivery(seq)

    def latency_fields(self):
        values = sorted(self.latencies)
        ms = lambda ns: None if ns is None else round(ns / 1e6, 2)  # noqa: E731
        return {
            "p50_ms": ms(percentile(values, 0.50)),
            "p99_ms": ms(percentile(values, 0.99)),
            "max_ms": ms(values[-1] if values else None),
        }

    def padding(self):
        return b"x" * max(0, self.spec.get("message_bytes", 100) - len(MARK) - SEQ_DIGITS - TIME_DIGITS)

    # -- scenarios --

    async def fanout(self):
        """Scenario 1 (and 4): one room, one sender, a window of messages in flight."""
        spec = self.spec
        n, messages, window = spec["members"], spec["messages"], spec["in_flight"]
        targets = len(spec["targets"])
        room = "fanout"
        members = await self.connect_many([(f"m{i}", i % targets) for i in range(n)], spec.get("concurrency", 20))
        event("connected", members=n)
        await self.enter_many([(member, room) for member in members])
        # The room is full: let the last ENTER events reach every member.
        await self.settle()
        event("entered", members=n)
        sender, pad = members[0], self.padding()
        remaining = [n] * messages
        state = {"next": 0, "complete": 0}
        finished = self.loop.create_future()
        sent_ns = array.array("q")

        def send_next():
            seq = state["next"]
            state["next"] = seq + 1
            sent_ns.append(time.perf_counter_ns())
            self.talk(sender, room, seq, pad)

        def on_delivery(seq):
            remaining[seq] -= 1
            if remaining[seq] == 0:
                state["complete"] += 1
                if state["next"] < messages:
                    send_next()
                elif state["complete"] == messages and not finished.done():
                    finished.set_result(None)

        self.on_delivery = on_delivery
        meter = Meter(spec["server_pids"])
        event("measuring")
        meter.start()
        started = time.perf_counter_ns()
        for _ in range(min(window, messages)):
            send_next()
        try:
            await asyncio.wait_for(asyncio.shield(finished), self.timeout)
        except asyncio.TimeoutError:
            log(f"timed out: {state['complete']} of {messages} messages reached every member")
        meter.stop()
        event("measured")
        elapsed = ((self.last_delivery if self.delivered_count else time.perf_counter_ns()) - started) / 1e9
        expected = n * state["next"]
        return dict(
            members=n, messages=messages, in_flight=window, sent=state["next"],
            delivered=self.delivered_count, lost=expected - self.delivered_count,
            deliveries_per_s=round(self.delivered_count / elapsed) if elapsed > 0 else None,
            server_cpu_us_per_delivery=round(1e6 * meter.server_cpu / max(1, self.delivered_count), 2),
            **self.latency_fields(), **meter.fields(), **burst_fields(talk_bursts(sent_ns)),
        )

    async def idle(self):
        """Scenario 2: N authenticated, idle connections; memory and CPU per connection."""
        spec = self.spec
        n = spec["connections"]
        targets = len(spec["targets"])
        subs = [(f"i{i}", i % targets) for i in range(n)]
        tokens = {sub: self.token(sub) for sub, _ in subs}  # minted before the clock starts
        pids = spec["server_pids"]
        await asyncio.sleep(0.5)
        rss_each_before = [process_rss_kib(pid) for pid in pids]
        rss_before = sum(rss_each_before)
        meter = Meter(pids)
        event("measuring")
        meter.start()
        await self.connect_many(subs, spec.get("concurrency", 20), tokens)
        meter.stop()
        await self.settle()
        rss_each_after = [process_rss_kib(pid) for pid in pids]
        rss_after = sum(rss_each_after)
        event("measured")
        # --paired: one server per target, in the targets' order, each with
        # every other connection (n / targets), measured in the same phase.
        each = {}
        if spec.get("paired"):
            share = n / targets
            each = {"each": [
                dict(cpu_ms_per_connection=round(1000 * cpu / share, 3),
                     kib_per_connection=round((after - before) / share, 2))
                for cpu, before, after in zip(meter.each, rss_each_before, rss_each_after)
            ]}
        return dict(
            **each,
            connections=n, connected=len(self.members),
            rss_before_kib=rss_before, rss_after_kib=rss_after,
            kib_per_connection=round((rss_after - rss_before) / n, 2),
            cpu_ms_per_connection=round(1000 * meter.server_cpu / n, 3),
            connections_per_s=round(n / meter.wall, 1),
            **meter.fields(),
        )

    async def rooms(self):
        """Scenario 3: many rooms of two; an open-loop message rate for a while."""
        spec = self.spec
        rooms, rate, duration = spec["rooms"], spec["rate"], spec["duration"]
        targets = len(spec["targets"])
        members = await self.connect_many(
            [(f"r{i}", i % targets) for i in range(2 * rooms)], spec.get("concurrency", 20)
        )
        event("connected", members=len(members))
        await self.enter_many([(member, f"room{index // 2}") for index, member in enumerate(members)])
        await self.settle()
        event("entered", members=len(members))
        pad = self.padding()
        total = int(rate * duration)
        tick = 0.005
        state = {"sent": 0}
        done_sending = self.loop.create_future()
        start = time.perf_counter()

        def send_due():
            due = min(total, int((time.perf_counter() - start) * rate) + 1)
            while state["sent"] < due:
                seq = state["sent"]
                self.talk(members[2 * (seq % rooms)], f"room{seq % rooms}", seq, pad)
                state["sent"] = seq + 1
            if state["sent"] < total:
                self.loop.call_later(tick, send_due)
            else:
                done_sending.set_result(None)

        meter = Meter(spec["server_pids"])
        event("measuring")
        meter.start()
        send_due()
        await asyncio.wait_for(done_sending, duration + self.timeout)
        sending = time.perf_counter() - start
        expected = 2 * total
        deadline = time.perf_counter() + min(self.timeout, 30)
        while self.delivered_count < expected and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        meter.stop()
        event("measured")
        return dict(
            rooms=rooms, rate=rate, duration_s=duration, sent=total,
            delivered=self.delivered_count, lost=expected - self.delivered_count,
            send_rate=round(total / sending, 1),
            server_cpu_ms_per_1000=round(1e6 * meter.server_cpu / max(1, self.delivered_count), 2),
            **self.latency_fields(), **meter.fields(),
        )

    async def settle(self, quiet=0.3, limit=60.0):
        """Wait until no frame has arrived for C{quiet} seconds (bounded)."""
        deadline = time.perf_counter() + limit
        while time.perf_counter() < deadline:
            before = self.frames_seen()
            await asyncio.sleep(quiet)
            if self.frames_seen() == before:
                return
        log("settle: traffic did not stop")

    def frames_seen(self):
        return self.control_frames + self.delivered_count

    async def close(self):
        for member in self.members:
            if not member.closed:
                member.transport.disconnect()
        for client in self.ticket_clients.values():
            await client.close()


async def amain(spec):
    gen = Generator(spec)
    try:
        await gen.open_ticket_clients()
        result = await getattr(gen, spec["scenario"])()
        result.update(errors=gen.errors, disconnects=gen.disconnects)
        return result
    finally:
        await gen.close()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        spec = json.load(f)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    result = uvloop.run(amain(spec))
    print(json.dumps(dict(event="result", **result)), flush=True)


if __name__ == "__main__":
    main()
