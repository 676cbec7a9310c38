"""
The benchmark (bench/): its summary and profile arithmetic, the reference
server's protocol in memory (create_memory_agent), the generator's STOMP
frames against chatd's own STOMP framing, the floor server's answer, and tiny real
runs of scenarios 1, 3 and 5, and of 2 against the floor (real TLS, tickets,
STOMP, processes stopped by PID).  Figures are never asserted: only that the bench runs,
reports one JSON line per run, and loses nothing.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "bench", "run.py")
# Scenario 2's tiny runs: enough connections that each server's CPU, which
# /proc counts in 10 ms ticks, is several ticks (30 at about 1 ms each, 15
# per server when paired, sometimes read as none on a loaded machine).
TINY_CONNECTIONS = 200


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_percentile_picks_nearest_rank():
    """p50 and p99 of a known list; None for no samples."""
    loadgen = _load("loadgen")
    values = list(range(1, 101))
    assert loadgen.percentile(values, 0.5) in (50, 51)
    assert loadgen.percentile(values, 0.99) == 99
    assert loadgen.percentile([], 0.99) is None


def test_talk_bursts_show_how_the_window_refilled():
    """Sends closer than the gap are one burst; p50 is the burst size the median TALK went out in."""
    loadgen = _load("loadgen")
    ms = 1_000_000
    sent = [0, 10, 20, 5 * ms, 5 * ms + 10, 9 * ms, 20 * ms]
    assert loadgen.talk_bursts(sent) == [3, 2, 1, 1]
    assert loadgen.talk_bursts([]) == []
    # A chain of sends each within the gap of the one before is one burst, however long.
    assert loadgen.talk_bursts([i * ms // 2 for i in range(10)]) == [10]
    # Window refills of 18 and 2: most TALKs went out in bursts of 18.
    assert loadgen.burst_fields([18, 2] * 50) == {"talk_bursts": 100, "talk_burst_p50": 18}
    assert loadgen.burst_fields([1] * 7) == {"talk_bursts": 7, "talk_burst_p50": 1}
    assert loadgen.burst_fields([]) == {"talk_bursts": 0, "talk_burst_p50": None}


def test_profile_summary_per_function(tmp_path, capsys):
    """py-spy's raw stacks are summed per function (line numbers dropped), own and total."""
    run = _load("run")
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "main (app.py:1);send (ws.py:10) 3\n"
        "main (app.py:1);send (ws.py:11) 2\n"
        "main (app.py:1);parse (ws.py:20) 5\n"
    )
    run.print_profile(str(raw), 5)
    out = capsys.readouterr().out
    assert "10 samples" in out
    own = out.split("by own time:")[1].split("top")[0]
    assert " 50.0%  send (ws.py)" in own and " 50.0%  parse (ws.py)" in own
    assert "100.0%  main (app.py)" in out.split("by total time")[1]


def test_against_compares_each_scenarios_subject_at_a_revision(tmp_path):
    """--against REV: chatd at REV first, this tree second, in the scenario's own subject variant."""
    run = _load("run")
    one = run.against(run.SCENARIOS[1], "abc123")
    assert one.variants == [("chatd@abc123", 1), ("chatd", 1)]
    assert run.against(run.SCENARIOS[4], "abc123").variants == [("chatd@abc123", 2), ("chatd", 2)]
    five = run.against(run.SCENARIOS[5], "abc123")
    assert five.variants == [("chatd@abc123", 1, "stomp"), ("chatd", 1, "stomp")]
    assert five.ratio_name == "ratio"
    tree = run.snapshot("HEAD", str(tmp_path))
    assert os.path.exists(os.path.join(tree, "chatd", "hub.py"))
    assert os.path.exists(os.path.join(tree, "twisted", "plugins", "chatd_plugin.py"))


@pytest.fixture
def memory_reactor():
    """A MemoryReactorClock that also runs Autobahn's (txaio's) timers, for the test's length."""
    import txaio
    from twisted.internet.testing import MemoryReactorClock

    saved, txaio.config.loop = txaio.config.loop, MemoryReactorClock()
    yield txaio.config.loop
    txaio.config.loop = saved


def test_reference_server_speaks_enough_chatd_v1(memory_reactor):
    """WELCOME on open; ENTER and TALK reach every member, the actor's copy with its ref; QUIT leaves."""
    from autobahn.twisted.testing import create_memory_agent

    from tests.fakes import MemoryClient, Pumps

    factory = _load("reference").make_factory()
    pumps = Pumps()
    agent = create_memory_agent(memory_reactor, pumps, lambda: factory.buildProtocol(None))
    made = []

    def client():
        made.append(MemoryClient())
        return made[-1]

    for _ in range(2):
        agent.open("ws://localhost:9/ws", {"protocols": ["chatd.v1"]}, protocol_class=client)
        pumps.flush()
    alice, bob = made
    assert alice.received[0]["type"] == bob.received[0]["type"] == "WELCOME"
    assert alice.websocket_protocol_in_use == "chatd.v1"
    for member, ref in ((alice, "a"), (bob, "b")):
        member.sendMessage(json.dumps({"type": "ENTER", "room": "r", "ref": ref}).encode())
        pumps.flush()
    alice.sendMessage(json.dumps({"type": "TALK", "room": "r", "message": "hi", "ref": "t"}).encode())
    pumps.flush()
    talks = [[e for e in m.received if e["type"] == "TALK"] for m in (alice, bob)]
    assert [e["message"] for e in talks[0]] == [e["message"] for e in talks[1]] == ["hi"]
    assert talks[0][0].get("ref") == "t" and "ref" not in talks[1][0]
    assert talks[1][0]["userCount"] == 2
    bob.sendMessage(json.dumps({"type": "QUIT", "room": "r"}).encode())
    pumps.flush()
    pumps.flush()  # bob's pump carried it to the server after alice's had run
    assert len(factory.rooms["r"]) == 1
    assert [e["type"] for e in alice.received[1:]] == ["ENTER", "ENTER", "TALK", "QUIT"]


def test_floor_server_answers_an_upgrade_with_the_rfc_accept_and_welcome():
    """RFC 6455's sample key gets its sample accept, then chatd.v1's WELCOME frame; no key gets a 400 and a close."""
    from twisted.internet.testing import StringTransport

    floor = _load("floor")
    protocol = floor.make_factory().buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    head = b"GET /ws HTTP/1.1\r\nHost: x\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    protocol.dataReceived(head[:20])
    assert transport.value() == b""
    protocol.dataReceived(head[20:])
    reply = transport.value()
    assert reply.startswith(b"HTTP/1.1 101 ")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in reply
    welcome = reply.split(b"\r\n\r\n", 1)[1]
    assert welcome[:2] == bytes([0x81, len(welcome) - 2]) and json.loads(welcome[2:])["type"] == "WELCOME"
    protocol.dataReceived(b"\x81\x80....")  # frames after the upgrade are ignored
    assert transport.value() == reply and not transport.disconnecting

    refused = floor.make_factory().buildProtocol(None)
    transport = StringTransport()
    refused.makeConnection(transport)
    refused.dataReceived(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ") and transport.disconnecting


def test_generator_stomp_frames_meet_chatd_framing():
    """SUBSCRIBE and SEND parse with chatd's STOMP parser; a MESSAGE and a RECEIPT chatd encodes are recognised."""
    from chatd.stomp import frames

    loadgen = _load("loadgen")
    stomp = loadgen.STOMP
    parser = frames.FrameParser(1 << 16)
    text = b"%s%08d%019d%s" % (loadgen.MARK, 7, 123, b"x" * 70)
    subscribe, send = list(parser.feed(stomp.enter("fanout", "enter-3") + stomp.talk(b"fanout", text)))
    assert (subscribe.command, subscribe.get("destination"), subscribe.get("receipt"), subscribe.get("id")) == (
        "SUBSCRIBE", "/topic/fanout", "enter-3", "sub-0",
    )
    assert (send.command, send.get("destination")) == ("SEND", "/app/chat/fanout")
    assert json.loads(send.body) == {"message": text.decode()}
    body = json.dumps({"type": "TALK", "roomId": "fanout", "sender": "m0", "message": text.decode()})
    delivered = frames.encode(frames.message("/topic/fanout", "sub-0", "1-7", body))
    at = delivered.find(loadgen.MARK)
    assert at >= 0 and int(delivered[at + len(loadgen.MARK):][:loadgen.SEQ_DIGITS]) == 7
    receipt = frames.encode(frames.receipt("enter-3"))
    assert stomp.quote_ref("enter-3") in receipt and stomp.quote_ref("enter-30") not in receipt
    assert stomp.is_error(frames.encode(frames.error("bad_request", "no"))) and not stomp.is_error(receipt)


def test_tiny_run_of_scenarios_1_3_and_5():
    """Both servers serve scenario 1 and 3, chatd scenario 5 with chatd.v1 and STOMP clients; nothing lost."""
    pytest.importorskip("picows", reason="the bench extra: pip install -e '.[bench]'")
    pytest.importorskip("uvloop", reason="the bench extra: pip install -e '.[bench]'")
    done = subprocess.run(
        [sys.executable, RUN, "1", "3", "5", "--runs", "1", "--members", "5", "--messages", "10",
         "--rooms", "3", "--rate", "60", "--duration", "0.5", "--quiet-wait", "0", "--timeout", "20"],
        capture_output=True, text=True, timeout=100, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    runs = [line for line in lines if "run" in line]
    assert sorted((r["scenario"], r["server"]) for r in runs) == [
        (1, "chatd"), (1, "reference"), (3, "chatd"), (3, "reference"), (5, "chatd json"), (5, "chatd stomp"),
    ]
    for r in runs:
        assert r["lost"] == 0 and r["errors"] == 0, r
        assert r["delivered"] == (2 * 30 if r["scenario"] == 3 else 5 * 10), r
        if r["scenario"] != 3:
            assert 1 <= r["talk_bursts"] <= 10 and 1 <= r["talk_burst_p50"] <= 10, r
    assert any(line.get("summary") and line["figure"] == "deliveries_per_s" for line in lines)
    assert "ratio of the medians" in done.stdout
    assert any(line.get("summary") and "stomp_vs_json" in line for line in lines)


def test_tiny_run_of_scenario_2_against_the_floor():
    """Scenario 2 runs on the floor server and on chatd (tickets, real TLS); every connection opens on both."""
    pytest.importorskip("picows", reason="the bench extra: pip install -e '.[bench]'")
    pytest.importorskip("uvloop", reason="the bench extra: pip install -e '.[bench]'")
    done = subprocess.run(
        [sys.executable, RUN, "2", "--yardstick", "floor", "--runs", "1", "--connections", str(TINY_CONNECTIONS),
         "--quiet-wait", "0", "--timeout", "20"],
        capture_output=True, text=True, timeout=100, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{") and '"run"' in line]
    assert sorted(r["server"] for r in runs) == ["chatd", "floor"]
    assert all(r["connected"] == TINY_CONNECTIONS and r["cpu_ms_per_connection"] > 0 for r in runs), runs


def test_floor_yardstick_is_for_scenario_2_alone():
    """Asking for the floor with another scenario, or with --against, is a usage error naming the option."""
    for argv in (["1", "2", "--yardstick", "floor"], ["2", "--yardstick", "floor", "--against", "HEAD"]):
        done = subprocess.run([sys.executable, RUN, *argv], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 2 and "--yardstick floor is for scenario 2 alone" in done.stderr


def test_paired_is_for_scenario_2_alone():
    """--paired with another scenario is a usage error naming the option."""
    for argv in (["1", "2", "--paired", "--against", "HEAD"], ["3", "--paired"]):
        done = subprocess.run([sys.executable, RUN, *argv], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert done.returncode == 2 and "--paired is for scenario 2 alone" in done.stderr


@pytest.mark.parametrize("argv, first", [
    (["--against", "HEAD"], ("chatd@HEAD", "snapshot")),
    ([], ("reference", None)),
    (["--yardstick", "floor"], ("floor", None)),
])
def test_paired_setup_starts_the_yardstick_and_this_tree_in_the_runs_order(tmp_path, monkeypatch, argv, first):
    """
    A paired run's two servers: the yardstick (chatd at REV from its
    snapshot, the reference or the floor) first, or this tree's chatd first
    when the order flips.
    """
    run = _load("run")
    monkeypatch.setattr(run, "snapshot", lambda rev, into: str(tmp_path))
    bench = run.Bench(run.parse_args(["2", "--paired", *argv]))
    try:
        kind, env = first
        env = {"PYTHONPATH": str(tmp_path)} if env else None
        assert run.Setup(bench, "pair").pair_order() == [(kind, env), ("chatd", None)]
        assert run.Setup(bench, "pair~").pair_order() == [("chatd", None), (kind, env)]
    finally:
        shutil.rmtree(bench.workdir, ignore_errors=True)


def test_tiny_paired_run_of_scenario_2_against_the_reference():
    """
    Scenario 2 --paired without --against: the reference and chatd in the
    same run, connections alternating (chatd's with tickets, over real
    TLS): a record for each, each with its half of the connections, and
    their ratio.
    """
    pytest.importorskip("picows", reason="the bench extra: pip install -e '.[bench]'")
    pytest.importorskip("uvloop", reason="the bench extra: pip install -e '.[bench]'")
    done = subprocess.run(
        [sys.executable, RUN, "2", "--paired", "--runs", "2", "--connections", str(TINY_CONNECTIONS),
         "--quiet-wait", "0", "--timeout", "20"],
        capture_output=True, text=True, timeout=100, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    runs = [line for line in lines if line.get("paired")]
    assert sorted(r["server"] for r in runs) == ["chatd", "chatd", "reference", "reference"]
    assert all(r["connected"] == TINY_CONNECTIONS and r["cpu_ms_per_connection"] > 0 for r in runs), runs
    ratios = [line["paired_ratio"] for line in lines if "paired_ratio" in line]
    assert len(ratios) == 2 and all(ratio > 0 for ratio in ratios)


def test_inprocess_cost_of_a_connection_runs_on_this_tree():
    """
    bench/inprocess.py drives ticket requests and upgrades through chatd's
    listening factory (it checks each answer is 200, then 101) and reports
    positive microseconds for each, from this tree's chatd.
    """
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "inprocess.py"), "--connections", "20", "--rounds", "2"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["connections"] == 20 and result["chatd"] == os.path.join(ROOT, "chatd")
    assert result["ticket_us"]["rounds"] == result["upgrade_us"]["rounds"] == 2
    assert result["ticket_us"]["min"] > 0 and result["upgrade_us"]["min"] > 0
