# -*- test-case-name: tests.test_reload -*-
"""
chatd.reload in process: a SIGHUP (a real signal to this process) swaps
the TLS options and the JWT key; broken files are refused with one line
naming the file, and the old material stays; a drain ignores it.
"""

import os
import shutil
import signal

import pytest
from cryptography.hazmat.primitives import hashes
from twisted.logger import LogLevel, capturedLogs

from chatd import auth, config, reload, tls
from chatd.auth import InvalidToken
from chatd.metrics import Metrics
from tests.support import make_dev_files, mint_token, write_config


@pytest.fixture
def setup(tmp_path, dev_dir):
    """Live copies of the dev files, a config naming them, and the reloader's parts."""
    live = tmp_path / "live"
    live.mkdir()
    for name in ("fullchain.pem", "privkey.pem", "jwt.secret"):
        shutil.copy(os.path.join(dev_dir[0], name), live / name)
    write_config(tmp_path / "chatd.ini", {
        "server": {"endpoint": "tcp:0", "allowed_origins": "*"},
        "tls": {"certificate": live / "fullchain.pem", "private_key": live / "privkey.pem"},
        "auth": {"secret_file": live / "jwt.secret"},
    })
    settings = config.load(str(tmp_path / "chatd.ini"))
    server_tls = reload.ReloadableServerTLS(tls.certificate_options(settings))
    verifier = auth.TokenVerifier.from_settings(settings)
    metrics = Metrics()
    state = {"draining": False}
    reloader = reload.Reloader(settings, verifier, server_tls, metrics=metrics,
                               draining=lambda: state["draining"])
    new = tmp_path / "new"
    new_secret = make_dev_files(str(new))
    return dict(live=live, new=new, new_secret=new_secret, old_secret=dev_dir[1],
                server_tls=server_tls, verifier=verifier, metrics=metrics, state=state,
                reloader=reloader)


def fingerprint(options):
    return options.certificate.fingerprint(hashes.SHA256())


def install(setup, *names):
    for name in names:
        shutil.copy(setup["new"] / name, setup["live"] / name)


def test_good_files_are_swapped_in(setup):
    """New certificate and key, new secret: new handshakes and tokens use them."""
    before = fingerprint(setup["server_tls"].options)
    install(setup, "fullchain.pem", "privkey.pem", "jwt.secret")
    assert setup["reloader"].reload() == {"tls": True, "jwt": True}
    assert fingerprint(setup["server_tls"].options) != before
    assert setup["metrics"].certificate_expiry is not None
    verifier = setup["verifier"]
    assert verifier.verify(mint_token(setup["new_secret"], "alice")).sub == "alice"
    with pytest.raises(InvalidToken):
        verifier.verify(mint_token(setup["old_secret"], "alice"))


def test_connection_from_the_current_options(setup):
    """serverConnectionForTLS builds each new connection from the current context."""
    server_tls = setup["server_tls"]
    first = server_tls.serverConnectionForTLS(None).get_context()
    install(setup, "fullchain.pem", "privkey.pem")
    setup["reloader"].reload()
    second = server_tls.serverConnectionForTLS(None).get_context()
    assert first is not second and second is server_tls.options.getContext()


@pytest.mark.parametrize("breakage, file_key, reason", [
    ("mismatch", "privkey.pem", "does not match the certificate"),
    ("garbage", "fullchain.pem", "no PEM certificate"),
    ("missing", "privkey.pem", "No such file"),
])
def test_broken_tls_files_keep_the_old_certificate(setup, breakage, file_key, reason, logged_failures):
    """A broken certificate or key: one error line naming file and reason; old options stay."""
    logged_failures.expect("reload refused")
    before = setup["server_tls"].options
    target = setup["live"] / file_key
    if breakage == "mismatch":
        shutil.copy(setup["new"] / "privkey.pem", target)
    elif breakage == "garbage":
        target.write_text("not a certificate\n")
    else:
        target.unlink()
    with capturedLogs() as events:
        outcome = setup["reloader"].reload()
    assert outcome == {"tls": False, "jwt": True}
    assert setup["server_tls"].options is before
    errors = [e for e in events if e["log_level"] == LogLevel.error]
    assert len(errors) == 1
    assert errors[0]["file"] == str(target) and reason in errors[0]["reason"]


def test_short_secret_keeps_the_old_key(setup, logged_failures):
    """A secret under 32 bytes is refused; tokens with the old secret still pass."""
    logged_failures.expect("reload refused")
    (setup["live"] / "jwt.secret").write_text("short\n")
    with capturedLogs() as events:
        assert setup["reloader"].reload() == {"tls": True, "jwt": False}
    (error,) = [e for e in events if e["log_level"] == LogLevel.error]
    assert error["file"] == str(setup["live"] / "jwt.secret")
    assert "at least 32" in error["reason"]
    assert setup["verifier"].verify(mint_token(setup["old_secret"], "bob")).sub == "bob"


def test_reload_during_drain_is_ignored(setup):
    """Draining: nothing is read or swapped, and the log says why."""
    setup["state"]["draining"] = True
    before = setup["server_tls"].options
    install(setup, "fullchain.pem", "privkey.pem")
    with capturedLogs() as events:
        assert setup["reloader"].reload() is None
    assert setup["server_tls"].options is before
    assert any("ignored" in e["log_format"] for e in events)


class ThreadCalls:
    """The part of a reactor the signal handler uses."""

    def __init__(self):
        self.calls = []

    def callFromThread(self, f, *args):
        self.calls.append((f, args))


def test_sighup_schedules_a_reload_and_stop_restores_the_handler(setup):
    """A real SIGHUP to this process reaches the reactor as one reload call."""
    reactor = ThreadCalls()
    service = reload.ReloadService(setup["reloader"], reactor)
    before = signal.getsignal(signal.SIGHUP)
    service.startService()
    try:
        os.kill(os.getpid(), signal.SIGHUP)  # handled before os.kill returns (main thread)
        assert reactor.calls == [(setup["reloader"].reload, ())]
    finally:
        service.stopService()
    assert signal.getsignal(signal.SIGHUP) == before


def test_public_key_rotation(tmp_path, logged_failures):
    """RS256: the new public key verifies from the reload on; a private key put there is refused."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    def pair():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return private, public

    old_private, old_public = pair()
    new_private, new_public = pair()
    public_file = tmp_path / "issuer.pub"
    public_file.write_bytes(old_public)
    write_config(tmp_path / "chatd.ini", {
        "server": {"endpoint": "tcp:0", "allowed_origins": "*", "tls": "off"},
        "auth": {"algorithms": "RS256", "public_key_file": public_file},
    })
    settings = config.load(str(tmp_path / "chatd.ini"))
    verifier = auth.TokenVerifier.from_settings(settings)
    reloader = reload.Reloader(settings, verifier)
    assert verifier.verify(mint_token(old_private, "alice", algorithm="RS256")).sub == "alice"

    public_file.write_bytes(new_public)
    assert reloader.reload() == {"jwt": True}
    assert verifier.verify(mint_token(new_private, "alice", algorithm="RS256")).sub == "alice"
    with pytest.raises(InvalidToken):
        verifier.verify(mint_token(old_private, "alice", algorithm="RS256"))

    logged_failures.expect("reload refused")
    public_file.write_bytes(new_private)
    with capturedLogs() as events:
        assert reloader.reload() == {"jwt": False}
    (error,) = [e for e in events if e["log_level"] == LogLevel.error]
    assert error["file"] == str(public_file) and "private key" in error["reason"]
    assert verifier.verify(mint_token(new_private, "bob", algorithm="RS256")).sub == "bob"
