# -*- test-case-name: tests.test_config -*-
"""
chatd.config: every way an INI file can be wrong ends in one ConfigError
that names file, section and key; good files become frozen typed settings.
"""

import dataclasses
import os
import shutil

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from chatd import config
from chatd.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "etc", "chatd.ini")
SECRET = b"s" * 48


@pytest.fixture
def files(tmp_path):
    """Stand-in certificate, key and secret files (config only reads them)."""
    paths = {
        "cert": tmp_path / "fullchain.pem",
        "key": tmp_path / "privkey.pem",
        "secret": tmp_path / "jwt.secret",
    }
    paths["cert"].write_text("-----BEGIN CERTIFICATE-----\n")
    paths["key"].write_text("-----BEGIN PRIVATE KEY-----\n")
    paths["secret"].write_bytes(SECRET + b"\n")
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture
def ini(tmp_path, files):
    """C{ini(section__key=value or None)}: a good file with changes, as a path."""

    def write(_text=None, **changes):
        sections = {
            "server": {
                "endpoint": "tcp:8443:interface=127.0.0.1",
                "tls": "on",
                "allowed_origins": "https://localhost:8443",
            },
            "tls": {"certificate": files["cert"], "private_key": files["key"]},
            "auth": {"algorithms": "HS256", "secret_file": files["secret"]},
        }
        for name, value in changes.items():
            section, key = name.split("__", 1)
            keys = sections.setdefault(section, {})
            if value is None:
                keys.pop(key, None)
            else:
                keys[key] = value
        path = tmp_path / "chatd.ini"
        if _text is None:
            _text = "".join(
                f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n"
                for section, keys in sections.items()
            )
        path.write_text(_text)
        return str(path)

    return write


def failure(path):
    """The ConfigError loading C{path} raises."""
    with pytest.raises(ConfigError) as info:
        config.load(path)
    return info.value


def assert_names(error, path, section, key, why_part):
    """The error's fields and its one-line text "PATH: [section] key: why"."""
    assert (error.path, error.section, error.key) == (path, section, key)
    assert why_part in error.why
    assert str(error) == f"{path}: [{section}] {key}: {error.why}"
    assert "\n" not in str(error)


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem_public(key):
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pem_private(key):
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def self_signed(key):
    """A self-signed certificate for C{key}: what a certificate file holds."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "issuer")])
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


# --- the good case -------------------------------------------------------------


def test_good_file_loads_typed_values(ini, files):
    """A minimal file parses into typed values with the schema defaults filled in."""
    settings = config.load(ini())
    assert settings.server.endpoint == "tcp:8443:interface=127.0.0.1"
    assert settings.server.tls is True
    assert settings.server.allowed_origins == ("https://localhost:8443",)
    assert settings.tls.certificate == files["cert"]
    assert settings.auth.algorithms == ("HS256",)
    assert settings.auth.ticket_ttl == 30 and settings.limits.rate == 20.0
    assert settings.history.size == 500 and settings.redis.url == ""
    assert settings.jwt_key == SECRET  # stripped of the newline
    assert settings.redis_password is None


def test_settings_are_frozen(ini):
    """Settings and their sections cannot be changed after loading."""
    settings = config.load(ini())
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.server.tls = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.path = "x"


def test_secrets_stay_out_of_repr(ini):
    """repr(settings) does not show the JWT key."""
    settings = config.load(ini())
    assert SECRET.decode() not in repr(settings)


def test_inline_comments_are_not_values(ini):
    """'; comment' after a value is dropped, as the sample file relies on."""
    settings = config.load(ini(history__size="7   ; a comment", server__tls="on # too"))
    assert settings.history.size == 7 and settings.server.tls is True


@pytest.mark.parametrize(
    "word,value",
    [("on", True), ("YES", True), ("true", True), ("1", True),
     ("off", False), ("No", False), ("false", False), ("0", False)],
)
def test_flag_words(ini, word, value):
    """Flags take on/off, yes/no, true/false and 1/0 in any case."""
    assert config.load(ini(server__tls="off", server__access_log=word)).server.access_log is value


def test_origins_list(ini):
    """Origins are split on spaces and commas; * is allowed."""
    settings = config.load(
        ini(server__allowed_origins="https://a.example, http://b.example:8080  *")
    )
    assert settings.server.allowed_origins == ("https://a.example", "http://b.example:8080", "*")


def test_tls_off_needs_no_certificate(ini):
    """With tls = off the [tls] files are neither required nor read."""
    settings = config.load(ini(server__tls="off", tls__certificate=None, tls__private_key=None))
    assert settings.server.tls is False and settings.tls.certificate == ""


def test_redis_url_and_password_file(ini, tmp_path):
    """A redis URL is kept; the password comes from password_file, stripped."""
    secret = tmp_path / "redis.pw"
    secret.write_text("hunter2hunter2\n")
    settings = config.load(
        ini(redis__url="redis://127.0.0.1:6379/2", redis__password_file=str(secret))
    )
    assert settings.redis.url == "redis://127.0.0.1:6379/2"
    assert settings.redis_password == "hunter2hunter2"
    assert "hunter2" not in repr(settings)


def test_relative_paths_become_absolute(ini, tmp_path, monkeypatch):
    """Relative file names are resolved against the start directory, at load time."""
    monkeypatch.chdir(tmp_path)
    settings = config.load(
        ini(tls__certificate="fullchain.pem", tls__private_key="./privkey.pem",
            auth__secret_file="jwt.secret")
    )
    assert settings.tls.certificate == str(tmp_path / "fullchain.pem")
    assert settings.tls.private_key == str(tmp_path / "privkey.pem")
    assert settings.auth.secret_file == str(tmp_path / "jwt.secret")
    assert all(os.path.isabs(p) for p in (settings.tls.certificate, settings.auth.secret_file))


def test_sample_file_parses(tmp_path, monkeypatch):
    """etc/chatd.ini loads as shipped once etc/dev files exist, from the directory it expects."""
    (tmp_path / "etc" / "dev").mkdir(parents=True)
    shutil.copy(SAMPLE, tmp_path / "etc" / "chatd.ini")
    (tmp_path / "etc" / "dev" / "fullchain.pem").write_text("cert\n")
    (tmp_path / "etc" / "dev" / "privkey.pem").write_text("key\n")
    (tmp_path / "etc" / "dev" / "jwt.secret").write_bytes(SECRET)
    monkeypatch.chdir(tmp_path)
    settings = config.load("etc/chatd.ini")
    assert settings.server.endpoint == "tcp:8443:interface=127.0.0.1"
    assert settings.server.allowed_origins == ("https://localhost:8443", "https://127.0.0.1:8443")
    assert settings.tls.private_key == str(tmp_path / "etc" / "dev" / "privkey.pem")
    assert settings.auth.algorithms == ("HS256",) and settings.auth.issuer == ""
    assert settings.limits.max_send_buffer_bytes == 4194304
    assert settings.websocket.compression is False and settings.conformance.echo is False
    # "every key, with its default where it has one": the file agrees with SCHEMA.
    # Exceptions: the dev files, and the admin listener, off by default but
    # on (on loopback) in the shipped file.
    own = {("tls", "certificate"), ("tls", "private_key"), ("auth", "secret_file"), ("admin", "endpoint")}
    assert settings.admin.endpoint.endswith(":interface=127.0.0.1")
    for section, keys in config.SCHEMA.items():
        for key, spec in keys.items():
            if spec.default is not None and (section, key) not in own:
                assert getattr(getattr(settings, section), key) == spec.parse(spec.default), key


def test_public_key_file(ini, tmp_path, rsa_key):
    """RS256 with a PEM public key loads; the key is kept for the verifier."""
    public = tmp_path / "jwt.pub"
    public.write_bytes(pem_public(rsa_key))
    settings = config.load(
        ini(auth__algorithms="RS256 PS256", auth__secret_file=None, auth__public_key_file=str(public))
    )
    assert settings.auth.algorithms == ("RS256", "PS256")
    assert settings.jwt_key == pem_public(rsa_key)


def test_public_key_from_certificate(ini, tmp_path, rsa_key):
    """A PEM certificate in public_key_file yields its public key, which verifies tokens."""
    import jwt

    public = tmp_path / "idp.crt"
    public.write_bytes(self_signed(rsa_key).public_bytes(serialization.Encoding.PEM))
    settings = config.load(
        ini(auth__algorithms="RS256", auth__secret_file=None, auth__public_key_file=str(public))
    )
    token = jwt.encode({"sub": "a", "exp": 2**40}, rsa_key, algorithm="RS256")
    assert jwt.decode(token, settings.jwt_key, algorithms=["RS256"])["sub"] == "a"


# --- reading the file ------------------------------------------------------------


def test_missing_file(tmp_path):
    """A file that is not there: the path and 'no such file', no section or key."""
    path = str(tmp_path / "nope.ini")
    error = failure(path)
    assert (error.path, error.section, error.key) == (path, None, None)
    assert str(error) == f"{path}: no such file"


def test_unreadable_file(tmp_path):
    """A path that cannot be read (a directory) says so."""
    error = failure(str(tmp_path))
    assert error.section is None and error.why.startswith("cannot read:")
    assert str(error).startswith(f"{tmp_path}: cannot read:")


def test_byte_order_mark(ini):
    """A UTF-8 file starting with a BOM (as some editors save it) loads."""
    path = ini()
    with open(path, "rb") as f:
        text = f.read()
    with open(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + text)
    assert config.load(path).server.tls is True


def test_not_utf8(ini):
    """Bytes that are not UTF-8 are a read error, not a crash."""
    path = ini()
    with open(path, "ab") as f:
        f.write(b"[history]\nsize = \xff\n")
    error = failure(path)
    assert error.section is None and error.why.startswith("cannot read:")


@pytest.mark.parametrize(
    "text,why_part",
    [
        ("endpoint = tcp:1\n", "no section headers"),
        ("[server]\nendpoint = a\nendpoint = b\n", "already exists"),
        ("[server]\n[server]\n", "already exists"),
        ("[server]\nthis line has no equals sign\n", "parsing errors"),
    ],
)
def test_parse_errors_are_one_line(ini, text, why_part):
    """INI syntax errors name the file and fit on one line."""
    path = ini(text)
    error = failure(path)
    assert error.path == path and error.section is None
    assert why_part in error.why
    assert "\n" not in str(error) and str(error).startswith(f"{path}: ")


# --- sections and keys ------------------------------------------------------------


def test_unknown_section(ini):
    """A section chatd does not read is refused by name."""
    path = ini(srever__endpoint="tcp:1")
    error = failure(path)
    assert (error.section, error.key, error.why) == ("srever", None, "unknown section")
    assert str(error) == f"{path}: [srever]: unknown section"


def test_default_section_is_unknown(ini):
    """[DEFAULT] is an unknown section, not a key blamed on another section."""
    path = ini("[DEFAULT]\ntls = off\n\n" + open(ini()).read())
    error = failure(path)
    assert (error.section, error.key, error.why) == ("DEFAULT", None, "unknown section")


def test_unknown_key(ini):
    """A misspelt key is refused with its section."""
    path = ini(server__allowed_origin="*")
    assert_names(failure(path), path, "server", "allowed_origin", "unknown key")


@pytest.mark.parametrize("key", ["endpoint", "allowed_origins"])
def test_missing_required_key(ini, key):
    """endpoint and allowed_origins have no default: absent is an error."""
    path = ini(**{f"server__{key}": None})
    assert_names(failure(path), path, "server", key, "missing (required)")


def test_empty_required_key(ini):
    """A required key present but empty counts as missing."""
    path = ini(server__endpoint="")
    assert_names(failure(path), path, "server", "endpoint", "missing (required)")


# --- value parsers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "change,section,key,why_part",
    [
        ({"server__tls": "maybe"}, "server", "tls", "expected on or off, got 'maybe'"),
        ({"conformance__echo": ""}, "conformance", "echo", "expected on or off"),
        ({"auth__ticket_ttl": "thirty"}, "auth", "ticket_ttl", "expected a whole number, got 'thirty'"),
        ({"auth__ticket_ttl": "1.5"}, "auth", "ticket_ttl", "expected a whole number"),
        ({"auth__ticket_ttl": "0"}, "auth", "ticket_ttl", "must be between 1 and 3600, got 0"),
        ({"auth__ticket_ttl": "3601"}, "auth", "ticket_ttl", "must be between 1 and 3600, got 3601"),
        ({"auth__leeway": "-1"}, "auth", "leeway", "must be between 0 and 300"),
        ({"history__size": "100001"}, "history", "size", "must be between 0 and 100000"),
        ({"limits__max_message_bytes": "127"}, "limits", "max_message_bytes", "must be at least 128, got 127"),
        ({"limits__burst": "0"}, "limits", "burst", "must be at least 1"),
        ({"limits__rate": "fast"}, "limits", "rate", "expected a number, got 'fast'"),
        ({"limits__rate": "0.05"}, "limits", "rate", "must be at least 0.1, got 0.05"),
        ({"limits__rate": "nan"}, "limits", "rate", "expected a finite number"),
        ({"limits__rate": "inf"}, "limits", "rate", "expected a finite number"),
        ({"websocket__ping_timeout": "0.5"}, "websocket", "ping_timeout", "must be at least 1"),
        ({"redis__timeout": "-1"}, "redis", "timeout", "must be at least 0.1"),
        ({"redis__presence_ttl": "2"}, "redis", "presence_ttl", "must be between 3 and 300"),
        ({"server__drain_time": "-1"}, "server", "drain_time", "must be at least 0"),
        ({"server__drain_time": "soon"}, "server", "drain_time", "expected a number"),
        ({"server__log_format": "xml"}, "server", "log_format", "expected one of text, json, got 'xml'"),
        ({"server__trusted_proxies": "127.0.0.1 nginx"}, "server", "trusted_proxies",
         "'nginx' is not an IP address or network"),
        ({"server__trusted_proxies": "10.0.0.0/33"}, "server", "trusted_proxies",
         "'10.0.0.0/33' is not an IP address or network"),
    ],
)
def test_value_errors(ini, change, section, key, why_part):
    """Each parser's refusal names the key and says what was expected."""
    path = ini(**change)
    assert_names(failure(path), path, section, key, why_part)


def test_integer_bounds_are_inclusive(ini):
    """The documented bounds themselves are accepted."""
    settings = config.load(ini(auth__ticket_ttl="3600", auth__leeway="0", history__size="0"))
    assert (settings.auth.ticket_ttl, settings.auth.leeway, settings.history.size) == (3600, 0, 0)


@pytest.mark.parametrize(
    "origins",
    ["chat.example.com", "ftp://chat.example.com", "https://chat.example.com/",
     "https://chat.example.com/app", "https://", "https://[::1"],
)
def test_bad_origins(ini, origins):
    """Anything but scheme://host[:port] (or *) is refused, malformed IPv6 included."""
    path = ini(server__allowed_origins=f"https://ok.example {origins}")
    assert_names(failure(path), path, "server", "allowed_origins", "is not an origin like")


def test_origins_without_any_origin(ini):
    """A value with separators only names no origin."""
    path = ini(server__allowed_origins=", ,")
    assert_names(failure(path), path, "server", "allowed_origins", "name at least one origin")


@pytest.mark.parametrize(
    "algorithms,why_part",
    [
        ("", "name at least one algorithm"),
        ("none", "'none' is never accepted"),
        ("HS256 NONE", "'none' is never accepted"),
        ("HS999", "unknown algorithm 'HS999'"),
        ("hs256", "unknown algorithm 'hs256'"),
        ("HS256 RS256", "do not mix HS* with public-key algorithms"),
        ("ES256, HS512", "do not mix HS* with public-key algorithms"),
    ],
)
def test_bad_algorithms(ini, algorithms, why_part):
    """The allowlist refuses none, unknown names and mixed HS/public-key families."""
    path = ini(auth__algorithms=algorithms)
    assert_names(failure(path), path, "auth", "algorithms", why_part)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6379/0", "redis://", "redis:///0", "redis://h:port/0",
     "redis://h:99999/0", "redis://h:6379/zero", "redis://[::1:6379/0"],
)
def test_bad_redis_urls(ini, url):
    """Anything but redis://HOST[:PORT][/DB] is refused."""
    path = ini(redis__url=url)
    assert_names(failure(path), path, "redis", "url", "expected redis://HOST:PORT/DB")


def test_redis_inline_password_refused(ini):
    """A password in the URL is refused, pointing to password_file."""
    path = ini(redis__url="redis://:hunter2@127.0.0.1:6379/0")
    error = failure(path)
    assert_names(error, path, "redis", "url", "password_file, not the URL")
    assert "hunter2" not in str(error)


def test_bad_redis_url_does_not_echo_password(ini):
    """A malformed URL's error does not repeat an inline password."""
    path = ini(redis__url="redis://user:hunter2@127.0.0.1:port/0")
    error = failure(path)
    assert_names(error, path, "redis", "url", "expected redis://HOST:PORT/DB")
    assert "hunter2" not in str(error) and "***@127.0.0.1" in str(error)


def test_missing_redis_password_file(ini, tmp_path):
    """password_file naming no file is an error on that key."""
    path = ini(redis__url="redis://127.0.0.1:6379/0", redis__password_file=str(tmp_path / "no"))
    assert_names(failure(path), path, "redis", "password_file", "no such file")


# --- files named by keys --------------------------------------------------------------


@pytest.mark.parametrize("key", ["certificate", "private_key"])
def test_tls_on_needs_files(ini, key):
    """tls = on without a certificate or key names the missing key."""
    path = ini(**{f"tls__{key}": None})
    assert_names(failure(path), path, "tls", key, "missing (required for tls = on)")


@pytest.mark.parametrize("key", ["certificate", "private_key"])
def test_tls_files_must_exist(ini, tmp_path, key):
    """A certificate or key path that does not exist is named, absolute."""
    missing = tmp_path / "gone.pem"
    path = ini(**{f"tls__{key}": str(missing)})
    assert_names(failure(path), path, "tls", key, f"no such file: {missing}")


@pytest.mark.parametrize("key", ["certificate", "private_key"])
def test_tls_file_unreadable(ini, tmp_path, key):
    """A certificate or key path that is a directory cannot be read: named, with the reason."""
    path = ini(**{f"tls__{key}": str(tmp_path)})
    assert_names(failure(path), path, "tls", key, f"cannot read {tmp_path}: Is a directory")


def test_secret_file_required_for_hs(ini):
    """HS* without secret_file names the key and the algorithm that needs it."""
    path = ini(auth__secret_file=None)
    assert_names(failure(path), path, "auth", "secret_file", "missing (required for HS256)")


def test_secret_file_missing(ini, tmp_path):
    """A secret_file that does not exist is an error on that key."""
    path = ini(auth__secret_file=str(tmp_path / "nope"))
    assert_names(failure(path), path, "auth", "secret_file", "no such file")


def test_short_secret(ini, files):
    """A secret under 32 bytes (after stripping whitespace) is refused."""
    with open(files["secret"], "wb") as f:
        f.write(b"x" * 31 + b"\n\n")
    path = ini()
    assert_names(
        failure(path), path, "auth", "secret_file", "secret is 31 bytes; HS256 needs at least 32"
    )


@pytest.mark.parametrize(
    "algorithms, size, refusal",
    [
        ("HS384", 47, "secret is 47 bytes; HS384 needs at least 48"),
        ("HS256 HS512", 63, "secret is 63 bytes; HS512 needs at least 64"),
        ("HS384", 48, None),
        ("HS512 HS256", 64, None),
    ],
)
def test_secret_at_least_as_long_as_each_allowed_hash(ini, files, algorithms, size, refusal):
    """RFC 7518: an HS384 or HS512 secret as long as the hash (48, 64 bytes), which PyJWT only warns about."""
    with open(files["secret"], "wb") as f:
        f.write(b"x" * size)
    path = ini(auth__algorithms=algorithms)
    if refusal is None:
        assert config.load(path).jwt_key == b"x" * size
    else:
        assert_names(failure(path), path, "auth", "secret_file", refusal)


def test_secret_of_exactly_32_bytes(ini, files):
    """32 bytes is enough."""
    with open(files["secret"], "wb") as f:
        f.write(b"x" * 32)
    assert config.load(ini()).jwt_key == b"x" * 32


@pytest.mark.parametrize("form", ["pem", "openssh", "der", "certificate"])
@pytest.mark.parametrize("algorithms", ["HS256", "HS512 HS256"])
def test_key_as_hs_secret_is_refused(ini, files, rsa_key, form, algorithms):
    """
    A public key or certificate in secret_file (PyJWT refuses it as an HMAC
    secret, with InvalidKeyError on every token) stops loading, naming
    [auth] secret_file and not echoing the file.
    """
    if form == "certificate":
        secret = self_signed(rsa_key).public_bytes(serialization.Encoding.PEM)
    else:
        encoding, format_ = {
            "pem": (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "openssh": (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
            "der": (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        }[form]
        secret = rsa_key.public_key().public_bytes(encoding, format_)
    with open(files["secret"], "wb") as f:
        f.write(secret)
    path = ini(auth__algorithms=algorithms)
    error = failure(path)
    assert_names(error, path, "auth", "secret_file", "PyJWT refuses as an HS* secret")
    assert "AAAA" not in str(error) and "BEGIN" not in str(error)


def test_public_key_file_required(ini):
    """RS256 without public_key_file names that key."""
    path = ini(auth__algorithms="RS256")
    assert_names(failure(path), path, "auth", "public_key_file", "missing (required for RS256)")


def test_public_key_file_holding_private_key(ini, tmp_path, rsa_key):
    """A private key given as the public key is refused (it would be a leak)."""
    private = tmp_path / "jwt.key"
    private.write_bytes(pem_private(rsa_key))
    path = ini(auth__algorithms="RS256", auth__public_key_file=str(private))
    assert_names(failure(path), path, "auth", "public_key_file", "holds a private key")


def test_public_key_file_without_pem(ini, files):
    """A file with no PEM public key in it is refused."""
    path = ini(auth__algorithms="ES256", auth__public_key_file=files["secret"])
    assert_names(failure(path), path, "auth", "public_key_file", "not a PEM public key")


def test_public_key_of_wrong_type(ini, tmp_path):
    """An EC key for RS256 is refused at load time, not on every token later."""
    public = tmp_path / "ec.pub"
    public.write_bytes(pem_public(ec.generate_private_key(ec.SECP256R1())))
    path = ini(auth__algorithms="RS256", auth__public_key_file=str(public))
    assert_names(failure(path), path, "auth", "public_key_file", "not a PEM public key for RS256")


@pytest.mark.parametrize("algorithms", ["RS256", "PS256 RS256"])
def test_rsa_key_under_2048_bits_is_refused(ini, tmp_path, algorithms):
    """RFC 7518 3.3: an RS* or PS* key of 1024 bits stops start-up, where PyJWT only warns on each token."""
    public = tmp_path / "small.pub"
    public.write_bytes(pem_public(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    path = ini(auth__algorithms=algorithms, auth__secret_file=None, auth__public_key_file=str(public))
    assert_names(failure(path), path, "auth", "public_key_file", "RSA key of 1024 bits; at least 2048")


def test_garbled_public_key(ini, tmp_path):
    """PEM armour around garbage is refused."""
    public = tmp_path / "bad.pub"
    public.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    path = ini(auth__algorithms="ES256", auth__public_key_file=str(public))
    assert_names(failure(path), path, "auth", "public_key_file", "not a PEM public key")


# --- the error's text ----------------------------------------------------------------


def test_error_text_forms():
    """str(ConfigError) is 'PATH: [section] key: why', shortened when parts are absent."""
    assert str(ConfigError("a.ini", "s", "k", "bad")) == "a.ini: [s] k: bad"
    assert str(ConfigError("a.ini", "s", None, "bad")) == "a.ini: [s]: bad"
    assert str(ConfigError("a.ini", None, None, "bad")) == "a.ini: bad"


# --- helpers for tests and tools ---------------------------------------------------------


def test_defaults():
    """defaults() is every schema default, parsed; required keys are empty."""
    settings = config.defaults()
    assert settings.path == "<defaults>"
    assert settings.server.tls is True and settings.server.endpoint == ""
    assert settings.auth.algorithms == ("HS256",) and settings.auth.ticket_ttl == 30
    assert settings.limits.max_message_bytes == 65536 and settings.websocket.ping_interval == 30.0
    for section, keys in config.SCHEMA.items():
        assert set(dataclasses.asdict(getattr(settings, section))) == set(keys)


def test_operations_keys(ini):
    """drain_time, trusted_proxies, log_format and [admin] endpoint parse into typed values."""
    import ipaddress

    settings = config.load(ini(
        server__drain_time="2.5", server__trusted_proxies="127.0.0.1, 10.0.0.0/8 ::1",
        server__log_format="JSON", admin__endpoint="tcp:9180:interface=127.0.0.1",
    ))
    assert settings.server.drain_time == 2.5
    assert settings.server.trusted_proxies == (
        ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert settings.server.log_format == "json"
    assert settings.admin.endpoint == "tcp:9180:interface=127.0.0.1"


def test_operations_defaults(ini):
    """By default: 5 s drain, no trusted proxy, text logs, no admin listener."""
    settings = config.load(ini())
    assert settings.server.drain_time == 5.0
    assert settings.server.trusted_proxies == ()
    assert settings.server.log_format == "text"
    assert settings.admin.endpoint == ""


def test_defaults_with_overrides():
    """defaults(section__key=value) sets exactly those values."""
    settings = config.defaults(server__tls=False, history__size=3)
    assert settings.server.tls is False and settings.history.size == 3
    assert settings.server.access_log is True


def test_replace():
    """replace() returns a changed copy and leaves the original alone."""
    original = config.defaults()
    changed = config.replace(original, limits__burst=2, limits__rate=1.0, server__tls=False)
    assert (changed.limits.burst, changed.limits.rate, changed.server.tls) == (2, 1.0, False)
    assert changed.limits.max_rooms_per_connection == original.limits.max_rooms_per_connection
    assert (original.limits.burst, original.server.tls) == (40, True)


def test_replace_unknown_key():
    """replace() refuses a key the section does not have."""
    with pytest.raises(TypeError):
        config.replace(config.defaults(), limits__bogus=1)


# --- [stomp] ---------------------------------------------------------------------


def test_stomp_defaults(ini):
    """[stomp] is on by default, with the Spring seed clients' destinations."""
    stomp = config.load(ini()).stomp
    assert stomp.enabled is True and stomp.connect_auth is False
    assert stomp.sockjs_path == "/ws-stomp"
    assert stomp.subscribe_prefixes == ("/sub/chat/room/", "/topic/")
    assert stomp.app_prefixes == ("/app/chat/", "/pub/chat/room/")
    assert stomp.send_destination == "/pub/chat/message"


def test_stomp_settings(ini):
    """Every [stomp] key is read; app_prefixes may be empty."""
    stomp = config.load(
        ini(stomp__enabled="off", stomp__sockjs_path="/chat-stomp", stomp__connect_auth="on",
            stomp__subscribe_prefixes="/exchange/rooms/", stomp__app_prefixes="",
            stomp__send_destination="/queue/talk")
    ).stomp
    assert (stomp.enabled, stomp.sockjs_path, stomp.connect_auth) == (False, "/chat-stomp", True)
    assert stomp.subscribe_prefixes == ("/exchange/rooms/",) and stomp.app_prefixes == ()
    assert stomp.send_destination == "/queue/talk"


@pytest.mark.parametrize(
    "change,key,why_part",
    [
        ({"stomp__enabled": "sometimes"}, "enabled", "expected on or off"),
        ({"stomp__sockjs_path": "ws-stomp"}, "sockjs_path", "one path segment like /ws-stomp"),
        ({"stomp__sockjs_path": "/a/b"}, "sockjs_path", "one path segment"),
        ({"stomp__sockjs_path": "/"}, "sockjs_path", "one path segment"),
        ({"stomp__sockjs_path": "/ws"}, "sockjs_path", "/ws is already served by chatd"),
        ({"stomp__sockjs_path": "/auth"}, "sockjs_path", "already served"),
        ({"stomp__subscribe_prefixes": "/topic"}, "subscribe_prefixes", "starting and ending in /"),
        ({"stomp__subscribe_prefixes": ""}, "subscribe_prefixes", "name at least one prefix"),
        ({"stomp__app_prefixes": "app/"}, "app_prefixes", "starting and ending in /"),
        ({"stomp__app_prefixes": "/topic/x/"}, "app_prefixes", "/topic/x/ overlaps subscribe prefix /topic/"),
        ({"stomp__app_prefixes": "/sub/"}, "app_prefixes", "/sub/ overlaps subscribe prefix /sub/chat/room/"),
        ({"stomp__app_prefixes": "/app/"}, "app_prefixes", "/app/ would take /app/auth"),
        ({"stomp__subscribe_prefixes": "/"}, "subscribe_prefixes", "would take /app/auth"),
        ({"stomp__send_destination": "pub"}, "send_destination", "like /pub/chat/message"),
        ({"stomp__send_destination": "/a b"}, "send_destination", "like /pub/chat/message"),
        ({"stomp__send_destination": "/topic/x"}, "send_destination", "under subscribe prefix /topic/"),
        ({"stomp__send_destination": "/app/auth"}, "send_destination", "AUTH renewal"),
    ],
)
def test_stomp_errors(ini, change, key, why_part):
    """A bad [stomp] value, or destinations that would mean two things, name the key."""
    path = ini(**change)
    assert_names(failure(path), path, "stomp", key, why_part)


# --- [api] and [webhook] ------------------------------------------------------------

KEY_A = "a" * 32
KEY_B = "B-" + "7" * 40


def test_api_off_by_default(ini):
    """No [api] key_file: no keys, the API is off."""
    settings = config.load(ini())
    assert settings.api.key_file == "" and settings.api_keys == ()


def test_api_keys_one_per_line(ini, tmp_path):
    """Every non-blank, non-comment line is a key; surrounding whitespace is stripped."""
    keys = tmp_path / "api.keys"
    keys.write_text(f"# rotated 2026-12\n{KEY_A}\n\n  {KEY_B}  \n")
    settings = config.load(ini(api__key_file=str(keys)))
    assert settings.api_keys == (KEY_A, KEY_B)
    assert KEY_A not in repr(settings)


def test_short_api_key_names_file_and_line_not_key(ini, tmp_path):
    """A key under 32 characters stops loading, naming the file and its line, never the key."""
    keys = tmp_path / "api.keys"
    keys.write_text(f"{KEY_A}\n# comment\nshort-key-{'x' * 20}\n")
    path = ini(api__key_file=str(keys))
    error = failure(path)
    assert_names(error, path, "api", "key_file", f"{keys} line 3: key is 30 characters; at least 32")
    assert "short-key" not in str(error)


@pytest.mark.parametrize("content, why_part", [
    ("\n# only a comment\n", "holds no key"),
    ("a key with spaces in it, long enough to pass\n", "line 1: a key is printable ASCII"),
    ("ключ" * 10 + "\n", "line 1: a key is printable ASCII"),
])
def test_bad_api_key_files(ini, tmp_path, content, why_part):
    """An empty key file or a key with spaces or non-ASCII is refused, naming [api] key_file."""
    keys = tmp_path / "api.keys"
    keys.write_text(content)
    path = ini(api__key_file=str(keys))
    assert_names(failure(path), path, "api", "key_file", why_part)


def test_api_key_file_missing(ini, tmp_path):
    """A key_file that does not exist is named."""
    path = ini(api__key_file=str(tmp_path / "nope"))
    assert_names(failure(path), path, "api", "key_file", "no such file")


def test_webhook_off_by_default(ini):
    """No [webhook] url: no secret needed, the defaults are talk, 10 s, 10000 events."""
    settings = config.load(ini())
    assert settings.webhook.url == "" and settings.webhook_secret == b""
    assert settings.webhook.events == frozenset({"talk"})
    assert (settings.webhook.timeout, settings.webhook.max_queue) == (10.0, 10000)


def test_webhook_loads_with_secret(ini, tmp_path):
    """A url with a 32-byte secret and an event list loads; the secret stays out of repr."""
    secret = tmp_path / "hook.secret"
    secret.write_bytes(b"k" * 32 + b"\n")
    settings = config.load(ini(
        webhook__url="https://backend.example:8443/chat/hook?x=1",
        webhook__secret_file=str(secret),
        webhook__events="talk, ENTER quit",
        webhook__timeout="2.5",
        webhook__max_queue="5",
    ))
    assert settings.webhook.url == "https://backend.example:8443/chat/hook?x=1"
    assert settings.webhook_secret == b"k" * 32
    assert settings.webhook.events == frozenset({"talk", "enter", "quit"})
    assert (settings.webhook.timeout, settings.webhook.max_queue) == (2.5, 5)
    assert b"k" * 32 not in repr(settings).encode()


def test_webhook_short_secret(ini, tmp_path):
    """A webhook secret under 32 bytes is a config error naming [webhook] secret_file."""
    secret = tmp_path / "hook.secret"
    secret.write_bytes(b"k" * 31)
    path = ini(webhook__url="https://h.example/", webhook__secret_file=str(secret))
    assert_names(failure(path), path, "webhook", "secret_file", "secret is 31 bytes; at least 32")


def test_webhook_url_needs_secret_file(ini):
    """A url without secret_file is refused: every delivery is signed."""
    path = ini(webhook__url="https://h.example/")
    assert_names(failure(path), path, "webhook", "secret_file", "missing (required for a webhook url)")


@pytest.mark.parametrize("url, why_part", [
    ("ftp://h.example/", "expected https://HOST"),
    ("https:///path", "expected https://HOST"),
    ("https://h.example:99999/", "expected https://HOST"),
    ("https://user:pw@h.example/", "no credentials"),
])
def test_bad_webhook_urls(ini, url, why_part):
    """Webhook URLs must be http(s) with a host; credentials in them are refused and not echoed."""
    path = ini(webhook__url=url)
    error = failure(path)
    assert_names(error, path, "webhook", "url", why_part)
    assert "pw" not in str(error)


@pytest.mark.parametrize("change, key, why_part", [
    ({"webhook__events": "talk shout"}, "events", "unknown event 'shout'"),
    ({"webhook__events": " , "}, "events", "name at least one of talk enter quit"),
    ({"webhook__timeout": "0"}, "timeout", "at least 0.1"),
    ({"webhook__max_queue": "0"}, "max_queue", "at least 1"),
])
def test_bad_webhook_values(ini, change, key, why_part):
    """Each bad [webhook] value is named by its key."""
    path = ini(**change)
    assert_names(failure(path), path, "webhook", key, why_part)
