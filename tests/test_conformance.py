"""
RFC 6455 conformance: the Autobahn Testsuite's fuzzingclient, cases 1-10,
against a real chatd's /echo over wss (conformance/run.py does the work and
builds wstest's Python 2 venv on first use).  The full suite, with the
permessage-deflate cases, is `make conformance-full`.
"""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_autobahn_testsuite_cases_1_to_10():
    """Every case OK, NON-STRICT or INFORMATIONAL; none FAILED or UNIMPLEMENTED."""
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "conformance", "run.py"), "--timeout", "600"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
    )
    output = result.stdout + result.stderr
    summary = re.search(r"^conformance: (\d+) passed, (\d+) failed$", output, re.MULTILINE)
    assert result.returncode == 0 and summary, output[-4000:]
    passed, failed = int(summary.group(1)), int(summary.group(2))
    assert failed == 0 and passed >= 290, output[-4000:]
