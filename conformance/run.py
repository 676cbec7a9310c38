#!/usr/bin/env python3
"""Run the Autobahn Testsuite fuzzing client against chatd's /echo endpoint.

Why this exists: the Autobahn Testsuite (``wstest -m fuzzingclient``) is the
reference RFC 6455 / RFC 7692 conformance suite, but its last release,
autobahntestsuite 0.8.2, is Python 2 only and cannot live in chatd's Python 3
venv. This script:

1. builds (once) wstest's pinned Python 2.7 venv (conformance/wstest_venv.py);
2. starts a real chatd process (``twistd -n chatd``) over TLS on a free
   loopback port with a throwaway config, self-signed certificate and secret,
   through the test kit's L{tests.support.Chatd} (the same process handling
   as the test suite: free port, readiness, stop by PID);
3. runs ``wstest -m fuzzingclient`` against wss://127.0.0.1:PORT/echo with an
   overall timeout (cases 1.* to 10.* by default, every case with --full);
4. reads the report's index.json, prints counts per behaviour, lists the
   failing cases and exits 0 only if every case passed.

It runs in chatd's venv (it re-executes itself with that venv's Python when
started with another one), since the test kit needs chatd's dependencies.

Usage: python3 conformance/run.py [--full] [--keep-report DIR]
           [--set SECTION.KEY=VALUE ...] [--cases PATTERN ...] [--exclude PATTERN ...]
           [--timeout SECONDS] [--setup-only] [--verbose]

Exit status: 0 every case OK / NON-STRICT / INFORMATIONAL, 1 some case failed,
2 the run could not be set up or did not complete (message says why).
On SIGTERM, SIGINT or SIGHUP it stops wstest and chatd by PID and exits
128 + the signal number.
Environment: WSTEST_VENV (default <repo>/.venv-wstest), CHATD_VENV (default
<repo>/.venv), WSTEST_PYTHON2 (a Python 2.7 interpreter to use instead of
asking pyenv for 2.7.18).
"""

import argparse
import ast
import base64
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from wstest_venv import (
    NOISE, SetupError, ensure_wstest_venv, find_python2, info, py2_env, tail,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

AGENT = "chatd"
PASSING = ("OK", "NON-STRICT", "INFORMATIONAL")
DEFAULT_CASES = ["%d.*" % i for i in range(1, 11)]
FULL_CASES = ["*"]
DEFAULT_TIMEOUT = 10 * 60
FULL_TIMEOUT = 40 * 60
# Keys the runner owns: overriding them would break the wss URL it tests.
RESERVED_KEYS = {("server", "endpoint"), ("server", "tls")}
# The large-payload cases (9.*) echo messages of up to 16 MiB: the message
# limit and the slow-consumer cap (which must hold one such echo while the
# fuzzer is still sending) are raised for this run only.
SETTINGS = {
    "server__allowed_origins": "*",
    "limits__max_message_bytes": "16777216",
    "limits__max_send_buffer_bytes": "33554432",
    "conformance__echo": "on",
}


# ------------------------------------------------------------------ server

def parse_overrides(items):
    """C{--set SECTION.KEY=VALUE} items as L{tests.support.Chatd} overrides."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not section or not key:
            raise SetupError("--set wants SECTION.KEY=VALUE, got %r" % item)
        if (section, key) in RESERVED_KEYS:
            raise SetupError("--set %s.%s is not allowed: the runner owns it" % (section, key))
        out["%s__%s" % (section, key)] = value.strip()
    return out


def make_chatd(workdir, overrides):
    """The chatd to test: certificate, key and secret made, not started yet."""
    from tests import support

    try:
        secret = support.make_dev_files(str(workdir))
    except subprocess.CalledProcessError as e:
        raise SetupError("`python -m chatd devcert/devsecret %s` failed (exit %d):\n%s"
                         % (workdir, e.returncode, (e.stderr or b"").decode(errors="replace")))
    return support.Chatd(str(workdir), str(workdir), secret, name="chatd",
                         **dict(SETTINGS, **overrides))


def start_chatd(chatd):
    """Start C{chatd} and wait until it upgrades /echo, or L{SetupError}."""
    from tests import support

    info("starting chatd: %s -n chatd --config %s" % (support.TWISTD, chatd.config_path))
    try:
        chatd.start()
    except AssertionError as e:  # the kit's "exited" or "timed out" message
        raise SetupError("chatd did not start: %s\n%s" % (e, tail(chatd.log_path)))
    try:
        status = _probe_echo(chatd.port)
    except (OSError, ssl.SSLError) as e:
        raise SetupError("chatd is up but a WebSocket upgrade of /echo failed: %s\n%s"
                         % (e, tail(chatd.log_path)))
    if not _is_101(status):
        raise SetupError("chatd answered %r to a WebSocket upgrade of /echo (expected 101); "
                         "is [conformance] echo supported?\n%s" % (status, tail(chatd.log_path)))


def _is_101(status_line):
    return re.match(r"HTTP/1\.[01] 101\b", status_line) is not None


def _probe_echo(port):
    """One TLS connection + WebSocket upgrade of /echo. Returns the status line."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the server's certificate is a throwaway self-signed one
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as s:
            s.settimeout(5)
            key = base64.b64encode(os.urandom(16)).decode()
            s.sendall(("GET /echo HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
                       "Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                       "Sec-WebSocket-Version: 13\r\n\r\n" % (port, key)).encode())
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            status = data.split(b"\r\n", 1)[0].decode("latin-1")
            if _is_101(status):
                mask = os.urandom(4)
                body = struct.pack("!H", 1000)
                s.sendall(b"\x88\x82" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(body)))
                try:
                    s.recv(64)  # the server's close frame
                except (OSError, socket.timeout):
                    pass
            return status


def stop_process(proc, name):
    """SIGTERM by PID, then SIGKILL (the test kit's L{tests.support.stop_pid})."""
    from tests import support

    if proc is None or proc.poll() is not None:
        return
    status = support.stop_pid(proc)
    if status == -signal.SIGKILL:
        info("%s (pid %d) ignored SIGTERM: killed" % (name, proc.pid))


# ------------------------------------------------------------------ wstest

class WstestOutput(threading.Thread):
    """Copies wstest's output to a log file and tracks which case is running."""

    def __init__(self, proc, log_path, verbose):
        super().__init__(daemon=True)
        self.proc, self.log_path, self.verbose = proc, log_path, verbose
        self.cases = None  # the case ids wstest said it will run
        self.started = 0
        self.current = None
        self.connect_failures = []

    def run(self):
        with open(self.log_path, "w") as log:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                if self.verbose and not NOISE.search(line):
                    print("  wstest| " + line, flush=True)
                m = re.match(r"Cases = (\[.*\])\s*$", line)
                if m:
                    try:
                        self.cases = [str(c) for c in ast.literal_eval(m.group(1))]
                    except (ValueError, SyntaxError):
                        pass
                m = re.match(r"Running test case ID (\S+)", line)
                if m:
                    self.started += 1
                    self.current = m.group(1)
                if line.startswith("Connection to ") and " failed" in line:
                    self.connect_failures.append(line)


def run_wstest(wstest, spec_path, workdir, timeout, server, verbose):
    cmd = [str(wstest), "-m", "fuzzingclient", "-s", str(spec_path)]
    info("running: %s (timeout %d s)" % (" ".join(cmd), timeout))
    started = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=str(workdir),
                                env=py2_env(PYTHONUNBUFFERED="1"), start_new_session=True)
    except OSError as e:
        raise SetupError("cannot start wstest: %s" % e)
    info("wstest pid %d" % proc.pid)
    out = WstestOutput(proc, workdir / "wstest.log", verbose)
    out.start()
    server_died = None
    last_report = started
    try:
        while True:
            try:
                proc.wait(0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now - started > timeout:
                raise SetupError("wstest timed out after %d s (%d cases started, last %s); log:\n%s"
                                 % (timeout, out.started, out.current, tail(workdir / "wstest.log")))
            if server_died is None and server.poll() is not None:
                server_died = server.returncode
                info("chatd exited with status %s during case %s" % (server_died, out.current))
            if not verbose and now - last_report >= 30:
                last_report = now
                total = len(out.cases) if out.cases is not None else "?"
                info("%d/%s cases started, now %s (%.0f s)"
                     % (out.started, total, out.current, now - started))
    finally:
        stop_process(proc, "wstest")
        out.join(10)
    elapsed = time.monotonic() - started
    info("wstest finished in %.1f s with exit status %d" % (elapsed, proc.returncode))
    for line in out.connect_failures:
        info("wstest: " + line)
    if server_died is None and server.poll() is not None:
        server_died = server.returncode
    return out, elapsed, server_died



# ------------------------------------------------------------------ report

def _case_key(case_id):
    return tuple(int(p) if p.isdigit() else p for p in case_id.split("."))


def summarize(report_dir, expected, kept):
    """Print the result; return (passed, failed)."""
    index = report_dir / "index.json"
    try:
        with open(index) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise SetupError("cannot read the wstest report %s: %s" % (index, e))
    results = data.get(AGENT)
    if results is None:
        raise SetupError("%s has no results for agent %r (agents: %s)"
                         % (index, AGENT, ", ".join(data) or "none"))

    behaviour, close_behaviour = {}, {}
    failed = []
    for case_id in sorted(results, key=_case_key):
        r = results[case_id]
        b, bc = r.get("behavior", "?"), r.get("behaviorClose", "?")
        behaviour[b] = behaviour.get(b, 0) + 1
        close_behaviour[bc] = close_behaviour.get(bc, 0) + 1
        if b not in PASSING or bc not in PASSING:
            failed.append((case_id, b, bc, r.get("remoteCloseCode"), r.get("reportfile")))
    missing = sorted(set(expected or ()) - set(results), key=_case_key)

    def fmt(counts):
        order = list(PASSING) + sorted(set(counts) - set(PASSING))
        return ", ".join("%s=%d" % (k, counts[k]) for k in order if k in counts) or "none"

    info("report: %s, %d cases%s" % (index, len(results),
                                     "" if kept else " (temporary: --keep-report DIR keeps it)"))
    info("behavior:      " + fmt(behaviour))
    info("behaviorClose: " + fmt(close_behaviour))
    if failed:
        info("failed cases (behavior / behaviorClose / remote close code / report file):")
        for case_id, b, bc, code, rf in failed:
            print("    %-10s %-14s %-16s %-6s %s" % (case_id, b, bc, code, rf or ""), flush=True)
    if missing:
        info("%d cases have no result (wstest stopped early?): %s"
             % (len(missing), " ".join(missing[:50]) + (" ..." if len(missing) > 50 else "")))
    return len(results) - len(failed), len(failed) + len(missing)


def prepare_report_dir(path):
    path = Path(path).resolve()
    if path.exists():
        entries = list(path.iterdir())
        if entries and not (path / "index.json").exists():
            raise SetupError("--keep-report %s is not empty and holds no earlier report" % path)
        for entry in entries:  # an earlier report: wstest's files are flat
            if entry.is_file() or entry.is_symlink():
                entry.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


# -------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true",
                   help="run every case (adds 12.*/13.* permessage-deflate; sets "
                        "websocket.compression=on)")
    p.add_argument("--keep-report", metavar="DIR",
                   help="write the wstest report (and chatd/wstest logs) to DIR and keep it")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE", help="extra chatd ini setting (repeatable)")
    p.add_argument("--cases", action="append", metavar="PATTERN",
                   help="case ids/patterns to run instead of the default (repeatable, e.g. 9.*)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="case ids/patterns to leave out (repeatable)")
    p.add_argument("--timeout", type=int, metavar="SECONDS",
                   help="overall wstest timeout (default %d, %d with --full)"
                        % (DEFAULT_TIMEOUT, FULL_TIMEOUT))
    p.add_argument("--setup-only", action="store_true",
                   help="only build (or check) the wstest venv, then exit")
    p.add_argument("--verbose", action="store_true", help="echo wstest's output")
    return p.parse_args(argv)


class Interrupted(Exception):
    pass


def _on_signal(signum, frame):
    raise Interrupted(signum)


def _in_venv(venv):
    """Re-execute this script with C{venv}'s Python unless already running in it."""
    python = venv / "bin" / "python"
    if Path(sys.prefix).resolve() == venv.resolve():
        return
    if not python.exists():
        raise SetupError("chatd's venv is missing (%s); create it first (`make venv` builds "
                         "<repo>/.venv) or set CHATD_VENV" % python)
    os.execv(str(python), [str(python), str(Path(__file__).resolve())] + sys.argv[1:])


def main(argv=None):
    args = parse_args(argv)
    wstest_venv = Path(os.environ.get("WSTEST_VENV") or REPO / ".venv-wstest").absolute()
    chatd_venv = Path(os.environ.get("CHATD_VENV") or REPO / ".venv").absolute()
    cases = args.cases or (FULL_CASES if args.full else DEFAULT_CASES)
    timeout = args.timeout or (FULL_TIMEOUT if args.full else DEFAULT_TIMEOUT)

    chatd = None
    workdir = None
    try:
        if not args.setup_only and argv is None:
            _in_venv(chatd_venv)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, _on_signal)
        overrides = parse_overrides((["websocket.compression=on"] if args.full else [])
                                    + args.overrides)
        python2, py2_version = find_python2()
        wstest = ensure_wstest_venv(wstest_venv, python2, py2_version)
        if args.setup_only:
            return 0

        workdir = Path(tempfile.mkdtemp(prefix="chatd-conformance-"))
        report_dir = (prepare_report_dir(args.keep_report) if args.keep_report
                      else workdir / "report")
        ready_from = time.monotonic()
        chatd = make_chatd(workdir, overrides)
        start_chatd(chatd)
        info("chatd (pid %d) is serving wss://127.0.0.1:%d/echo after %.1f s"
             % (chatd.proc.pid, chatd.port, time.monotonic() - ready_from))
        spec = {
            "outdir": str(report_dir),
            "servers": [{"agent": AGENT, "url": "wss://127.0.0.1:%d/echo" % chatd.port}],
            "cases": cases,
            "exclude-cases": args.exclude,
            "exclude-agent-cases": {},
        }
        spec_path = workdir / "fuzzingclient.json"
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")

        out, _, server_died = run_wstest(wstest, spec_path, workdir, timeout, chatd.proc,
                                         args.verbose)
        chatd.stop()
        if args.keep_report:
            for name in ("chatd.log", "wstest.log", "chatd.ini", "fuzzingclient.json"):
                if (workdir / name).exists():
                    shutil.copy(str(workdir / name), str(report_dir / name))
        if out.cases is None:
            raise SetupError("wstest did not start its run; log:\n%s" % tail(workdir / "wstest.log"))
        passed, failed = summarize(report_dir, out.cases, bool(args.keep_report))
        if server_died is not None:
            info("chatd exited during the run with status %s" % server_died)
            failed = max(failed, 1)
        if failed:
            info("chatd log (last lines):\n%s" % tail(workdir / "chatd.log", 20))
        if args.keep_report:
            info("report kept in %s (open index.html)" % report_dir)
        print("conformance: %d passed, %d failed" % (passed, failed), flush=True)
        return 0 if failed == 0 else 1
    except SetupError as e:
        print("conformance: ERROR %s" % e, file=sys.stderr, flush=True)
        return 2
    except Interrupted as e:
        print("conformance: ERROR interrupted by signal %d; stopping chatd and wstest" % e.args[0],
              file=sys.stderr, flush=True)
        return 128 + e.args[0]
    finally:
        if chatd is not None:
            chatd.stop()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # tests.support, the test kit
    sys.exit(main())
