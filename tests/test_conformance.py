# -*- test-case-name: tests.test_conformance -*-
"""
RFC 6455 conformance: the Autobahn Testsuite's fuzzingclient, cases 1-10,
against a real chatd's /echo over wss (conformance/run.py does the work and
builds wstest's Python 2 venv on first use).  The full suite, with the
permessage-deflate cases, is `make conformance-full`.

The runner is one process with two children (chatd, wstest).  A test that
is stopped early (its own timeout, Ctrl-C) sends the runner SIGTERM and
waits: the runner stops both children by PID before it exits.  Killing the
runner outright would leave them orphaned.
"""

import os
import re
import signal
import subprocess
import sys

import pytest

from tests import support

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "conformance", "run.py")
WSTEST_TIMEOUT = 600  # run.py's own limit on the wstest run
SETUP_ALLOWANCE = 240  # building the wstest venv on a first run, starting chatd
RUNNER_STOP_TIMEOUT = 40  # the runner stops wstest, then chatd (10 s SIGTERM grace each)


class Runner:
    """conformance/run.py as a child process, output in a file."""

    def __init__(self, tmp_path, *args):
        self.output_path = tmp_path / "conformance.out"
        with open(self.output_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, RUNNER, *args], cwd=ROOT, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    def output(self):
        return self.output_path.read_text(errors="replace")

    def stop(self):
        """SIGTERM (the runner then stops its children), SIGKILL only as a last resort."""
        return support.stop_pid(self.proc, RUNNER_STOP_TIMEOUT)


@pytest.fixture
def runner(tmp_path):
    """C{runner(*args)} starts conformance/run.py; each is stopped at teardown."""
    started = []

    def start(*args):
        started.append(Runner(tmp_path, *args))
        return started[-1]

    yield start
    for each in started:
        each.stop()


@pytest.mark.timeout(WSTEST_TIMEOUT + SETUP_ALLOWANCE + RUNNER_STOP_TIMEOUT)
def test_autobahn_testsuite_cases_1_to_10(runner):
    """Every case OK, NON-STRICT or INFORMATIONAL; none FAILED or UNIMPLEMENTED."""
    run = runner("--timeout", str(WSTEST_TIMEOUT))
    run.proc.wait(WSTEST_TIMEOUT + SETUP_ALLOWANCE)
    output = run.output()
    summary = re.search(r"^conformance: (\d+) passed, (\d+) failed$", output, re.MULTILINE)
    assert run.proc.returncode == 0 and summary, output[-4000:]
    passed, failed = int(summary.group(1)), int(summary.group(2))
    assert failed == 0 and passed >= 290, output[-4000:]


@pytest.mark.timeout(SETUP_ALLOWANCE + 2 * RUNNER_STOP_TIMEOUT)
def test_stopped_runner_stops_chatd_and_wstest(runner):
    """
    SIGTERM in the middle of a run (what this module's teardown sends when a
    test is stopped early): the runner exits 128+15 and neither chatd nor
    wstest outlives it.
    """
    run = runner("--cases", "9.*", "--timeout", "300")

    def pids():
        found = dict(re.findall(r"(chatd|wstest) \(?pid (\d+)", run.output()))
        if run.proc.poll() is not None:
            raise AssertionError("the runner exited early:\n" + run.output()[-4000:])
        return found if len(found) == 2 else None

    found = support.wait_for(pids, SETUP_ALLOWANCE, "the runner to start chatd and wstest", 0.2)
    chatd, wstest = int(found["chatd"]), int(found["wstest"])
    assert support.alive(chatd) and support.alive(wstest)
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(RUNNER_STOP_TIMEOUT) == 128 + signal.SIGTERM, run.output()[-4000:]
    # The runner waited for both before exiting: no grace period needed here.
    assert not support.alive(chatd) and not support.alive(wstest), run.output()[-4000:]
    assert "interrupted by signal 15" in run.output()
