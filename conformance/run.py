#!/usr/bin/env python3
"""Run the Autobahn Testsuite fuzzing client against chatd's /echo endpoint.

Why this exists: the Autobahn Testsuite (``wstest -m fuzzingclient``) is the
reference RFC 6455 / RFC 7692 conformance suite, but its last release,
autobahntestsuite 0.8.2, is Python 2 only and cannot live in chatd's Python 3
venv. This script, using only the Python 3 standard library:

1. builds (once; a stamp file holds the requirements hash) a pinned Python 2.7
   venv for wstest from pyenv's 2.7.18 (conformance/requirements-py2.txt);
2. starts a real chatd process (``twistd -n chatd``) over TLS on a free
   loopback port with a throwaway config, self-signed certificate and secret;
3. runs ``wstest -m fuzzingclient`` against wss://127.0.0.1:PORT/echo with an
   overall timeout (cases 1.* to 10.* by default, every case with --full);
4. reads the report's index.json, prints counts per behaviour, lists the
   failing cases and exits 0 only if every case passed.

Usage: python3 conformance/run.py [--full] [--keep-report DIR]
           [--set SECTION.KEY=VALUE ...] [--cases PATTERN ...] [--exclude PATTERN ...]
           [--timeout SECONDS] [--setup-only] [--verbose]

Exit status: 0 every case OK / NON-STRICT / INFORMATIONAL, 1 some case failed,
2 the run could not be set up or did not complete (message says why).
Environment: WSTEST_VENV (default <repo>/.venv-wstest), CHATD_VENV (default
<repo>/.venv), WSTEST_PYTHON2 (a Python 2.7 interpreter to use instead of
asking pyenv for 2.7.18).
"""

import argparse
import ast
import base64
import configparser
import fcntl
import hashlib
import json
import os
import re
import secrets
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
REQUIREMENTS = HERE / "requirements-py2.txt"

PY2_VERSION = "2.7.18"
# Pure-Python, dependency-free virtualenv that still creates Python 2 envs and
# seeds them with pip 20.3.4 / setuptools 44.1.1 (the last for Python 2).
VIRTUALENV_PIN = "virtualenv==16.7.12"
# Anything that changes how the venv is built must change this.
BUILD_RECIPE = "v1 %s pip-install --no-deps --no-build-isolation" % VIRTUALENV_PIN
# Debian packages the build needs (wsaccel is compiled from its sdist).
BUILD_DEBS = ("gcc", "libc6-dev")

AGENT = "chatd"
PASSING = ("OK", "NON-STRICT", "INFORMATIONAL")
DEFAULT_CASES = ["%d.*" % i for i in range(1, 11)]
FULL_CASES = ["*"]
DEFAULT_TIMEOUT = 10 * 60
FULL_TIMEOUT = 40 * 60
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# Keys the runner owns: overriding them would break the wss URL it tests.
RESERVED_KEYS = {("server", "endpoint"), ("server", "tls")}

# pip.conf on some machines points at local indexes that do not exist; pip
# warns once per package. Keep those lines out of error excerpts.
NOISE = re.compile(r"is ignored: it is neither a file nor a directory"
                   r"|^DEPRECATION: Python 2\.7|CryptographyDeprecationWarning"
                   r"|from cryptography import utils, x509")


class SetupError(Exception):
    """The run could not be set up or did not complete (exit status 2)."""


def info(msg):
    print("[conformance] %s" % msg, flush=True)


def tail(path, lines=30):
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    text = [line for line in text if not NOISE.search(line)]
    return "\n".join("    | " + line for line in text[-lines:]) or "    | (empty)"


def py2_env(**extra):
    """Environment for Python 2 processes: no Python 3 paths leaking in."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV",
                        "PIP_REQUIRE_VIRTUALENV", "PIP_USER")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_PYTHON_VERSION_WARNING="1",
               PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


# --------------------------------------------------------------- Python 2.7

def _py2_version(python):
    try:
        r = subprocess.run([python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                           capture_output=True, text=True, timeout=30, env=py2_env())
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SetupError("cannot run %s: %s" % (python, e))
    if r.returncode != 0:
        raise SetupError("%s does not run: %s" % (python, r.stderr.strip()))
    return r.stdout.strip()


def find_python2():
    """Return the Python 2.7 interpreter wstest's venv is built from."""
    explicit = os.environ.get("WSTEST_PYTHON2")
    if explicit:
        version = _py2_version(explicit)
        if not version.startswith("2.7."):
            raise SetupError("WSTEST_PYTHON2=%s is Python %s, not 2.7" % (explicit, version))
        return explicit, version

    candidates = [shutil.which("pyenv")]
    if os.environ.get("PYENV_ROOT"):
        candidates.append(os.path.join(os.environ["PYENV_ROOT"], "bin", "pyenv"))
    candidates.append(os.path.expanduser("~/.pyenv/bin/pyenv"))
    pyenv = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if not pyenv:
        raise SetupError(
            "pyenv is missing: not on PATH, not in $PYENV_ROOT/bin, not in ~/.pyenv/bin. "
            "wstest (autobahntestsuite 0.8.2) is Python 2 only and needs Python %s: install "
            "pyenv and run `pyenv install %s`, or set WSTEST_PYTHON2 to a Python 2.7 "
            "interpreter." % (PY2_VERSION, PY2_VERSION))
    env = dict(os.environ, PYENV_VERSION=PY2_VERSION)
    try:
        r = subprocess.run([pyenv, "which", "python"], capture_output=True, text=True,
                           timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SetupError("`%s which python` failed: %s" % (pyenv, e))
    python = r.stdout.strip()
    if r.returncode != 0 or not python:
        raise SetupError(
            "Python %s is missing from pyenv (%s: `PYENV_VERSION=%s pyenv which python` said: %s). "
            "wstest (autobahntestsuite 0.8.2) is Python 2 only: run `pyenv install %s`, or set "
            "WSTEST_PYTHON2 to a Python 2.7 interpreter."
            % (PY2_VERSION, pyenv, PY2_VERSION, (r.stderr or r.stdout).strip() or "nothing",
               PY2_VERSION))
    version = _py2_version(python)
    if version != PY2_VERSION:
        raise SetupError("pyenv gave %s, which is Python %s, not %s" % (python, version, PY2_VERSION))
    return python, version


# ------------------------------------------------------------- Debian bits

_apt_updated = False


def _deb_installed(pkg):
    try:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None  # no dpkg: cannot tell
    return r.returncode == 0 and "install ok installed" in r.stdout


def ensure_debs(pkgs):
    """apt-get install the Debian packages that are missing (update once first)."""
    global _apt_updated
    state = {p: _deb_installed(p) for p in pkgs}
    if any(v is None for v in state.values()):
        if shutil.which("gcc") or shutil.which("cc"):
            return
        raise SetupError("no C compiler (gcc) and no dpkg to install one; wsaccel must be "
                         "compiled: install gcc")
    missing = [p for p, ok in state.items() if not ok]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SetupError("Debian packages needed to build the wstest venv are missing: %s "
                         "(run `apt-get install %s` as root)" % (" ".join(missing), " ".join(missing)))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    info("installing Debian packages: %s" % " ".join(missing))
    try:
        if not _apt_updated:
            subprocess.run(["apt-get", "update"], check=True, timeout=600, env=env,
                           stdout=subprocess.DEVNULL)
            _apt_updated = True
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends"] + missing,
                       check=True, timeout=900, env=env, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError) as e:
        raise SetupError("apt-get install %s failed: %s" % (" ".join(missing), e))


# ------------------------------------------------------------- wstest venv

def _venv_key(py2_version):
    h = hashlib.sha256()
    h.update(REQUIREMENTS.read_bytes())
    h.update(("\n%s\n%s\n" % (BUILD_RECIPE, py2_version)).encode())
    return h.hexdigest()


def _step(cmd, log, timeout, what, env=None, cwd=None):
    with open(log, "ab") as f:
        f.write(("\n$ %s\n" % " ".join(str(c) for c in cmd)).encode())
        f.flush()
        try:
            r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, timeout=timeout, env=env or py2_env(),
                               cwd=cwd)
        except subprocess.TimeoutExpired:
            raise SetupError("%s timed out after %d s; log %s:\n%s" % (what, timeout, log, tail(log)))
        except OSError as e:
            raise SetupError("%s: cannot run %s: %s" % (what, cmd[0], e))
    if r.returncode != 0:
        raise SetupError("%s failed (exit %d); log %s:\n%s" % (what, r.returncode, log, tail(log)))


def _looks_like_our_venv(venv):
    return (venv / ".conformance-stamp").exists() or (venv / "bin" / "python").exists() \
        or (venv / ".build.log").exists()


def ensure_wstest_venv(venv, python2, py2_version):
    """Create the pinned wstest venv unless the stamp says it is up to date."""
    key = _venv_key(py2_version)
    stamp = venv / ".conformance-stamp"
    wstest = venv / "bin" / "wstest"
    with open(REQUIREMENTS, "rb") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)  # two runners must not build at once
        if stamp.exists() and stamp.read_text().strip() == key and wstest.exists():
            info("wstest venv up to date: %s" % venv)
            return wstest
        if venv.exists():
            if any(venv.iterdir()) and not _looks_like_our_venv(venv):
                raise SetupError("%s exists but is not a wstest venv; remove it or set WSTEST_VENV"
                                 % venv)
            info("rebuilding stale wstest venv %s" % venv)
            shutil.rmtree(venv)
        ensure_debs(BUILD_DEBS)
        info("building wstest venv %s from %s (Python %s); takes ~30 s"
             % (venv, python2, py2_version))
        started = time.monotonic()
        venv.mkdir(parents=True)
        log = venv / ".build.log"
        boot = Path(tempfile.mkdtemp(prefix="wstest-bootstrap-"))
        try:
            _step([python2, "-m", "pip", "install", "--no-deps", "--target", boot, VIRTUALENV_PIN],
                  log, 600, "installing %s for Python 2" % VIRTUALENV_PIN)
            _step([python2, "-m", "virtualenv", "--no-download", venv], log, 300,
                  "creating the Python 2 virtualenv", env=py2_env(PYTHONPATH=str(boot)), cwd=boot)
        finally:
            shutil.rmtree(boot, ignore_errors=True)
        vpy = venv / "bin" / "python"
        _step([vpy, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
               "-r", REQUIREMENTS], log, 1800, "pip install -r %s" % REQUIREMENTS.name)
        _step([vpy, "-m", "pip", "check"], log, 120,
              "pip check (requirements-py2.txt is incomplete)")
        _step([vpy, "-c", "import autobahntestsuite.wstest, wsaccel.xormask, "
               "wsaccel.utf8validator, OpenSSL.SSL"], log, 120, "import check")
        if not wstest.exists():
            raise SetupError("%s was not installed" % wstest)
        stamp.write_text(key + "\n")
        info("wstest venv built in %.0f s" % (time.monotonic() - started))
    return wstest


# ------------------------------------------------------------------ server

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_overrides(items):
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not section or not key:
            raise SetupError("--set wants SECTION.KEY=VALUE, got %r" % item)
        if (section, key) in RESERVED_KEYS:
            raise SetupError("--set %s.%s is not allowed: the runner owns it" % (section, key))
        out.append((section, key, value.strip()))
    return out


def write_config(workdir, port, overrides):
    cp = configparser.ConfigParser(interpolation=None)
    cp.read_dict({
        "server": {"endpoint": "tcp:%d:interface=127.0.0.1" % port, "tls": "on",
                   "allowed_origins": "*"},
        "tls": {"certificate": str(workdir / "fullchain.pem"),
                "private_key": str(workdir / "privkey.pem")},
        "auth": {"algorithms": "HS256", "secret_file": str(workdir / "jwt.secret")},
        # The large-payload cases (9.*) echo messages of up to 16 MiB: the
        # message limit and the slow-consumer cap (which must hold one such
        # echo while the fuzzer is still sending) are raised for this run only.
        "limits": {"max_message_bytes": "16777216", "max_send_buffer_bytes": "33554432"},
        "conformance": {"echo": "on"},
    })
    for section, key, value in overrides:
        if not cp.has_section(section):
            cp.add_section(section)
        cp.set(section, key, value)
    path = workdir / "chatd.ini"
    with open(path, "w") as f:
        cp.write(f)
    return path


def prepare_server_files(chatd_python, workdir):
    log = workdir / "devcert.log"
    with open(log, "wb") as f:
        try:
            r = subprocess.run([str(chatd_python), "-m", "chatd", "devcert", str(workdir)],
                               stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               timeout=120, cwd=str(workdir))
        except subprocess.TimeoutExpired:
            raise SetupError("`python -m chatd devcert` timed out:\n%s" % tail(log))
    for name in ("fullchain.pem", "privkey.pem"):
        if r.returncode != 0 or not (workdir / name).exists():
            raise SetupError("`%s -m chatd devcert %s` failed (exit %d, %s missing?):\n%s"
                             % (chatd_python, workdir, r.returncode, name, tail(log)))
    secret = workdir / "jwt.secret"
    fd = os.open(str(secret), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")  # 64 characters


def start_server(twistd, config, workdir):
    cmd = [str(twistd), "-n", "--pidfile=", "chatd", "--config", str(config)]
    info("starting chatd: %s" % " ".join(cmd))
    log = open(workdir / "chatd.log", "wb")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=str(workdir),
                                start_new_session=True)
    except OSError as e:
        raise SetupError("cannot start chatd: %s" % e)
    finally:
        log.close()


def _is_101(status_line):
    return re.match(r"HTTP/1\.[01] 101\b", status_line) is not None


def _probe_echo(port):
    """One TLS connection + WebSocket upgrade of /echo. Returns the status line."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the server's certificate is a throwaway self-signed one
    with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
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


def wait_ready(proc, port, workdir, deadline_s=READY_TIMEOUT):
    """Poll (bounded) until chatd completes a TLS + WebSocket handshake on /echo."""
    deadline = time.monotonic() + deadline_s
    last = "no attempt"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SetupError("chatd exited with status %s before accepting connections; log:\n%s"
                             % (proc.returncode, tail(workdir / "chatd.log")))
        try:
            status = _probe_echo(port)
        except (OSError, ssl.SSLError, socket.timeout) as e:
            last = "%s: %s" % (type(e).__name__, e)
            time.sleep(0.2)
            continue
        if _is_101(status):
            return
        if status:
            raise SetupError("chatd accepts TLS on 127.0.0.1:%d but answered %r to a WebSocket "
                             "upgrade of /echo (expected 101); is [conformance] echo supported?\n%s"
                             % (port, status, tail(workdir / "chatd.log")))
        last = "connection closed without an HTTP response"
        time.sleep(0.2)
    raise SetupError("chatd did not complete a TLS + WebSocket handshake on 127.0.0.1:%d within "
                     "%.0f s (last error: %s); log:\n%s"
                     % (port, deadline_s, last, tail(workdir / "chatd.log")))


def stop_process(proc, name, timeout=STOP_TIMEOUT):
    """SIGTERM by PID, then SIGKILL after the timeout."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
        return
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        info("%s (pid %d) ignored SIGTERM for %.0f s: SIGKILL" % (name, proc.pid, timeout))
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass


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


def main(argv=None):
    args = parse_args(argv)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    wstest_venv = Path(os.environ.get("WSTEST_VENV") or REPO / ".venv-wstest").absolute()
    chatd_venv = Path(os.environ.get("CHATD_VENV") or REPO / ".venv").absolute()
    cases = args.cases or (FULL_CASES if args.full else DEFAULT_CASES)
    timeout = args.timeout or (FULL_TIMEOUT if args.full else DEFAULT_TIMEOUT)

    server = None
    workdir = None
    try:
        overrides = parse_overrides((["websocket.compression=on"] if args.full else [])
                                    + args.overrides)
        python2, py2_version = find_python2()
        twistd, chatd_python = chatd_venv / "bin" / "twistd", chatd_venv / "bin" / "python"
        if not args.setup_only and not (twistd.exists() and chatd_python.exists()):
            raise SetupError("chatd's venv is missing (%s and %s); create it first (the Makefile "
                             "builds <repo>/.venv) or set CHATD_VENV" % (twistd, chatd_python))
        wstest = ensure_wstest_venv(wstest_venv, python2, py2_version)
        if args.setup_only:
            return 0

        workdir = Path(tempfile.mkdtemp(prefix="chatd-conformance-"))
        report_dir = (prepare_report_dir(args.keep_report) if args.keep_report
                      else workdir / "report")
        prepare_server_files(chatd_python, workdir)
        port = free_port()
        config = write_config(workdir, port, overrides)
        spec = {
            "outdir": str(report_dir),
            "servers": [{"agent": AGENT, "url": "wss://127.0.0.1:%d/echo" % port}],
            "cases": cases,
            "exclude-cases": args.exclude,
            "exclude-agent-cases": {},
        }
        spec_path = workdir / "fuzzingclient.json"
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")

        server = start_server(twistd, config, workdir)
        ready_from = time.monotonic()
        wait_ready(server, port, workdir)
        info("chatd (pid %d) is serving wss://127.0.0.1:%d/echo after %.1f s"
             % (server.pid, port, time.monotonic() - ready_from))

        out, _, server_died = run_wstest(wstest, spec_path, workdir, timeout, server,
                                         args.verbose)
        stop_process(server, "chatd")
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
        stop_process(server, "chatd")
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
