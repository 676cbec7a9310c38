# -*- test-case-name: tests.test_support -*-
"""
The test kit itself: a test stopped by its timeout still stops the
processes it started (pytest.ini's signal method raises inside the test,
so fixtures tear down; the thread method would exit at once and orphan
them), and the logged-failure observer fails a test that logs an error.
"""

import os
import subprocess
import sys
import textwrap

from tests import support

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_TIMEOUT = 90

INNER_TEST = '''
import time

import pytest
from twisted.logger import Logger


@pytest.mark.timeout(3, func_only=True)  # the chatd fixture may take longer
def test_stuck(chatd):
    """Starts a real chatd, records its PID, then hangs past its timeout."""
    with open({pid_file!r}, "w") as f:
        f.write(str(chatd.proc.pid))
    time.sleep(60)


def test_logs_an_error():
    """Logs an error and asserts nothing: the observer must fail it."""
    Logger().error("something broke")
'''


def test_timed_out_test_stops_its_processes(tmp_path):
    """
    In a pytest run with this suite's pytest.ini and fixtures: a test past its
    pytest-timeout fails and the chatd it started is stopped by PID; a test
    that logs an error fails at teardown.
    """
    inner = tmp_path / "inner"
    inner.mkdir()
    pid_file = tmp_path / "chatd.pid"
    (inner / "conftest.py").write_text("from tests.conftest import *  # noqa: F401,F403\n")
    (inner / "test_inner.py").write_text(textwrap.dedent(INNER_TEST.format(pid_file=str(pid_file))))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", os.path.join(ROOT, "pytest.ini"),
         "--rootdir", str(inner), "-p", "no:randomly", "-q", str(inner)],
        cwd=str(inner), capture_output=True, text=True, timeout=RUN_TIMEOUT,
        env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.DEVNULL,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "FAILED test_inner.py::test_stuck - Failed: Timeout" in output, output
    assert "ERROR test_inner.py::test_logs_an_error" in output and "something broke" in output, output
    pid = int(pid_file.read_text())
    assert not support.alive(pid), f"chatd {pid} outlived its test:\n{output}"
