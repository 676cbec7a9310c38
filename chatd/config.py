# -*- test-case-name: tests.test_config -*-
"""
The INI file as frozen, typed settings.

Every key chatd reads is declared once, in L{SCHEMA}, with its parser and
default; docs/configuration.md mirrors it.  Loading fails on the first
problem with a L{ConfigError} naming file, section and key, so a daemon never
starts half-configured.  No Twisted here: this runs inside C{postOptions},
before logging, the fork and C{chdir}, which is also why relative paths are
made absolute here (relative to the directory chatd was started in).
"""

import configparser
import dataclasses
import ipaddress
import math
import os
import re
from typing import Any, Callable, Optional, Tuple
from urllib.parse import urlsplit

HS_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# RFC 7518 section 3.2: an HMAC key at least as long as the hash's output.
# PyJWT only warns (InsecureKeyLengthWarning) on each token it decodes.
MIN_HS_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
MIN_RSA_KEY_BITS = 2048  # NIST SP 800-131A; RFC 7518 3.3 requires 2048 for RS*
MIN_API_KEY_CHARS = 32
MIN_WEBHOOK_SECRET_BYTES = 32
WEBHOOK_EVENTS = ("talk", "enter", "quit")


class ConfigError(Exception):
    """A bad or missing setting, named by file, section and key."""

    def __init__(self, path, section, key, why):
        super().__init__(path, section, key, why)
        self.path = path
        self.section = section
        self.key = key
        self.why = why

    def __str__(self):
        where = f"[{self.section}]" if self.section else ""
        if self.key:
            where += f" {self.key}"
        return f"{self.path}: {where}: {self.why}" if where else f"{self.path}: {self.why}"


class _Invalid(ValueError):
    """Raised by a value parser; L{load} adds file, section and key."""


# --- value parsers -----------------------------------------------------------


def _text(value):
    return value.strip()


def _flag(value):
    word = value.strip().lower()
    if word in ("on", "yes", "true", "1"):
        return True
    if word in ("off", "no", "false", "0"):
        return False
    raise _Invalid(f"expected on or off, got {value.strip()!r}")


def _integer(low, high=None):
    def parse(value):
        try:
            number = int(value.strip())
        except ValueError:
            raise _Invalid(f"expected a whole number, got {value.strip()!r}") from None
        if number < low or (high is not None and number > high):
            bound = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise _Invalid(f"must be {bound}, got {number}")
        return number

    return parse


def _number(low):
    def parse(value):
        try:
            number = float(value.strip())
        except ValueError:
            raise _Invalid(f"expected a number, got {value.strip()!r}") from None
        if not math.isfinite(number):
            raise _Invalid(f"expected a finite number, got {value.strip()!r}")
        if not number >= low:
            raise _Invalid(f"must be at least {low}, got {value.strip()}")
        return number

    return parse


def _words(value):
    return tuple(word for word in re.split(r"[\s,]+", value.strip()) if word)


def _split_url(value, why):
    try:
        return urlsplit(value)
    except ValueError:  # e.g. "Invalid IPv6 URL"
        raise _Invalid(why) from None


def _origins(value):
    origins = _words(value)
    for origin in origins:
        if origin == "*":
            continue
        why = f"{origin!r} is not an origin like https://chat.example.com[:port]"
        parts = _split_url(origin, why)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
            raise _Invalid(why)
    return origins


def _algorithms(value):
    algorithms = _words(value)
    if not algorithms:
        raise _Invalid("name at least one algorithm, e.g. HS256")
    for name in algorithms:
        if name.lower() == "none":
            raise _Invalid("'none' is never accepted")
        if name not in HS_ALGORITHMS | PUBLIC_KEY_ALGORITHMS:
            raise _Invalid(f"unknown algorithm {name!r}")
    families = {name in HS_ALGORITHMS for name in algorithms}
    if len(families) > 1:
        # Mixing a shared secret with public-key algorithms is how HS/RS
        # confusion attacks start; one family per deployment.
        raise _Invalid("do not mix HS* with public-key algorithms")
    return algorithms


def _choice(*allowed):
    def parse(value):
        word = value.strip().lower()
        if word not in allowed:
            raise _Invalid(f"expected one of {', '.join(allowed)}, got {value.strip()!r}")
        return word

    return parse


def _networks(value):
    """Addresses or CIDR networks, e.g. C{127.0.0.1 10.0.0.0/8 ::1}."""
    networks = []
    for word in _words(value):
        try:
            networks.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise _Invalid(f"{word!r} is not an IP address or network like 10.0.0.0/8") from None
    return tuple(networks)


def _path(value):
    value = value.strip()
    return os.path.abspath(value) if value else ""


def _redis_url(value):
    value = value.strip()
    if not value:
        return ""
    # The message must not repeat an inline password: it goes to stderr.
    why = f"expected redis://HOST:PORT/DB, got {re.sub(r'//[^/]*@', '//***@', value)!r}"
    parts = _split_url(value, why)
    if parts.scheme != "redis" or not parts.hostname:
        raise _Invalid(why)
    try:
        parts.port
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise ValueError(db)
    except ValueError:
        raise _Invalid(why) from None
    return value


# Top-level paths chatd serves itself; [stomp] sockjs_path may not take one.
RESERVED_PATHS = frozenset({"", "ws", "auth", "rooms", "healthz", "echo", "api"})
_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+\Z")
_DESTINATION = re.compile(r"/[\x21-\x7e]*\Z")  # printable ASCII, no spaces


def _sockjs_path(value):
    value = value.strip()
    segment = value[1:]
    if not value.startswith("/") or not _SEGMENT.match(segment):
        raise _Invalid(f"expected one path segment like /ws-stomp, got {value!r}")
    if segment in RESERVED_PATHS:
        raise _Invalid(f"{value} is already served by chatd")
    return value


def _destination(value):
    value = value.strip()
    if not _DESTINATION.match(value):
        raise _Invalid(f"expected a destination like /pub/chat/message, got {value!r}")
    return value


def _prefixes(value):
    prefixes = _words(value)
    for prefix in prefixes:
        if not _DESTINATION.match(prefix) or not prefix.endswith("/"):
            raise _Invalid(f"expected prefixes like /topic/ (starting and ending in /), got {prefix!r}")
    return prefixes


def _webhook_url(value):
    value = value.strip()
    if not value:
        return ""
    # The URL may carry a token in its query: never repeat it in the error.
    why = "expected https://HOST[:PORT]/PATH or http://HOST[:PORT]/PATH"
    parts = _split_url(value, why)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        raise _Invalid(why)
    try:
        parts.port
    except ValueError:
        raise _Invalid(why) from None
    if parts.username or parts.password:
        raise _Invalid("put no credentials in the URL; the body is signed with secret_file")
    return value


def _webhook_events(value):
    events = _words(value.lower())
    if not events:
        raise _Invalid(f"name at least one of {' '.join(WEBHOOK_EVENTS)}")
    for event in events:
        if event not in WEBHOOK_EVENTS:
            raise _Invalid(f"unknown event {event!r}; expected any of {' '.join(WEBHOOK_EVENTS)}")
    return frozenset(events)


@dataclasses.dataclass(frozen=True)
class _Key:
    parse: Callable[[str], Any]
    default: Optional[str]  # None: required
    doc: str


# section -> key -> _Key.  The single source of truth for what chatd reads.
SCHEMA = {
    "server": {
        "endpoint": _Key(_text, None, "Twisted server endpoint of the listening socket"),
        "tls": _Key(_flag, "on", "on: TLS from [tls] on the listener; off: behind a TLS proxy"),
        "allowed_origins": _Key(_origins, None, "exact origins allowed to open /ws; * = any"),
        "access_log": _Key(_flag, "on", "log each HTTP request and accepted WebSocket upgrade (redacted)"),
        "drain_time": _Key(_number(0), "5", "seconds over which SIGTERM closes WebSockets with 1001"),
        "trusted_proxies": _Key(_networks, "", "proxies whose X-Forwarded-For is believed; empty: none"),
        "log_format": _Key(_choice("text", "json"), "text", "text, or json: one object per line"),
    },
    "tls": {
        "certificate": _Key(_path, "", "PEM chain, leaf first"),
        "private_key": _Key(_path, "", "PEM private key"),
    },
    "auth": {
        "algorithms": _Key(_algorithms, "HS256", "JWT algorithm allowlist"),
        "secret_file": _Key(_path, "", "HS*: file holding the shared secret"),
        "public_key_file": _Key(_path, "", "RS*/PS*/ES*/EdDSA: PEM public key"),
        "issuer": _Key(_text, "", "iss, checked when set"),
        "audience": _Key(_text, "", "aud, checked when set"),
        "ticket_ttl": _Key(_integer(1, 3600), "30", "seconds a ticket lives"),
        "ticket_rate": _Key(_number(0.01), "1", "tickets one user may mint per second (10 at once); over it: 429"),
        "leeway": _Key(_integer(0, 300), "0", "seconds of clock skew allowed on exp/nbf/iat"),
    },
    "redis": {
        "url": _Key(_redis_url, "", "empty: embedded broker; redis://HOST:PORT/DB"),
        "password_file": _Key(_path, "", "file holding the Redis password"),
        "timeout": _Key(_number(0.1), "5", "seconds before a Redis call counts as failed"),
        "presence_ttl": _Key(_integer(3, 300), "15", "seconds before a dead instance's users leave"),
    },
    "history": {
        "size": _Key(_integer(0, 100000), "500", "TALK events kept per room for replay"),
        "max_bytes": _Key(_integer(1024), "1048576", "bytes of TALK text kept per room for replay"),
        "ttl": _Key(_integer(1), "86400", "seconds an empty room is kept after its last event"),
    },
    "limits": {
        "max_message_bytes": _Key(_integer(128), "65536", "WebSocket message limit (close 1009)"),
        "max_talk_chars": _Key(_integer(1), "4000", "TALK text limit (ERROR too_large)"),
        "max_rooms_per_connection": _Key(_integer(1), "50", "rooms one connection may be in"),
        "max_rooms": _Key(_integer(1), "10000", "rooms the registry may hold; a new one beyond: ERROR forbidden"),
        "max_new_rooms_per_user": _Key(_integer(1), "100", "rooms held that one user made; a new one beyond: ERROR forbidden"),
        "rate": _Key(_number(0.1), "20", "messages per second a connection may send"),
        "burst": _Key(_integer(1), "40", "messages a connection may send at once"),
        "abuse_strikes": _Key(_integer(1), "50", "rate_limited errors before close 1008"),
        "max_connections": _Key(_integer(1), "10000", "open connections in all"),
        "max_connections_per_ip": _Key(_integer(1), "100", "open connections per client IP"),
        "max_pending_per_ip": _Key(_integer(1), "16", "connections per client IP (IPv6: /64) not yet WebSockets"),
        "max_send_buffer_bytes": _Key(_integer(1024), "4194304", "unsent bytes before close 4008"),
    },
    "websocket": {
        "compression": _Key(_flag, "off", "permessage-deflate"),
        "handshake_timeout": _Key(_number(1), "10", "seconds to finish TLS and the upgrade"),
        "ping_interval": _Key(_number(0), "30", "seconds between pings; 0 = never"),
        "ping_timeout": _Key(_number(1), "20", "seconds to answer a ping"),
    },
    "conformance": {
        "echo": _Key(_flag, "off", "also serve /echo for the Autobahn Testsuite"),
    },
    "stomp": {
        "enabled": _Key(_flag, "on", "STOMP on /ws (v1x.stomp) and at sockjs_path"),
        "sockjs_path": _Key(_sockjs_path, "/ws-stomp", "SockJS (WebSocket only) and plain STOMP endpoint"),
        "connect_auth": _Key(_flag, "off", "also accept a JWT in CONNECT instead of a ticket"),
        "subscribe_prefixes": _Key(_prefixes, "/sub/chat/room/ /topic/", "SUBSCRIBE <prefix><room> = ENTER"),
        "app_prefixes": _Key(_prefixes, "/app/chat/ /pub/chat/room/", "SEND <prefix><room> = TALK"),
        "send_destination": _Key(_destination, "/pub/chat/message", "SEND of JSON {type, roomId, message}"),
    },
    "api": {
        "key_file": _Key(_path, "", "file of server API keys, one per line; empty = /api/ off"),
    },
    "webhook": {
        "url": _Key(_webhook_url, "", "where room events are POSTed; empty = off"),
        "secret_file": _Key(_path, "", "file holding the HMAC-SHA256 signing secret"),
        "events": _Key(_webhook_events, "talk", "which room events to send: talk enter quit"),
        "timeout": _Key(_number(0.1), "10", "seconds one POST may take before it is retried"),
        "max_queue": _Key(_integer(1), "10000", "events waiting to be sent; beyond: oldest batch dropped"),
    },
    "admin": {
        "endpoint": _Key(_text, "", "Twisted endpoint of the plain-HTTP admin listener; empty = off"),
    },
}


def _settings_class(section, keys):
    fields = [(name, Any) for name in keys]
    return dataclasses.make_dataclass(section.capitalize() + "Settings", fields, frozen=True)


_SECTION_CLASSES = {section: _settings_class(section, keys) for section, keys in SCHEMA.items()}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything chatd was configured with; sections are attributes."""

    path: str
    server: Any
    tls: Any
    auth: Any
    redis: Any
    history: Any
    limits: Any
    websocket: Any
    conformance: Any
    stomp: Any
    api: Any
    webhook: Any
    admin: Any
    jwt_key: Any = dataclasses.field(repr=False, default=None)
    redis_password: Optional[str] = dataclasses.field(repr=False, default=None)
    api_keys: Tuple[str, ...] = dataclasses.field(repr=False, default=())
    webhook_secret: bytes = dataclasses.field(repr=False, default=b"")


def defaults(**overrides):
    """
    Settings from the schema's defaults, for tests and tools; C{overrides}
    maps C{"section.key"}-style names (with C{__} for the dot) to values.
    """
    sections = {}
    for section, keys in SCHEMA.items():
        values = {
            key: spec.parse(spec.default) if spec.default is not None else ""
            for key, spec in keys.items()
        }
        sections[section] = values
    for name, value in overrides.items():
        section, key = name.split("__", 1)
        sections[section][key] = value
    built = {s: _SECTION_CLASSES[s](**v) for s, v in sections.items()}
    return Settings(path="<defaults>", **built)


def load(path):
    """
    Read and check the INI file at C{path}.

    @raise ConfigError: on the first problem found.
    """
    parser = configparser.ConfigParser(
        interpolation=None, inline_comment_prefixes=(";", "#"), strict=True
    )
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: editors that write a BOM
            parser.read_file(f, source=path)
    except FileNotFoundError:
        raise ConfigError(path, None, None, "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, None, None, f"cannot read: {e}") from None
    except configparser.Error as e:
        raise ConfigError(path, None, None, " ".join(str(e).split())) from None
    return _from_parser(path, parser)


def _from_parser(path, parser):
    if parser.defaults():
        # configparser copies [DEFAULT] keys into every section; refused
        # here, or they would be blamed on the first real section.
        raise ConfigError(path, parser.default_section, None, "unknown section")
    for section in parser.sections():
        if section not in SCHEMA:
            raise ConfigError(path, section, None, "unknown section")
        for key in parser[section]:
            if key not in SCHEMA[section]:
                raise ConfigError(path, section, key, "unknown key")
    sections = {}
    for section, keys in SCHEMA.items():
        values = {}
        for key, spec in keys.items():
            raw = parser.get(section, key, fallback=None)
            if raw is None or (not raw.strip() and spec.default is None):
                if spec.default is None:
                    raise ConfigError(path, section, key, "missing (required)")
                raw = spec.default
            try:
                values[key] = spec.parse(raw)
            except _Invalid as e:
                raise ConfigError(path, section, key, str(e)) from None
        sections[section] = _SECTION_CLASSES[section](**values)
    settings = Settings(path=path, **sections)
    return _check_together(settings)


def _check_stomp(path, stomp):
    """Every STOMP destination has one meaning: topics, app rooms and sends never overlap."""
    from chatd.stomp.mapping import AUTH_DESTINATION

    if not stomp.subscribe_prefixes:
        raise ConfigError(path, "stomp", "subscribe_prefixes", "name at least one prefix, like /topic/")
    for key in ("subscribe_prefixes", "app_prefixes"):
        for prefix in getattr(stomp, key):
            if AUTH_DESTINATION.startswith(prefix):
                raise ConfigError(path, "stomp", key, f"{prefix} would take {AUTH_DESTINATION} (AUTH renewal)")
    for app in stomp.app_prefixes:
        for topic in stomp.subscribe_prefixes:
            if app.startswith(topic) or topic.startswith(app):
                raise ConfigError(path, "stomp", "app_prefixes", f"{app} overlaps subscribe prefix {topic}")
    send = stomp.send_destination
    if send == AUTH_DESTINATION:
        raise ConfigError(path, "stomp", "send_destination", f"{send} is the AUTH renewal destination")
    for topic in stomp.subscribe_prefixes:
        if send.startswith(topic):
            raise ConfigError(path, "stomp", "send_destination", f"{send} is under subscribe prefix {topic}")


def _read_file(settings, section, key, what):
    filename = getattr(getattr(settings, section), key)
    if not filename:
        raise ConfigError(settings.path, section, key, f"missing (required for {what})")
    try:
        with open(filename, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError(settings.path, section, key, f"no such file: {filename}") from None
    except OSError as e:
        raise ConfigError(settings.path, section, key, f"cannot read {filename}: {e.strerror}") from None


def _check_together(settings):
    """Rules that span keys; also reads the secrets so a bad one fails now."""
    path = settings.path
    if settings.server.tls:
        _read_file(settings, "tls", "certificate", "tls = on")
        _read_file(settings, "tls", "private_key", "tls = on")
    if not settings.server.allowed_origins:
        raise ConfigError(path, "server", "allowed_origins", "name at least one origin, or *")
    _check_stomp(path, settings.stomp)

    jwt_key = read_jwt_key(settings)

    redis_password = None
    if settings.redis.password_file:
        redis_password = _read_file(settings, "redis", "password_file", "a Redis password")
        redis_password = redis_password.decode("utf-8", "replace").strip()
    if settings.redis.url and urlsplit(settings.redis.url).password:
        # Inline passwords end up in process listings and backups.
        raise ConfigError(path, "redis", "url", "put the password in password_file, not the URL")
    return dataclasses.replace(
        settings,
        jwt_key=jwt_key,
        redis_password=redis_password,
        api_keys=_api_keys(settings),
        webhook_secret=_webhook_secret(settings),
    )


def _api_keys(settings):
    """
    The server API keys, one per line (several allow rotation); blank lines
    and C{#} comments are skipped.  A problem names the line, never the key.
    """
    if not settings.api.key_file:
        return ()
    raw = _read_file(settings, "api", "key_file", "the server API")
    filename = settings.api.key_file
    keys = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        try:
            key = line.decode("ascii")
        except UnicodeDecodeError:
            key = None
        if key is None or not key.isprintable() or " " in key or "\t" in key:
            why = f"{filename} line {number}: a key is printable ASCII without spaces"
            raise ConfigError(settings.path, "api", "key_file", why)
        if len(key) < MIN_API_KEY_CHARS:
            why = f"{filename} line {number}: key is {len(key)} characters; at least {MIN_API_KEY_CHARS}"
            raise ConfigError(settings.path, "api", "key_file", why)
        keys.append(key)
    if not keys:
        raise ConfigError(settings.path, "api", "key_file", f"{filename} holds no key")
    return tuple(keys)


def _webhook_secret(settings):
    if not settings.webhook.url:
        return b""
    secret = _read_file(settings, "webhook", "secret_file", "a webhook url").strip()
    if len(secret) < MIN_WEBHOOK_SECRET_BYTES:
        why = f"secret is {len(secret)} bytes; at least {MIN_WEBHOOK_SECRET_BYTES}"
        raise ConfigError(settings.path, "webhook", "secret_file", why)
    return secret


def read_jwt_key(settings):
    """
    The JWT verification key from C{[auth] secret_file} or
    C{public_key_file}, checked.  Also what a SIGHUP reload calls.

    @raise ConfigError: naming the key and why the file is refused.
    """
    path = settings.path
    algorithms = settings.auth.algorithms
    if algorithms[0] in HS_ALGORITHMS:
        secret = _read_file(settings, "auth", "secret_file", algorithms[0]).strip()
        need, longest = max((MIN_HS_SECRET_BYTES[name], name) for name in algorithms)
        if len(secret) < need:
            raise ConfigError(
                path, "auth", "secret_file", f"secret is {len(secret)} bytes; {longest} needs at least {need}"
            )
        why = "holds a key or certificate (PEM, SSH or DER), which PyJWT refuses as an HS* secret"
        return _suited_key(path, "secret_file", secret, algorithms, why)
    pem = _read_file(settings, "auth", "public_key_file", algorithms[0])
    if b"PRIVATE KEY" in pem:
        raise ConfigError(path, "auth", "public_key_file", "holds a private key; give the public key")
    if b"PUBLIC KEY" not in pem and b"CERTIFICATE" not in pem:
        raise ConfigError(path, "auth", "public_key_file", "not a PEM public key")
    return _public_key(path, pem, algorithms)


def _public_key(path, pem, algorithms):
    """
    The PEM as PyJWT takes it, checked now against every allowed algorithm:
    a certificate becomes its public key (PyJWT reads no certificates), and
    a key of the wrong type would otherwise fail every token at run time.
    """
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    why = f"not a PEM public key for {' '.join(algorithms)}"
    if b"-----BEGIN CERTIFICATE-----" in pem:
        try:
            pem = x509.load_pem_x509_certificate(pem).public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        except (UnsupportedAlgorithm, ValueError, TypeError):
            raise ConfigError(path, "auth", "public_key_file", why) from None
    pem = _suited_key(path, "public_key_file", pem, algorithms, why)
    bits = getattr(serialization.load_pem_public_key(pem), "key_size", None)
    if algorithms[0][:2] in ("RS", "PS") and bits is not None and bits < MIN_RSA_KEY_BITS:
        # PyJWT only warns (InsecureKeyLengthWarning) on each token.
        raise ConfigError(
            path, "auth", "public_key_file", f"RSA key of {bits} bits; at least {MIN_RSA_KEY_BITS}"
        )
    return pem


def _suited_key(path, key_name, key, algorithms, why):
    """
    C{key}, tried once with every allowed algorithm as PyJWT will use it
    on each token: PyJWT refuses a key unsuited to the algorithm (a public
    key or certificate as an HS* secret, an EC key for RS256) with
    C{InvalidKeyError} only when a token comes.

    @raise ConfigError: naming C{[auth] key_name}, with C{why}.
    """
    import jwt
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        for name in algorithms:
            jwt.get_algorithm_by_name(name).prepare_key(key)
    except (jwt.InvalidKeyError, UnsupportedAlgorithm, ValueError, TypeError):
        raise ConfigError(path, "auth", key_name, why) from None
    return key


def replace(settings, **changes):
    """
    A copy of C{settings} with C{section__key=value} changes, for tests.
    """
    by_section = {}
    for name, value in changes.items():
        section, key = name.split("__", 1)
        by_section.setdefault(section, {})[key] = value
    updated = {
        section: dataclasses.replace(getattr(settings, section), **values)
        for section, values in by_section.items()
    }
    return dataclasses.replace(settings, **updated)
