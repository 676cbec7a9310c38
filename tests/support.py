"""
Shared test kit: real processes (twistd chatd, redis-server) on free
loopback ports, stopped by PID; a real WebSocket client over real TLS; JWT
and HTTP helpers.  Every wait here has a deadline.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jwt
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
RECV_TIMEOUT = 5.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what, interval=0.05):
    """Poll C{predicate} until it returns something true, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def client_tls():
    """A client context for the test certificate (self-signed, localhost)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def websockets_tls():
    """
    The client TLS context for the websockets library's (threaded) sync
    client in the tests: TLS 1.2.

    Over TLS 1.3 that client intermittently loses its upgrade request: it
    starts its reader thread before writing the request on the same
    SSLSocket, and the server's post-handshake NewSessionTicket arrives in
    between (compare python-websockets/websockets#1648).  chatd then sees a
    TLS connection that never sends a request, and rightly drops it after
    handshake_timeout.  Measured here: about 1 upgrade in 200-500 stalls
    over TLS 1.3, none in 900 over TLS 1.2.  The tests using it are about
    chat, not TLS versions: HTTP and the single-threaded raw client
    (tests/rawws.py) still use TLS 1.3, and tests/test_tls.py checks the
    versions the server accepts.
    """
    context = client_tls()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def make_dev_files(directory):
    """Certificate, key and JWT secret as `make run` creates them."""
    subprocess.run(
        [sys.executable, "-m", "chatd", "devcert", directory], check=True, capture_output=True
    )
    subprocess.run(
        [sys.executable, "-m", "chatd", "devsecret", os.path.join(directory, "jwt.secret")],
        check=True, capture_output=True,
    )
    with open(os.path.join(directory, "jwt.secret"), "rb") as f:
        return f.read().strip()


def write_config(path, sections):
    with open(path, "w") as f:
        for section, keys in sections.items():
            f.write(f"[{section}]\n")
            for key, value in keys.items():
                f.write(f"{key} = {value}\n")
            f.write("\n")


def stop_pid(proc, timeout=STOP_TIMEOUT):
    """SIGTERM, then SIGKILL after C{timeout}; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode



def alive(pid):
    """True while C{pid} is a running (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class Chatd:
    """One real `twistd -n chatd` process with its own config and log."""

    def __init__(self, workdir, dev_dir, secret, name="chatd", **overrides):
        self.workdir = workdir
        self.secret = secret
        self.port = free_port()
        self.config_path = os.path.join(workdir, f"{name}.ini")
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.sections = {
            "server": {
                "endpoint": f"tcp:{self.port}:interface=127.0.0.1",
                "tls": "on",
                "allowed_origins": f"https://localhost:{self.port}",
            },
            "tls": {
                "certificate": os.path.join(dev_dir, "fullchain.pem"),
                "private_key": os.path.join(dev_dir, "privkey.pem"),
            },
            "auth": {"algorithms": "HS256", "secret_file": os.path.join(dev_dir, "jwt.secret")},
        }
        for name_, value in overrides.items():
            section, key = name_.split("__", 1)
            self.sections.setdefault(section, {})[key] = value
        self.proc = None

    @property
    def tls(self):
        return self.sections["server"].get("tls", "on") == "on"

    @property
    def base(self):
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ws_base(self):
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}"

    def start(self, wait=True, env=None, wrapper=()):
        """
        @param env: extra environment variables (NOTIFY_SOCKET, say).
        @param wrapper: argv put before twistd's (systemd-socket-activate, say).
        """
        write_config(self.config_path, self.sections)
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*wrapper, TWISTD, "-n", "--pidfile=", "chatd", "--config", self.config_path],
            cwd=self.workdir, stdout=self.log, stderr=subprocess.STDOUT,
            env=dict(os.environ, **(env or {})),
        )
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=START_TIMEOUT):
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"chatd exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                return http("GET", self.base + "/healthz", timeout=1)[0] in (200, 503)
            except OSError:
                return False

        wait_for(up, timeout, f"chatd on port {self.port}")

    def stop(self):
        if self.proc is not None:
            status = stop_pid(self.proc)
            self.log.close()
            return status

    def kill(self):
        """kill -9: no goodbye."""
        self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)
        self.log.close()

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def token(self, sub, ttl=3600, **claims):
        return mint_token(self.secret, sub, ttl=ttl, **claims)

    def ticket(self, sub, **claims):
        status, _, body = http("POST", self.base + "/auth/ticket", token=self.token(sub, **claims))
        assert status == 200, (status, body)
        return body["ticket"]

    def connect(self, sub=None, ticket=None, origin=None, subprotocols=("chatd.v1",), **claims):
        """A L{Client}: connected, WELCOME read."""
        if ticket is None:
            ticket = self.ticket(sub, **claims)
        client = Client(ws_open(self.ws_base + "/ws?ticket=" + ticket, origin, subprotocols))
        client.welcome = client.recv()
        assert client.welcome["type"] == "WELCOME", client.welcome
        return client


def mint_token(secret, sub, ttl=3600, algorithm="HS256", **claims):
    now = int(time.time())
    payload = {"sub": sub, "iat": now, "exp": now + ttl}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, secret, algorithm=algorithm)


def http(method, url, token=None, body=None, headers=None, timeout=RECV_TIMEOUT):
    """One request; returns (status, headers, parsed JSON or raw bytes)."""
    request = urllib.request.Request(url, method=method, data=body, headers=dict(headers or {}))
    if token is not None:
        request.add_header("Authorization", "Bearer " + token)
    context = client_tls() if url.startswith("https") else None
    try:
        response = urllib.request.urlopen(request, context=context, timeout=timeout)
    except urllib.error.HTTPError as e:
        response = e
    with response:
        raw = response.read()
        content_type = response.headers.get("content-type", "")
        data = json.loads(raw) if "json" in content_type else raw
        return response.status, response.headers, data


def ws_open(url, origin=None, subprotocols=("chatd.v1",), max_size=2**24, **options):
    """
    A WebSocket to C{url}: the one way the tests open one.  C{options} go to
    websockets' C{connect} (C{sock}, C{server_hostname}, C{additional_headers}).
    """
    return connect(
        url,
        ssl=websockets_tls() if url.startswith("wss") else None,
        origin=origin,
        subprotocols=list(subprotocols) if subprotocols else None,
        open_timeout=RECV_TIMEOUT,
        close_timeout=RECV_TIMEOUT,
        max_size=max_size,
        ping_interval=None,
        # A plain connection object, closed by the tests.  Without it,
        # websockets >= 17.1 warns (DeprecationWarning) at the first recv
        # that connect() must be a context manager.
        legacy=True,
        **options,
    )


def ws_refusal(url, origin=None):
    """The HTTP status a refused upgrade was answered with."""
    try:
        ws = ws_open(url, origin)
    except InvalidStatus as e:
        return e.response.status_code
    ws.close()
    raise AssertionError(f"{url} was upgraded")


class Client:
    """A chatd.v1 client on a real WebSocket connection."""

    def __init__(self, ws):
        self.ws = ws

    def send(self, frame):
        self.ws.send(json.dumps(frame) if isinstance(frame, dict) else frame)

    def recv(self, timeout=RECV_TIMEOUT):
        return json.loads(self.ws.recv(timeout=timeout))

    def recv_until(self, predicate, timeout=RECV_TIMEOUT, limit=1000):
        """Frames up to and including the first that matches; bounded."""
        seen = []
        deadline = time.monotonic() + timeout
        for _ in range(limit):
            frame = self.recv(max(0.01, deadline - time.monotonic()))
            seen.append(frame)
            if predicate(frame):
                return seen
        raise AssertionError(f"no matching frame in {limit}: {seen[-5:]}")

    def request(self, frame, timeout=RECV_TIMEOUT):
        """Send C{frame} with a fresh ref; return the first frame echoing it."""
        self._ref = getattr(self, "_ref", 0) + 1
        ref = f"t{self._ref}"
        self.send(dict(frame, ref=ref))
        return self.recv_until(lambda f: f.get("ref") == ref, timeout)[-1]

    def enter(self, room, since=None):
        frame = {"type": "ENTER", "room": room}
        if since is not None:
            frame["since"] = since
        return self.request(frame)

    def talk(self, room, message, **extra):
        return self.request(dict({"type": "TALK", "room": room, "message": message}, **extra))

    def quiet(self, timeout=0.3):
        """True when nothing arrives within C{timeout} (a bounded negative check)."""
        try:
            frame = self.ws.recv(timeout=timeout)
        except TimeoutError:
            return True
        raise AssertionError(f"unexpected frame: {frame}")

    def closed_with(self, timeout=RECV_TIMEOUT, limit=1000):
        """Read until the server closes; return its close code."""
        deadline = time.monotonic() + timeout
        try:
            for _ in range(limit):
                self.ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        except ConnectionClosed as e:
            return e.rcvd.code if e.rcvd is not None else None
        raise AssertionError("connection stayed open")

    def close(self):
        with contextlib.suppress(Exception):
            self.ws.close()


class Redis:
    """A private redis-server on a free loopback port, no persistence."""

    def __init__(self, workdir, port=None):
        self.workdir = workdir
        self.port = port or free_port()
        self.proc = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        binary = shutil.which("redis-server")
        if binary is None:
            raise AssertionError("redis-server is not installed: run `make test`")
        self.log = open(os.path.join(self.workdir, f"redis-{self.port}.log"), "ab")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.workdir, "--protected-mode", "yes"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_for(self.ping, START_TIMEOUT, f"redis-server on port {self.port}")
        return self

    def ping(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            if self.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGCONT)
            stop_pid(self.proc)
            self.log.close()


NGINX_SITE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "nginx", "chatd.conf")


class Nginx:
    """
    Debian's nginx running the shipped etc/nginx/chatd.conf on a free
    loopback port, in front of a chatd on C{upstream_port}.  Only names,
    ports and paths of the shipped file are changed, each exactly once, so
    the file under test is the file shipped.
    """

    def __init__(self, workdir, upstream_port, certificate, private_key):
        self.workdir = os.path.join(workdir, "nginx")
        self.port = free_port()
        self.upstream_port = upstream_port
        self.certificate = certificate
        self.private_key = private_key
        self.proc = None

    @staticmethod
    def binary():
        found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
        if found is None:
            raise AssertionError("nginx is not installed: run `make test` (system-deps)")
        return found

    @property
    def base(self):
        return f"https://127.0.0.1:{self.port}"

    @property
    def ws_base(self):
        return f"wss://127.0.0.1:{self.port}"

    def site_config(self):
        with open(NGINX_SITE) as f:
            text = f.read()
        for old, new in [
            ("server 127.0.0.1:8080;", f"server 127.0.0.1:{self.upstream_port};"),
            ("listen 443 ssl;", f"listen 127.0.0.1:{self.port} ssl;"),
            ("listen [::]:443 ssl;", ""),
            ("/etc/letsencrypt/live/chat.example.com/fullchain.pem", self.certificate),
            ("/etc/letsencrypt/live/chat.example.com/privkey.pem", self.private_key),
            ("/var/log/nginx/chatd.access.log", os.path.join(self.workdir, "access.log")),
        ]:
            assert text.count(old) == 1, f"etc/nginx/chatd.conf no longer has {old!r} once"
            text = text.replace(old, new)
        return text

    def write(self):
        os.makedirs(os.path.join(self.workdir, "tmp"), exist_ok=True)
        site = os.path.join(self.workdir, "chatd.conf")
        with open(site, "w") as f:
            f.write(self.site_config())
        self.conf = os.path.join(self.workdir, "nginx.conf")
        tmp = os.path.join(self.workdir, "tmp")
        with open(self.conf, "w") as f:
            f.write(
                "daemon off;\n"
                "user root;\n"  # the workers read the temp dirs under pytest's 0700 tmp
                "worker_processes 1;\n"
                f"pid {self.workdir}/nginx.pid;\n"
                f"error_log {self.workdir}/error.log info;\n"
                "events { worker_connections 512; }\n"
                "http {\n"
                f"  access_log {self.workdir}/http-access.log;\n"
                f"  client_body_temp_path {tmp}/body;\n"
                f"  proxy_temp_path {tmp}/proxy;\n"
                f"  fastcgi_temp_path {tmp}/fastcgi;\n"
                f"  uwsgi_temp_path {tmp}/uwsgi;\n"
                f"  scgi_temp_path {tmp}/scgi;\n"
                f"  include {site};\n"
                "}\n"
            )
        return self.conf

    def check(self):
        """C{nginx -t} on the written configuration: (status, output)."""
        self.write()
        proc = subprocess.run(
            [self.binary(), "-t", "-p", self.workdir, "-e", os.path.join(self.workdir, "error.log"),
             "-c", self.conf],
            capture_output=True, text=True, timeout=30,
        )
        return proc.returncode, proc.stdout + proc.stderr

    def start(self):
        self.write()
        self.log = open(os.path.join(self.workdir, "nginx.out"), "ab")
        self.proc = subprocess.Popen(
            [self.binary(), "-p", self.workdir, "-e", os.path.join(self.workdir, "error.log"),
             "-c", self.conf],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

        def listening():
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited {self.proc.returncode}: {self.error_log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(listening, START_TIMEOUT, f"nginx on port {self.port}")
        return self

    def error_log(self):
        with contextlib.suppress(OSError), open(os.path.join(self.workdir, "error.log")) as f:
            return f.read()
        return ""

    def stop(self):
        if self.proc is not None:
            stop_pid(self.proc)
            self.log.close()


# --- real STOMP clients in Node (tests/stomp-clients, installed by `make test`) ---

STOMP_CLIENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stomp-clients")


class StompAgent:
    """
    A real STOMP client in Node (tests/stomp-clients/agent.js): @stomp/stompjs
    7 over ws, or stompjs 2.3.3 over sockjs-client.  Driven by one JSON line
    per command; its events are read by a thread into a queue, so every wait
    has a deadline.  TLS is verified against the tests' certificate.  Stopped
    by PID.

    @ivar raw: the frames as the client logged them (C{">>> ..."} sent,
        C{"<<< ..."} received), in order.
    """

    def __init__(self, lib, url, ca_file, log_path, protocols=None):
        import queue
        import threading

        node = shutil.which("node")
        if node is None or not os.path.isdir(os.path.join(STOMP_CLIENTS, "node_modules")):
            raise AssertionError("Node or the STOMP clients are missing: run `make test` (npm ci)")
        options = {"lib": lib, "url": url}
        if protocols is not None:
            options["protocols"] = list(protocols)
        self.raw = []
        self.events = queue.Queue()
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [node, "agent.js", json.dumps(options)], cwd=STOMP_CLIENTS,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            env=dict(os.environ, NODE_EXTRA_CA_CERTS=ca_file),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.next("ready", timeout=START_TIMEOUT)

    def _read(self):
        for line in self.proc.stdout:
            event = json.loads(line)
            if event["ev"] == "raw":
                self.raw.append(event["text"])
            else:
                self.events.put(event)
        self.events.put({"ev": "exited"})

    def do(self, op, **fields):
        """Send one command to the client."""
        self.proc.stdin.write((json.dumps(dict(fields, op=op)) + "\n").encode())
        self.proc.stdin.flush()

    def next(self, kind=None, timeout=RECV_TIMEOUT):
        """The next event (of C{kind}, when given: others before it fail the test)."""
        import queue

        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {kind or 'event'} from the STOMP client in {timeout}s") from None
        if event["ev"] == "exception" or (kind is not None and event["ev"] != kind):
            raise AssertionError(f"expected {kind}, got {event}")
        return event

    def until(self, predicate, timeout=RECV_TIMEOUT, limit=1000):
        """Events up to and including the first that matches; bounded."""
        seen = []
        deadline = time.monotonic() + timeout
        for _ in range(limit):
            event = self.next(timeout=max(0.01, deadline - time.monotonic()))
            if event["ev"] == "message":
                event = dict(event, body=json.loads(event["body"]))
            seen.append(event)
            if predicate(event):
                return seen
        raise AssertionError(f"no matching event in {limit}: {seen[-5:]}")

    def quiet(self, timeout=0.3):
        """True when no event arrives within C{timeout} (a bounded negative check)."""
        import queue

        try:
            event = self.events.get(timeout=timeout)
        except queue.Empty:
            return True
        raise AssertionError(f"unexpected event: {event}")

    def messages(self, count, timeout=RECV_TIMEOUT):
        """The next C{count} MESSAGE events, bodies parsed."""
        got = []
        for _ in range(count):
            event = self.next("message", timeout)
            got.append(dict(event, body=json.loads(event["body"])))
        return got

    def stop(self):
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.do("exit")
        status = stop_pid(self.proc)
        self._log.close()
        return status
