# -*- test-case-name: tests.test_jsonlog -*-
"""
chatd.jsonlog: events from a real twisted.logger Logger, written as JSON
lines: the contract's keys, stable names, structured fields, and no secret
in any value; then a real twistd chatd with log_format = json.
"""

import io
import json

from twisted.logger import Logger, LogPublisher

from chatd import jsonlog
from tests.support import mint_token, wait_for, ws_refusal

SECRET = b"k" * 32


def capture():
    """A Logger publishing to a JSON observer on a StringIO."""
    out = io.StringIO()
    publisher = LogPublisher(jsonlog.json_observer(out))
    return Logger(namespace="chatd.test", observer=publisher), out


def lines(out):
    text = out.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_one_object_per_line_with_the_contract_keys():
    """ts, level, event, msg and the structured fields, one line per event."""
    log, out = capture()
    log.info("websocket {connection} closed ({code})", connection="i:1", code=1001)
    log.warn("line with\nnewline {user}", user="bob\nINFO forged")
    first, second = lines(out)
    assert first["level"] == "info"
    assert first["event"] == "chatd.test:websocket_closed"
    assert first["msg"] == "websocket i:1 closed (1001)"
    assert (first["connection"], first["code"]) == ("i:1", 1001)
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["level"] == "warn"
    assert "\n" not in second["user"]


def test_event_name_is_stable_and_can_be_given():
    """The derived name ignores field values; an explicit event field wins."""
    log, out = capture()
    log.info("{a} entered {b}", a="x", b="y")
    log.info("{a} entered {b}", a="other", b="values")
    log.info("session ended {connection}", event="ws.session_ended", connection="i:2")
    one, two, three = lines(out)
    assert one["event"] == two["event"] == "chatd.test:entered"
    assert three["event"] == "ws.session_ended"


def test_secrets_never_appear():
    """A JWT, a ticket in a query string and a bearer header are redacted in msg and fields."""
    token = mint_token(SECRET, "alice")
    log, out = capture()
    log.info("request {uri} auth {header}", uri="/ws?ticket=abcdef123", header="Bearer " + token)
    log.info("odd {text}", text=f"token={token}")
    text = out.getvalue()
    assert token not in text and "abcdef123" not in text
    assert "[redacted]" in text


def test_failure_adds_error_and_redacted_traceback():
    """log.failure carries error and traceback fields, redacted."""
    log, out = capture()
    token = mint_token(SECRET, "alice")
    try:
        raise ValueError("bad token " + token)
    except ValueError:
        log.failure("handling failed")
    (record,) = lines(out)
    assert record["level"] == "critical"
    assert "ValueError" in record["traceback"]
    assert token not in out.getvalue()


def test_observer_factory_targets(tmp_path):
    """twistd's choice of output is kept: stdout for -n, else the log file."""
    path = tmp_path / "chatd.log"
    observer = jsonlog.observer_for(str(path), nodaemon=True)
    Logger(namespace="chatd.test", observer=observer).info("hello {n}", n=1)
    assert json.loads(path.read_text())["n"] == 1


def test_real_chatd_logs_json_lines(start_chatd, clients):
    """
    A real twistd chatd with log_format = json: every line of its output is
    one JSON object; a session's end is one line with its numbers; a refused
    handshake is logged; the ticket appears nowhere.
    """
    server = start_chatd(server__log_format="json")
    ticket = server.ticket("alice")
    alice = server.connect(ticket=ticket)
    clients.append(alice)
    alice.enter("lobby")
    alice.talk("lobby", "hi")
    alice.close()
    assert ws_refusal(server.ws_base + "/ws?ticket=forged-ticket-value") == 401
    wait_for(lambda: "websocket_session_ended" in server.log_text(), 5, "the session line")
    server.stop()
    text = server.log_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for record in records:
        assert {"ts", "level", "event", "msg"} <= set(record), record
    (ended,) = [r for r in records if r["event"] == "websocket_session_ended"]
    assert ended["user"] == "alice" and ended["code"] in (1000, 1005)
    assert ended["received"] == 2 and ended["sent"] >= 3  # ENTER, TALK in; WELCOME, ENTER, TALK out
    assert ended["duration"] >= 0 and ended["peer"] == "127.0.0.1"
    assert any(r.get("status") == 401 for r in records)
    assert ticket not in text and "forged-ticket-value" not in text
