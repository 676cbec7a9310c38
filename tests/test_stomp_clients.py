# -*- test-case-name: tests.test_stomp_clients -*-
"""
Real STOMP clients against real chatd processes over real TLS:
@stomp/stompjs 7 (Node, ws) on /ws, and stompjs 2.3.3 with sockjs-client
1.6.1 on /ws-stomp (SockJS framing), sharing rooms with chatd.v1 clients on
one instance and across two with Redis.  The clients live in
tests/stomp-clients (installed by `make test` with npm ci).
"""

import json
import os

import pytest

from tests import support


@pytest.fixture
def agents(tmp_path, dev_dir):
    """C{agents(chatd, lib, path)} starts a Node STOMP client; all are stopped by PID."""
    started = []

    def start(server, lib="stompjs7", path=None, sub=None, ticket=True, protocols=None, **claims):
        if path is None:
            path = "/ws" if lib == "stompjs7" else "/ws-stomp"
        url = server.ws_base if lib == "stompjs7" else server.base
        url += path
        if ticket:
            url += "?ticket=" + server.ticket(sub, **claims)
        log = os.path.join(str(tmp_path), f"agent{len(started)}.log")
        agent = support.StompAgent(lib, url, os.path.join(dev_dir[0], "fullchain.pem"), log, protocols)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def connect(agent, **fields):
    """CONNECT and wait for CONNECTED; returns its headers."""
    agent.do("connect", **fields)
    return agent.next("connected", timeout=10)["headers"]


def subscribe(agent, room, prefix="/sub/chat/room/", **headers):
    agent.do("subscribe", destination=prefix + room, headers=headers)
    return agent.next("subscribed")["id"]


def talk(agent, room, message, **headers):
    body = json.dumps({"type": "TALK", "roomId": room, "sender": "ignored", "message": message}, ensure_ascii=False)
    agent.do("send", destination="/pub/chat/message", body=body, headers=headers)


def test_stompjs7_and_json_client_share_a_room(chatd, agents, clients):
    """Two @stomp/stompjs 7 clients and a chatd.v1 client in one room: ENTER/TALK/QUIT, counts, ids, receipts."""
    ann = agents(chatd, sub="ann", name="Ann")
    headers = connect(ann)
    assert headers["version"] == "1.2" and headers["heart-beat"] == "10000,10000"
    assert headers["user-name"] == "Ann" and headers["server"].startswith("chatd/")
    subscribe(ann, "lobby", receipt="s1")
    [enter] = ann.messages(1)  # the own ENTER, then the receipt: the SUBSCRIBE is done
    assert ann.next("receipt")["headers"]["receipt-id"] == "s1"
    assert enter["headers"]["destination"] == "/sub/chat/room/lobby"
    assert enter["headers"]["subscription"] == "sub-0"
    assert enter["headers"]["message-id"] == enter["body"]["id"]
    assert enter["body"]["type"] == "ENTER" and enter["body"]["userCount"] == 1

    bob = agents(chatd, sub="bob", name="Bob")
    connect(bob)
    subscribe(bob, "lobby", prefix="/topic/")
    json_client = chatd.connect("cid")
    clients.append(json_client)
    json_client.enter("lobby")

    talk(ann, "lobby", "hello from stompjs", receipt="t1")
    ann_events = ann.until(lambda e: e["ev"] == "receipt")
    assert ann_events[-1]["headers"]["receipt-id"] == "t1"
    # The receipt comes once the TALK is stored and published: after its own MESSAGE.
    assert ann_events[-2]["body"]["message"] == "hello from stompjs"
    json_saw = [json_client.recv_until(lambda f: f.get("message") == "hello from stompjs")[-1]]
    json_saw.append(json_client.talk("lobby", "hello from json"))
    ann_events += ann.until(lambda e: e["ev"] == "message" and e["body"]["sender"] == "cid" and e["body"]["type"] == "TALK")
    ann_saw = [e["body"] for e in ann_events if e["ev"] == "message"]
    bob_saw = [m["body"] for m in bob.messages(4)]
    assert [(e["type"], e["sender"], e["userCount"]) for e in ann_saw] == [
        ("ENTER", "Bob", 2), ("ENTER", "cid", 3), ("TALK", "Ann", 3), ("TALK", "cid", 3),
    ]
    assert bob_saw == ann_saw  # same events, same ids, same order
    assert [e["id"] for e in json_saw] == [e["id"] for e in ann_saw[2:]]

    ann.do("unsubscribe", id="sub-0")
    [quit_seen] = bob.messages(1)
    assert (quit_seen["body"]["type"], quit_seen["body"]["sender"], quit_seen["body"]["userCount"]) == ("QUIT", "Ann", 2)
    assert json_client.recv()["type"] == "QUIT"
    assert ann.quiet()
    assert any(line.startswith(">>> SUBSCRIBE") for line in ann.raw)
    assert any(line.startswith("<<< MESSAGE") for line in ann.raw)


def test_stompjs2_over_sockjs_with_split_frames(start_chatd, agents, clients):
    """stompjs 2.3.3 + sockjs-client 1.6.1 on /ws-stomp: 1.1, SockJS framing, a 40 KiB TALK split at 16 KiB, emoji split mid-pair."""
    chatd = start_chatd(limits__max_talk_chars=50000)
    old = agents(chatd, "stompjs2-sockjs", sub="old", name="Old")
    headers = connect(old)
    assert headers["version"] == "1.1" and headers["user-name"] == "Old"
    subscribe(old, "big", receipt="s")
    assert old.until(lambda e: e["ev"] == "receipt")[0]["body"]["type"] == "ENTER"
    json_client = chatd.connect("reader")
    clients.append(json_client)
    json_client.enter("big")
    assert old.messages(1)[0]["body"]["sender"] == "reader"

    big = "x" * 40960
    emoji = "\U0001F600" * 10000  # 20000 UTF-16 units: stomp.js cuts one pair in two
    for text in (big, emoji, "a" + emoji):
        talk(old, "big", text)
        [echo] = old.messages(1)
        assert echo["body"]["message"] == text and echo["body"]["sender"] == "Old"
        seen = json_client.recv_until(lambda f: f.get("type") == "TALK")[-1]
        assert seen["message"] == text and seen["id"] == echo["headers"]["message-id"]
    assert sum(1 for line in old.raw if line.startswith(">>> SEND")) == 3
    assert any(line.startswith("<<< MESSAGE") and len(line) > 40960 for line in old.raw)


def test_sockjs_info_and_fallbacks(chatd):
    """/ws-stomp/info says WebSocket only; the HTTP fallback transports are 404."""
    status, headers, body = support.http("GET", chatd.base + "/ws-stomp/info?t=1")
    assert status == 200 and headers["cache-control"].startswith("no-store")
    assert body["websocket"] is True and body["cookie_needed"] is False and body["origins"] == ["*:*"]
    assert isinstance(body["entropy"], int)
    for path in ("/ws-stomp/000/abcdefgh/xhr", "/ws-stomp/000/abcdefgh/xhr_streaming",
                 "/ws-stomp/000/abcdefgh/eventsource", "/ws-stomp/iframe.html",
                 "/ws-stomp/000/abcdefgh/htmlfile", "/ws-stomp/000/abcdefgh/jsonp"):
        assert support.http("GET", chatd.base + path)[0] == 404, path
    assert support.http("POST", chatd.base + "/ws-stomp/000/abcdefgh/xhr_send", body=b'["x"]')[0] == 404
    status, _, body = support.http("GET", chatd.base + "/ws-stomp/")
    assert status == 200 and body == b"Welcome to SockJS!\n"


def wait_raw(agent, line, timeout):
    """Until the client logged C{line} (bounded)."""
    return support.wait_for(lambda: line in agent.raw, timeout, f"{line!r} from the client")


def test_stompjs7_heart_beats_both_ways(chatd, agents):
    """Negotiated 10000,10000: chatd sends an EOL every 10 s and takes the client's."""
    ann = agents(chatd, sub="ann")
    connect(ann, heartbeat=[10000, 10000])
    wait_raw(ann, "<<< PONG", 15)
    wait_raw(ann, ">>> PING", 15)
    subscribe(ann, "hb", receipt="still-here")
    assert ann.until(lambda e: e["ev"] == "receipt")[-1]["headers"]["receipt-id"] == "still-here"


def test_stompjs7_reconnects_with_since(chatd, agents, clients):
    """Disconnect (RECEIPT, clean close), miss two TALKs, come back with since: replay, REPLAY marker, live."""
    bob = chatd.connect("bob")  # keeps the room (and its history) alive meanwhile
    clients.append(bob)
    bob.enter("r")
    ann = agents(chatd, sub="ann", name="Ann")
    connect(ann)
    subscribe(ann, "r")
    last_seen = ann.messages(1)[0]["headers"]["message-id"]
    ann.do("disconnect")
    events = ann.until(lambda e: e["ev"] == "closed")
    assert events[-1]["code"] == 1000
    assert any(line.startswith(">>> DISCONNECT") for line in ann.raw)
    assert any(line.startswith("<<< RECEIPT") for line in ann.raw)
    missed = [bob.talk("r", "one")["id"], bob.talk("r", "two")["id"]]

    again = agents(chatd, sub="ann", name="Ann")
    connect(again)
    subscribe(again, "r", since=last_seen)
    bodies = [m["body"] for m in again.messages(4)]
    assert [b["type"] for b in bodies] == ["TALK", "TALK", "REPLAY", "ENTER"]
    assert [b["id"] for b in bodies[:2]] == missed
    assert bodies[2] == {"type": "REPLAY", "roomId": "r", "count": 2, "complete": True}
    assert bodies[3]["sender"] == "Ann" and bodies[3]["userCount"] == 2


def test_stomp_and_json_across_two_instances(start_redis, start_chatd, agents, clients):
    """Redis: @stomp/stompjs on instance A, stompjs 2.3.3/SockJS and a chatd.v1 client on B, one room, one order."""
    redis = start_redis()
    a = start_chatd(name="a", redis__url=redis.url)
    b = start_chatd(name="b", redis__url=redis.url)
    ann = agents(a, sub="ann", name="Ann")
    connect(ann)
    subscribe(ann, "x")
    ann.messages(1)
    old = agents(b, "stompjs2-sockjs", sub="old", name="Old")
    connect(old)
    subscribe(old, "x")
    carl = b.connect("carl")
    clients.append(carl)
    carl.enter("x")
    talk(ann, "x", "from A", receipt="a1")
    ann_events = ann.until(lambda e: e["ev"] == "receipt")
    talk(old, "x", "from B")
    carl.recv_until(lambda f: f.get("message") == "from B")
    ann_events += ann.until(lambda e: e["ev"] == "message" and e["body"]["message"] == "from B")
    ann_saw = [e["body"] for e in ann_events if e["ev"] == "message"]
    old_saw = [e["body"] for e in old.until(lambda e: e["ev"] == "message" and e["body"]["message"] == "from B")
               if e["ev"] == "message"]
    assert [(e["type"], e["sender"]) for e in ann_saw] == [
        ("ENTER", "Old"), ("ENTER", "carl"), ("TALK", "Ann"), ("TALK", "Old"),
    ]
    assert old_saw == ann_saw  # the same events, ids and order on both instances
    assert ann_saw[-1]["userCount"] == 3


def test_connect_auth_takes_a_jwt_in_connect(start_chatd, agents):
    """[stomp] connect_auth = on: no ticket on the URL, the JWT in CONNECT (a forged one: ERROR, close)."""
    chatd = start_chatd(stomp__connect_auth="on")
    ann = agents(chatd, sub="ann", ticket=False)
    headers = connect(ann, headers={"Authorization": "Bearer " + chatd.token("ann", name="Ann")})
    assert headers["user-name"] == "Ann"
    eve = agents(chatd, sub="eve", ticket=False)
    eve.do("connect", headers={"passcode": "not.a.jwt"})
    events = eve.until(lambda e: e["ev"] == "closed")
    error = next(e for e in events if e["ev"] == "error")
    assert error["headers"]["message"] == "unauthorized" and "malformed" in error["body"]
    # connect_auth never lets chatd.v1 in without a ticket.
    assert support.ws_refusal(chatd.ws_base + "/ws") == 401


def test_ticket_required_by_default(chatd):
    """Without connect_auth a STOMP upgrade needs a ticket like /ws: 401 before the upgrade."""
    for path in ("/ws-stomp/websocket", "/ws-stomp/000/abcdefgh/websocket"):
        assert support.ws_refusal(chatd.ws_base + path) == 401, path


def test_refusal_is_error_then_close(chatd, agents):
    """A SEND into a topic: stompjs sees ERROR forbidden with the receipt-id, then the close."""
    ann = agents(chatd, sub="ann")
    connect(ann)
    ann.do("send", destination="/topic/lobby", body="hi", headers={"receipt": "nope"})
    events = ann.until(lambda e: e["ev"] == "closed")
    error = next(e for e in events if e["ev"] == "error")
    assert error["headers"]["message"] == "forbidden" and error["headers"]["receipt-id"] == "nope"
    assert "is a topic" in error["body"]
    assert events[-1]["code"] == 1000
