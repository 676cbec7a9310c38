# -*- test-case-name: tests.test_conformance -*-
"""
The Python 2.7 side of the conformance run: wstest's pinned venv.

The Autobahn Testsuite's last release, autobahntestsuite 0.8.2, is Python 2
only and cannot live in chatd's Python 3 venv.  This module finds a Python
2.7.18 (pyenv, or C{WSTEST_PYTHON2}), installs the Debian packages the build
needs when they are missing, and builds (once; a stamp file holds the hash
of the pins and the recipe) a virtualenv from conformance/requirements-py2.txt.
conformance/run.py calls L{find_python2} and L{ensure_wstest_venv}, and
runs wstest with L{py2_env}.

Standard library only.
"""

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements-py2.txt"

PY2_VERSION = "2.7.18"
# Pure-Python, dependency-free virtualenv that still creates Python 2 envs and
# seeds them with pip 20.3.4 / setuptools 44.1.1 (the last for Python 2).
VIRTUALENV_PIN = "virtualenv==16.7.12"
# Anything that changes how the venv is built must change this.
BUILD_RECIPE = "v1 %s pip-install --no-deps --no-build-isolation" % VIRTUALENV_PIN
# Debian packages the build needs (wsaccel is compiled from its sdist).
BUILD_DEBS = ("gcc", "libc6-dev")

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
