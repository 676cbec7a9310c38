# -*- test-case-name: tests.test_tap -*-
"""
chatd.tap: C{twistd chatd --config BAD} stops with one line and exit 1;
a good file parses into settings.  The refusals run a real twistd process,
because the promise is about what an operator sees.
"""

import gc
import os
import socket
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from chatd import tap
from tests.support import write_config

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
RUN_TIMEOUT = 30


@pytest.fixture
def sections(dev_dir):
    """A good configuration (tls on, real dev certificate) to spoil."""
    directory, _ = dev_dir
    return {
        "server": {
            "endpoint": "tcp:0:interface=127.0.0.1",
            "tls": "on",
            "allowed_origins": "https://localhost:8443",
        },
        "tls": {
            "certificate": os.path.join(directory, "fullchain.pem"),
            "private_key": os.path.join(directory, "privkey.pem"),
        },
        "auth": {"algorithms": "HS256", "secret_file": os.path.join(directory, "jwt.secret")},
    }


def write_key(path, pem, mode=0o600):
    """A private key file with C{mode}, whatever the umask."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as f:
        f.write(pem)
    os.chmod(path, mode)


def run_twistd(cwd, config_path):
    """twistd -n chatd --config PATH in C{cwd}: (exit status, stdout + stderr)."""
    proc = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "chatd", "--config", config_path],
        cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        timeout=RUN_TIMEOUT, start_new_session=True,  # no terminal to prompt on
    )
    return proc.returncode, proc.stdout.decode("utf-8", "replace")


def assert_one_line_refusal(status, output, *names):
    """Exit 1 and exactly one 'chatd: ...' line naming each of C{names}."""
    assert status == 1, output
    assert "Traceback" not in output
    lines = output.splitlines()
    assert len(lines) == 1 and output.endswith("\n"), output
    assert lines[0].startswith("chatd: "), output
    for name in names:
        assert name in lines[0], (name, output)
    return lines[0]


def test_missing_file(tmp_path):
    """A config file that does not exist: one line naming it."""
    status, output = run_twistd(tmp_path, "missing.ini")
    line = assert_one_line_refusal(status, output, "missing.ini")
    assert line == "chatd: missing.ini: no such file"


def test_unknown_key(tmp_path, sections):
    """A misspelt key: one line with file, section and key."""
    sections["server"]["allowed_origin"] = "*"
    write_config(tmp_path / "chatd.ini", sections)
    status, output = run_twistd(tmp_path, "chatd.ini")
    line = assert_one_line_refusal(status, output, "chatd.ini", "[server]", "allowed_origin")
    assert line == "chatd: chatd.ini: [server] allowed_origin: unknown key"


def test_short_secret(tmp_path, sections):
    """A JWT secret under 32 bytes: names [auth] secret_file."""
    (tmp_path / "short.secret").write_text("too short\n")
    sections["auth"]["secret_file"] = "short.secret"
    write_config(tmp_path / "chatd.ini", sections)
    status, output = run_twistd(tmp_path, "chatd.ini")
    assert_one_line_refusal(status, output, "chatd.ini: [auth] secret_file:", "at least 32")


def test_short_api_key(tmp_path, sections):
    """An API key under 32 characters: names [api] key_file, the file and the line, never the key."""
    (tmp_path / "api.keys").write_text("# keys\n" + "k" * 40 + "\nshort-api-key\n")
    sections["api"] = {"key_file": "api.keys"}
    write_config(tmp_path / "chatd.ini", sections)
    status, output = run_twistd(tmp_path, "chatd.ini")
    line = assert_one_line_refusal(status, output, "chatd.ini: [api] key_file:", "api.keys line 3", "13 characters")
    assert "short-api-key" not in line


def test_short_webhook_secret(tmp_path, sections):
    """A webhook secret under 32 bytes: names [webhook] secret_file."""
    (tmp_path / "hook.secret").write_text("too short\n")
    sections["webhook"] = {"url": "https://backend.example/hook", "secret_file": "hook.secret"}
    write_config(tmp_path / "chatd.ini", sections)
    status, output = run_twistd(tmp_path, "chatd.ini")
    assert_one_line_refusal(status, output, "chatd.ini: [webhook] secret_file:", "9 bytes; at least 32")


@pytest.mark.parametrize(
    "endpoint,why",
    [("tcp:notaport", "not a Twisted server endpoint"),
     ("nosuch:8443", "not a Twisted server endpoint"),
     ("tcp:8443:bogus=1", "not a Twisted server endpoint"),
     ("ssl:8443", "not a Twisted server endpoint"),  # names a server.pem that is not there
     ("tcp:84430:interface=127.0.0.1", "port 84430 is not between 0 and 65535")],
)
def test_bad_endpoint(tmp_path, sections, endpoint, why):
    """An endpoint string Twisted cannot parse or bind: names [server] endpoint."""
    sections["server"]["endpoint"] = endpoint
    write_config(tmp_path / "chatd.ini", sections)
    status, output = run_twistd(tmp_path, "chatd.ini")
    assert_one_line_refusal(status, output, f"chatd.ini: [server] endpoint: {why}")


def test_port_in_use(tmp_path, sections):
    """A port another process listens on: one line naming [server] endpoint, exit 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        sections["server"]["endpoint"] = f"tcp:{port}:interface=127.0.0.1"
        write_config(tmp_path / "chatd.ini", sections)
        status, output = run_twistd(tmp_path, "chatd.ini")
    line = assert_one_line_refusal(status, output, "chatd.ini: [server] endpoint:")
    assert line.endswith(f"127.0.0.1:{port} is already in use")


@pytest.mark.parametrize(
    "endpoint,why",
    [("tcp:0:interface=192.0.2.1", "192.0.2.1 is not an address of this host"),  # TEST-NET-1
     ("tcp6:0:interface=2001\\:db8\\:\\:1", "2001:db8::1 is not an address of this host"),
     ("unix:{tmp}/no/such/dir/chatd.sock", "directory {tmp}/no/such/dir for the UNIX socket does not exist"),
     ("unix:address={tmp}/gone/chatd.sock", "directory {tmp}/gone for the UNIX socket does not exist")],
)
def test_cannot_listen(tmp_path, sections, endpoint, why):
    """An address not on this host, or a UNIX socket in a missing directory: one line, exit 1."""
    sections["server"]["endpoint"] = endpoint.format(tmp=tmp_path)
    write_config(tmp_path / "chatd.ini", sections)
    status, output = run_twistd(tmp_path, "chatd.ini")
    line = assert_one_line_refusal(status, output, "chatd.ini: [server] endpoint:")
    assert line.endswith(why.format(tmp=tmp_path))


def test_certificate_key_mismatch(tmp_path, sections):
    """A private key that is not the certificate's: names [tls] private_key."""
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_key(tmp_path / "other.pem", other)
    sections["tls"]["private_key"] = "other.pem"
    write_config(tmp_path / "chatd.ini", sections)
    status, output = run_twistd(tmp_path, "chatd.ini")
    line = assert_one_line_refusal(status, output, "chatd.ini: [tls] private_key:")
    assert line.endswith("does not match the certificate")


def test_encrypted_private_key(tmp_path, sections):
    """An encrypted private key is refused with one line and no passphrase prompt."""
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    write_key(tmp_path / "encrypted.pem", key)
    sections["tls"]["private_key"] = "encrypted.pem"
    write_config(tmp_path / "chatd.ini", sections)
    status, output = run_twistd(tmp_path, "chatd.ini")
    line = assert_one_line_refusal(status, output, "chatd.ini: [tls] private_key:")
    assert line.endswith("not a valid, unencrypted PEM private key")


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o601, 0o620, 0o666])
def test_private_key_open_to_others(tmp_path, sections, mode):
    """
    A private key others may read or write (or its group write) is refused
    at start-up with one line naming the file and its mode, as ssh does.
    """
    with open(sections["tls"]["private_key"], "rb") as f:
        write_key(tmp_path / "open.pem", f.read(), mode)
    sections["tls"]["private_key"] = "open.pem"
    write_config(tmp_path / "chatd.ini", sections)
    status, output = run_twistd(tmp_path, "chatd.ini")
    line = assert_one_line_refusal(status, output, "chatd.ini: [tls] private_key:")
    assert f"open.pem is accessible to others (mode {mode:04o}); chmod 600" in line


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640])
def test_private_key_modes_accepted(tmp_path, sections, mode):
    """Owner-only keys, and group-readable ones (Debian's ssl-cert group), are accepted."""
    with open(sections["tls"]["private_key"], "rb") as f:
        write_key(tmp_path / "key.pem", f.read(), mode)
    sections["tls"]["private_key"] = str(tmp_path / "key.pem")
    write_config(tmp_path / "chatd.ini", sections)
    options = tap.Options()
    options.parseOptions(["--config", str(tmp_path / "chatd.ini")])
    assert options["tls_options"] is not None


# --- in process ------------------------------------------------------------------


def test_options_parse_good_config(tmp_path, sections):
    """Options().parseOptions(['--config', path]) yields the loaded settings and TLS options."""
    from twisted.internet import ssl

    path = tmp_path / "chatd.ini"
    write_config(path, sections)
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    settings = options["settings"]
    assert settings.path == str(path)
    assert settings.server.endpoint == "tcp:0:interface=127.0.0.1"
    assert settings.server.allowed_origins == ("https://localhost:8443",)
    assert isinstance(options["tls_options"], ssl.CertificateOptions)


def test_options_tls_off(tmp_path, sections):
    """With tls = off there are no TLS options to build."""
    sections["server"]["tls"] = "off"
    del sections["tls"]
    path = tmp_path / "chatd.ini"
    write_config(path, sections)
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    assert options["settings"].server.tls is False
    assert options["tls_options"] is None


@pytest.mark.parametrize(
    "endpoint,port",
    [("tcp:8443:interface=127.0.0.1", 8443), ("tcp:port=0", 0), ("TCP6:99:interface=\\:\\:1", 99),
     ("ssl:443:privateKey=k.pem", 443), ("unix:/run/chatd.sock", None)],
)
def test_tcp_port(endpoint, port):
    """The port range check reads the port of tcp, tcp6 and ssl descriptions only."""
    assert tap._tcp_port(endpoint) == port


def test_options_refusal_in_process(tmp_path, capsys):
    """A bad file makes parseOptions exit 1 after writing the one line to stderr."""
    path = tmp_path / "chatd.ini"
    path.write_text("[sever]\n")
    with pytest.raises(SystemExit) as info:
        tap.Options().parseOptions(["--config", str(path)])
    assert info.value.code == 1
    captured = capsys.readouterr()
    assert captured.err == f"chatd: {path}: [sever]: unknown section\n"
    assert captured.out == ""


@pytest.mark.parametrize(
    "endpoint,why",
    [("tcp:notaport", "not a Twisted server endpoint"),
     ("tcp:70000:interface=127.0.0.1", "port 70000 is not between 0 and 65535"),
     ("tcp:0:interface=192.0.2.1", "192.0.2.1 is not an address of this host")],
)
def test_bad_admin_endpoint(tmp_path, sections, endpoint, why):
    """A bad [admin] endpoint stops start-up naming [admin] endpoint."""
    sections["admin"] = {"endpoint": endpoint}
    write_config(tmp_path / "chatd.ini", sections)
    status, output = run_twistd(tmp_path, "chatd.ini")
    assert_one_line_refusal(status, output, f"chatd.ini: [admin] endpoint: {why}")


def test_json_log_format_installs_the_json_logger(tmp_path, sections):
    """log_format = json makes chatd's JSON observer twistd's --logger."""
    from twisted.scripts.twistd import ServerOptions

    sections["server"]["log_format"] = "json"
    path = tmp_path / "chatd.ini"
    write_config(path, sections)
    options = ServerOptions()
    options.parseOptions(["-n", "chatd", "--config", str(path)])
    from chatd import jsonlog

    assert options["logger"] is jsonlog.twistd_observer


def test_logfile_is_written_through_the_escaping_observer(tmp_path, sections):
    """
    With --logfile, twistd's own choice, the log goes to that file (chatd's
    logger replaces twistd's default observer with the same one, wrapped),
    and a SIGTERM still stops the process cleanly (its last line logged).
    """
    from tests.support import free_port, http, stop_pid, wait_for

    def serving():
        try:
            return http("GET", f"https://127.0.0.1:{port}/healthz", timeout=1)[0] == 200
        except OSError:
            return False

    port = free_port()
    sections["server"]["endpoint"] = f"tcp:{port}:interface=127.0.0.1"
    write_config(tmp_path / "chatd.ini", sections)
    log_path = tmp_path / "chatd.log"
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "--logfile", str(log_path), "chatd", "--config", "chatd.ini"],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        wait_for(serving, 20, "chatd to serve")
        assert "Starting factory" in log_path.read_text()
    finally:
        stop_pid(proc)  # twistd re-raises SIGTERM after its clean shutdown: -15
    assert proc.stdout.read() == b""
    assert "Server Shut Down." in log_path.read_text()


def test_text_log_installs_the_escaping_logger(tmp_path, sections):
    """With the default text log, tap makes its escaping observer twistd's --logger."""
    from twisted.scripts.twistd import ServerOptions

    path = tmp_path / "chatd.ini"
    write_config(path, sections)
    options = ServerOptions()
    options.parseOptions(["-n", "chatd", "--config", str(path)])
    assert options["logger"] is tap.log_observer
    from chatd import logs

    assert isinstance(tap.log_observer(), logs.EscapingObserver)


def test_text_log_to_stdout_is_escaped_in_one_pass(tmp_path, sections, capsys):
    """
    With -n and no --logfile the log is stdout, written by
    logs.EscapingFileObserver: each event formatted once, escaped, in
    Twisted's classic text format.
    """
    from twisted.logger import formatTime
    from twisted.scripts.twistd import ServerOptions

    from chatd import logs

    path = tmp_path / "chatd.ini"
    write_config(path, sections)
    ServerOptions().parseOptions(["-n", "chatd", "--config", str(path)])
    observer = tap.log_observer()
    assert isinstance(observer, logs.EscapingFileObserver)
    observer({"log_format": "refused {origin}", "origin": "evil\x85\u202e", "log_time": 0, "log_system": "s"})
    assert capsys.readouterr().out == f"{formatTime(0)} [s] refused evil\\x85\\u202e\n"


def test_make_service_freezes_what_start_up_made(tmp_path, sections):
    """
    makeService leaves what start-up made out of the garbage collector's
    sight (gc.freeze), so full collections walk only later objects.
    """
    path = tmp_path / "chatd.ini"
    write_config(path, sections)
    options = tap.Options()
    options.parseOptions(["--config", str(path)])
    gc.unfreeze()
    try:
        service = tap.makeService(options)
        assert gc.get_freeze_count() > 0
        assert not service.running  # built, not started: twistd starts it
    finally:
        gc.unfreeze()  # the test process keeps collecting as before
