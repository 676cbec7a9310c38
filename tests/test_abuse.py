"""
Bad clients against a real `twistd chatd` over real TLS on loopback: each
test plays one kind of abuse and shows chatd stays up, keeps its memory
bounded and keeps serving everybody else.  docs/security.md maps threats to
these tests.

Timing is never asserted: each test waits for the event that shows the
defence worked (the connection ended, a QUIT arrived, a close code), always
with a deadline.
"""

import json
import zlib
from urllib.parse import quote

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests import rawws
from tests.support import RECV_TIMEOUT, Client, http, mint_token, wait_for, websockets_tls

HANDSHAKE_TIMEOUT = 2  # seconds; small so the tests that wait for it are quick


def assert_clean_log(server):
    """Whatever the clients did, chatd logged no traceback."""
    text = server.log_text()
    assert "Traceback" not in text, text[-4000:]


def connect(server, sub, **claims):
    """A L{Client} like C{server.connect}, over L{websockets_tls}."""
    client = Client(ws_from(server, "127.0.0.1", server.ticket(sub, **claims)))
    client.welcome = client.recv()
    assert client.welcome["type"] == "WELCOME", client.welcome
    return client


def ws_from(server, source, ticket, compression="deflate"):
    """A WebSocket from loopback address C{source} (127.0.0.0/8 is all ours)."""
    sock = rawws.tcp_connect(server.port, source=source)
    return ws_connect(
        server.ws_base + "/ws?ticket=" + ticket,
        sock=sock,
        ssl=websockets_tls(),
        server_hostname="localhost",
        subprotocols=["chatd.v1"],
        open_timeout=RECV_TIMEOUT,
        close_timeout=RECV_TIMEOUT,
        ping_interval=None,
        compression=compression,
        max_size=2**24,
        legacy=True,  # a plain connection object, as tests.support does
    )


def refused_from(server, source, ticket):
    try:
        ws = ws_from(server, source, ticket)
    except InvalidStatus as e:
        return e.response.status_code
    ws.close()
    raise AssertionError(f"upgrade from {source} was accepted")


def raw_client(server, sub, room=None, **connect_kwargs):
    """A RawWebSocket that is open (WELCOME read) and, if asked, in C{room}."""
    raw = rawws.RawWebSocket(server.port, **connect_kwargs)
    status, head = raw.upgrade("/ws?ticket=" + server.ticket(sub))
    assert status == 101, head
    assert raw.recv_json()["type"] == "WELCOME"
    if room is not None:
        raw.send_json({"type": "ENTER", "room": room, "ref": "in"})
        for _ in range(10):
            if raw.recv_json().get("ref") == "in":
                break
    return raw


# --- handshake ---------------------------------------------------------------


def test_stalled_handshakes_are_dropped(start_chatd, clients):
    """
    A connection that stops before TLS, inside TLS, inside the HTTP request
    headers, or idles after an HTTP response, is dropped after
    handshake_timeout; an open WebSocket is not.
    """
    server = start_chatd(websocket__handshake_timeout=str(HANDSHAKE_TIMEOUT))
    alive = connect(server, "alice")  # opened first, so its deadline would come first
    clients.append(alive)

    silent_tcp = rawws.tcp_connect(server.port)  # never says a word
    tls_only = rawws.tls_connect(server.port)  # TLS done, no request
    slowloris = rawws.tls_connect(server.port)
    slowloris.sendall(b"GET /ws?ticket=x HTTP/1.1\r\nHost: localhost\r\nX-Slow: a")
    keepalive = rawws.tls_connect(server.port)
    keepalive.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert keepalive.recv(65536).startswith(b"HTTP/1.1 200")
    # A TLS handshake started and never finished: half a ClientHello.
    half_hello = rawws.tcp_connect(server.port)
    half_hello.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")

    for name, sock in [("tcp", silent_tcp), ("half ClientHello", half_hello), ("tls", tls_only),
                       ("slowloris", slowloris), ("keep-alive", keepalive)]:
        assert rawws.ended(sock, HANDSHAKE_TIMEOUT + 8), f"{name} connection was not dropped"
        sock.close()

    # Every stalled connection is gone, all past the WebSocket's own deadline:
    # it still works.
    assert alive.enter("lobby")["type"] == "ENTER"
    assert "no WebSocket or HTTP request within" in server.log_text()
    assert_clean_log(server)


def test_connection_caps(start_chatd, clients):
    """
    Open WebSockets are capped per address (429) and in all (503), a refusal
    does not spend the ticket, and a closed connection gives its slot back.
    Connections still in their handshake are capped per address too.
    """
    server = start_chatd(limits__max_connections="3", limits__max_connections_per_ip="2")
    opened = []
    try:
        first = Client(ws_from(server, "127.0.0.1", server.ticket("a1")))
        second = Client(ws_from(server, "127.0.0.1", server.ticket("a2")))
        opened += [first, second]
        for client in opened:
            client.recv()  # WELCOME
        kept_ticket = server.ticket("a3")
        assert refused_from(server, "127.0.0.1", kept_ticket) == 429
        other = Client(ws_from(server, "127.0.0.2", server.ticket("b1")))
        opened.append(other)
        assert refused_from(server, "127.0.0.3", server.ticket("c1")) == 503

        # Release on close: once the second sees the first's QUIT, its slot is free.
        first.enter("lobby")
        second.enter("lobby")
        first.close()
        second.recv_until(lambda f: f["type"] == "QUIT")
        third = Client(ws_from(server, "127.0.0.1", kept_ticket))  # the 429 left it unspent
        opened.append(third)
        assert third.recv()["type"] == "WELCOME"

        # Handshake stage: two silent connections from one address are held
        # (until handshake_timeout, 10 s); a third is closed at once.
        silent = [rawws.tcp_connect(server.port, source="127.0.0.4") for _ in range(2)]
        extra = rawws.tcp_connect(server.port, source="127.0.0.4")
        assert rawws.ended(extra, RECV_TIMEOUT)
        assert all(rawws.still_open(sock) for sock in silent)
        for sock in silent + [extra]:
            sock.close()
    finally:
        for client in opened:
            client.close()
    assert "too many connections from your address" in server.log_text()
    assert_clean_log(server)


def test_request_bodies_are_capped(chatd):
    """
    A request body over 64 KiB is never kept (twisted.web would spool it to
    disk): up to 1 MiB it is read, thrown away and answered 413 JSON; a
    body that announces or streams more than that is cut off.
    """
    over = rawws.tls_connect(chatd.port)
    over.sendall(
        b"POST /api/publish HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\n\r\n" + b"x" * 100000
    )
    answer = b""
    for _ in range(100):  # the answer is a few hundred bytes; recv has the socket's timeout
        head, _, body = answer.partition(b"\r\n\r\n")
        length = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
        if length and len(body) >= length[0]:
            break
        answer += over.recv(65536)
    assert head.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"application/json" in head
    assert json.loads(body)["error"] == "too_large"
    over.close()

    announced = rawws.tls_connect(chatd.port)
    announced.sendall(
        b"POST /auth/ticket HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000000\r\n\r\n"
    )
    assert rawws.ended(announced, RECV_TIMEOUT)

    streamed = rawws.tls_connect(chatd.port)
    streamed.sendall(b"POST /auth/ticket HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
    with pytest.raises(OSError):
        for _ in range(64 * 16):  # 16 MiB at most, far past the cap
            streamed.sendall(chunk)
    assert http("GET", chatd.base + "/healthz")[0] == 200
    assert "request body of" in chatd.log_text()
    assert_clean_log(chatd)


# --- flooding ----------------------------------------------------------------


def test_flooding_is_refused_then_closed(start_chatd, clients):
    """
    Over the token bucket a TALK gets ERROR rate_limited and is not
    delivered; kept up, the flood ends the connection with 1008.
    """
    server = start_chatd(limits__rate="0.1", limits__burst="4", limits__abuse_strikes="3")
    flooder, listener, other = (connect(server, s) for s in ("flooder", "listener", "other"))
    clients.extend([flooder, listener, other])
    for client in (listener, other, flooder):
        client.enter("lobby")
    listener.recv_until(lambda f: f["type"] == "ENTER" and f["sender"] == "flooder")
    other.recv_until(lambda f: f["type"] == "ENTER" and f["sender"] == "flooder")

    for i in range(3):  # ENTER took the first of 4 tokens
        flooder.talk("lobby", f"ok {i}")
        assert listener.recv()["message"] == f"ok {i}"
    # Refused before it is parsed (that is the point: flooding costs little),
    # so the ERROR carries no ref: it is the next frame.
    flooder.send({"type": "TALK", "room": "lobby", "message": "one too many", "ref": "x"})
    refused = flooder.recv()
    assert (refused["type"], refused["code"]) == ("ERROR", "rate_limited")
    other.talk("lobby", "marker")
    assert listener.recv()["message"] == "marker"  # not "one too many"

    for i in range(10):
        try:
            flooder.send({"type": "TALK", "room": "lobby", "message": f"flood {i}"})
        except Exception:
            break  # closed under us: what we are waiting for
    assert flooder.closed_with() == 1008
    assert listener.recv_until(lambda f: f["type"] == "QUIT")[-1]["sender"] == "flooder"
    assert_clean_log(server)


# --- slow consumers ------------------------------------------------------------


def test_slow_consumer_is_cut_off(start_chatd, clients):
    """
    A client that stops reading is closed with 4008 once its send buffer is
    over max_send_buffer_bytes; the room goes on and a reading member gets
    every message, in order.
    """
    server = start_chatd(
        limits__max_send_buffer_bytes="262144",
        limits__rate="100000",
        limits__burst="100000",
        limits__max_talk_chars="60000",
    )
    # A small receive window, so the kernel does not absorb megabytes first.
    slow = raw_client(server, "slow", room="r", rcvbuf=8192)
    listener, talker = connect(server, "listener"), connect(server, "talker")
    clients.extend([listener, talker])
    listener.enter("r")
    talker.enter("r")
    listener.recv_until(lambda f: f["type"] == "ENTER" and f["sender"] == "talker")

    body = "x" * 59000
    sent, heard, quit_at = [], [], None
    for i in range(1000):  # 59 MB at most; the cut comes after a few MB
        text = f"{i}:{body}"
        talker.talk("r", text)
        sent.append(i)
        for frame in listener.recv_until(lambda f: f["type"] == "TALK" and f["message"] == text):
            if frame["type"] == "TALK":
                heard.append(int(frame["message"].split(":", 1)[0]))
            elif frame["type"] == "QUIT" and frame["sender"] == "slow":
                quit_at = i
        if quit_at is not None and i >= quit_at + 20:
            break  # the room went on for a while after the cut
    assert quit_at is not None, "the slow consumer was never cut off"
    assert heard == sent  # nothing lost, nothing reordered for the reader
    # What the slow client finds when it finally reads: a backlog, then 4008.
    assert slow.close_code(limit=100000) == 4008
    slow.close()
    assert "is not reading" in server.log_text()
    assert_clean_log(server)


# --- compression ------------------------------------------------------------------


def deflate(data):
    """A permessage-deflate message body: raw deflate, sync-flushed, tail cut."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return (compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]


def test_compression_bounds_inflation(start_chatd, clients):
    """
    With [websocket] compression = on, compressed chat works, and a zip bomb
    (48 KB that inflate to 50 MB) is closed with 1009 at the message limit
    instead of being inflated.
    """
    server = start_chatd(websocket__compression="on")
    alice, bob = connect(server, "alice"), connect(server, "bob")  # websockets offers deflate
    clients.extend([alice, bob])
    assert "permessage-deflate" in alice.ws.response.headers.get("Sec-WebSocket-Extensions", "")
    alice.enter("lobby")
    bob.enter("lobby")
    said = alice.talk("lobby", "compressible " * 100)
    assert bob.recv_until(lambda f: f["type"] == "TALK")[-1]["id"] == said["id"]

    bomber = rawws.RawWebSocket(server.port)
    status, head = bomber.upgrade(
        "/ws?ticket=" + server.ticket("mallory"),
        extra_headers=["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"],
    )
    assert status == 101 and b"permessage-deflate" in head.lower()
    bomb = deflate(b'{"type": "TALK", "room": "lobby", "message": "' + b"A" * 50_000_000 + b'"}')
    assert len(bomb) < 65536
    bomber.send_frame(rawws.OP_TEXT, bomb, rsv1=True)
    assert bomber.close_code() == 1009
    bomber.close()
    assert "after decompression" in server.log_text()
    assert alice.talk("lobby", "still up")["type"] == "TALK"
    assert_clean_log(server)


# --- dead peers ----------------------------------------------------------------


def test_peer_that_never_answers_pings_is_dropped(start_chatd, clients):
    """A client that reads but never answers a ping is dropped after ping_timeout."""
    server = start_chatd(websocket__ping_interval="0.5", websocket__ping_timeout="1")
    healthy = connect(server, "healthy")  # websockets answers pings by itself
    clients.append(healthy)
    dead = raw_client(server, "dead")
    opcodes = set()
    try:
        for _ in range(20):
            opcode, _ = dead.recv_frame()
            opcodes.add(opcode)
            if opcode == rawws.OP_PING:
                break
    except rawws.Closed:
        pass
    assert rawws.OP_PING in opcodes
    assert rawws.ended(dead.sock, 10)
    dead.close()
    assert healthy.enter("lobby")["type"] == "ENTER"  # outlived several pings
    assert "ping timeout" in server.log_text()
    assert_clean_log(server)


# --- per-connection limits and malformed input ----------------------------------


MALFORMED = [
    "not json",
    "",
    "[1,2]",
    "null",
    '"TALK"',
    "{}",
    '{"type": null}',
    '{"type": 5}',
    '{"type": "SHOUT"}',
    '{"type": "talk", "room": "lobby", "message": "lower-case type"}',
    '{"type": "ENTER"}',
    '{"type": "ENTER", "room": 5}',
    '{"type": "ENTER", "room": ["lobby"]}',
    '{"type": "ENTER", "room": "lobby", "since": 12}',
    '{"type": "ENTER", "room": "lobby", "since": "12-x"}',
    '{"type": "TALK", "room": "lobby"}',
    '{"type": "TALK", "room": "lobby", "message": {"text": "hi"}}',
    '{"type": "TALK", "room": "lobby", "message": "hi", "cid": 5}',
    '{"type": "TALK", "room": "lobby", "message": "\\ud800 lone surrogate"}',
    '{"type": "TALK", "room": "lobby", "message": "hi", "ref": {"a": 1}}',
    '{"type": "TALK", "room": "lobby", "message": "hi", "ref": true}',
    '{"type": "TALK", "room": "lobby", "message": "hi", "ref": 1e400}',
    '{"type": "QUIT", "room": null}',
    '{"type": "AUTH"}',
    '{"type": "AUTH", "token": 5}',
    '{"type": "ENTER", "room": "lobby", "ref": ' + "9" * 5000 + "}",  # past int() digit limit
    "[" * 1500 + "]" * 1500,  # past the JSON parser's recursion limit
    '{"type": "TALK", "room": "lobby", "message": "NaN", "ref": NaN}',
]


def test_per_connection_limits_and_malformed_frames(start_chatd, clients):
    """
    Rooms per connection, TALK size, and every malformed frame get an ERROR
    and the connection stays usable; over-size, binary and invalid UTF-8
    messages get their close codes.  No traceback either way.
    """
    server = start_chatd(
        limits__max_rooms_per_connection="2",
        limits__max_talk_chars="100",
        limits__max_message_bytes="8192",
        limits__rate="1000",
        limits__burst="1000",
    )
    alice = connect(server, "alice")
    clients.append(alice)
    alice.enter("one")
    alice.enter("two")
    assert alice.enter("three")["code"] == "forbidden"
    assert alice.talk("one", "x" * 101)["code"] == "too_large"
    for frame in MALFORMED:
        alice.send(frame)
        answer = alice.recv()
        assert (answer["type"], answer["code"]) == ("ERROR", "bad_request"), (frame[:80], answer)
    assert alice.talk("one", "still here")["type"] == "TALK"

    too_big = connect(server, "bob")
    clients.append(too_big)
    too_big.send("x" * 8193)
    assert too_big.closed_with() == 1009

    binary = connect(server, "carol")
    clients.append(binary)
    binary.ws.send(b"\x00\x01")
    assert binary.closed_with() == 1003

    invalid = raw_client(server, "dave")
    invalid.send_frame(rawws.OP_TEXT, b'{"type": "TALK", "message": "\xc3\x28"}')
    assert invalid.close_code() == 1007
    invalid.close()

    huge = raw_client(server, "erin")
    huge.send_raw(rawws.frame(rawws.OP_TEXT, b"", length=2**40))  # declares 1 TiB, sends none
    assert huge.close_code() == 1009
    huge.close()

    unmasked = raw_client(server, "frank")
    unmasked.send_frame(rawws.OP_TEXT, b'{"type": "ENTER", "room": "x"}', masked=False)
    assert unmasked.close_code() == 1002
    unmasked.close()
    assert_clean_log(server)


# --- log injection --------------------------------------------------------------


def test_names_never_reach_the_log_raw(chatd, clients):
    """
    User names with control characters are refused at the ticket; room names
    are validated before use; request paths are logged escaped.  Nothing a
    client sends can start a log line of its own.
    """
    forged = "2026-01-01T00:00:00+0000 [chatd.ws#info] FORGED"
    for claims in ({"name": "Eve\n" + forged}, {"name": "Eve\x1b[2J"}, {"name": "Eve\u2028" + forged}):
        token = mint_token(chatd.secret, "eve", **claims)
        status, _, body = http("POST", chatd.base + "/auth/ticket", token=token)
        assert status == 401 and body["error"] == "invalid_token", (claims, body)
    token = mint_token(chatd.secret, "eve\n" + forged)
    assert http("POST", chatd.base + "/auth/ticket", token=token)[0] == 401

    alice = connect(chatd, "alice")
    clients.append(alice)
    answer = alice.request({"type": "ENTER", "room": "lobby\n" + forged})
    assert answer["code"] == "bad_request"

    # Raw control bytes in a request line: twisted.web answers 400 itself.
    raw = rawws.tls_connect(chatd.port)
    raw.sendall(b"GET /nope\x1b[2J\x07FORGED HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert raw.recv(65536).startswith(b"HTTP/1.1 400")
    raw.close()
    # Percent-escaped ones reach the resources and are logged still escaped.
    raw = rawws.tls_connect(chatd.port)
    target = "/nope%1b[2J%0a" + quote(forged)
    raw.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    assert raw.recv(65536).startswith(b"HTTP/1.1 404")
    raw.close()
    wait_for(lambda: target in chatd.log_text(), RECV_TIMEOUT, "the access log line")

    text = chatd.log_text()
    assert "\x1b" not in text and "\x07" not in text
    assert not any(line.startswith("2026-01-01") for line in text.splitlines())
    assert_clean_log(chatd)
