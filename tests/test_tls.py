# -*- test-case-name: tests.test_tls -*-
"""
chatd's TLS against Mozilla's "intermediate" profile, checked by sslyze
(the scanner, from PyPI) against a real twistd chatd on loopback.

sslyze pins cryptography < 47 and its own OpenSSL build (nassl), which clash
with chatd's cryptography, so it lives in its own venv, C{.venv-sslyze}
(made by C{make sslyze} or, if missing, by this module) and runs as a
subprocess.  Its Mozilla check needs a certificate it can validate: the test
makes a small CA and a leaf signed by it, and hands sslyze the CA.
"""

import datetime
import fcntl
import ipaddress
import json
import os
import subprocess
import sys
import warnings

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st
from OpenSSL import SSL
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import error, protocol, ssl, task
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test import iosim

from chatd import config, tls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SSLYZE_VENV = os.path.join(ROOT, ".venv-sslyze")
SSLYZE_REQUIREMENTS = os.path.join(ROOT, "tests", "sslyze-requirements.txt")
INSTALL_TIMEOUT = 600
SCAN_TIMEOUT = 180

# Mozilla intermediate (v5.7, the profile sslyze 6.3 ships), IANA names.
INTERMEDIATE_TLS12 = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
    "TLS_DHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_DHE_RSA_WITH_AES_256_GCM_SHA384",
    "TLS_DHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
}
INTERMEDIATE_TLS13 = {"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"}
INTERMEDIATE_CURVES = {"X25519", "secp256r1", "secp384r1"}


def sslyze_python():
    """The venv's python, making the venv first if needed (once, under a lock)."""
    python = os.path.join(SSLYZE_VENV, "bin", "python")
    with open(os.path.join(ROOT, ".venv-sslyze.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        probe = [python, "-c", "import sslyze"]
        if os.path.exists(python) and subprocess.run(probe, capture_output=True, timeout=60).returncode == 0:
            return python
        steps = [
            [sys.executable, "-m", "venv", "--clear", SSLYZE_VENV],
            [python, "-m", "pip", "install", "-q", "-r", SSLYZE_REQUIREMENTS],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
            if done.returncode != 0:
                pytest.fail(f"could not set up sslyze ({' '.join(step)}):\n{done.stdout}\n{done.stderr}")
        open(os.path.join(SSLYZE_VENV, ".installed"), "w").close()  # the Makefile's stamp
    return python


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_pki(directory):
    """
    A CA and a localhost leaf it signed (ECDSA P-256, 90 days, the usual
    extensions), as PEM files; returns (ca, chain, key) paths.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("chatd test CA"))
        .issuer_name(_name("chatd test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=90))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {name: os.path.join(directory, name) for name in ("ca.pem", "fullchain.pem", "privkey.pem")}
    with open(paths["ca.pem"], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths["fullchain.pem"], "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(os.open(paths["privkey.pem"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return paths["ca.pem"], paths["fullchain.pem"], paths["privkey.pem"]


def accepted(scan, version):
    return {c["cipher_suite"]["name"] for c in scan[f"{version}_cipher_suites"]["result"]["accepted_cipher_suites"]}


def test_groups_are_limited_to_the_profile(tmp_path):
    """certificate_options restricts key exchange to X25519, P-256 and P-384."""
    _, chain, key = make_pki(str(tmp_path))
    settings = config.replace(config.defaults(), tls__certificate=chain, tls__private_key=key)
    assert tls.certificate_options(settings).groups == "X25519:P-256:P-384"


def _refusal(tmp_path, **files):
    """The ConfigError certificate_options raises for C{files} (tls__certificate/private_key), from chatd.ini."""
    import dataclasses

    settings = dataclasses.replace(config.replace(config.defaults(), **files), path=str(tmp_path / "chatd.ini"))
    with pytest.raises(config.ConfigError) as info:
        tls.certificate_options(settings)
    error = info.value
    assert str(error) == f"{tmp_path / 'chatd.ini'}: [{error.section}] {error.key}: {error.why}"
    assert "\n" not in str(error)
    return error


def test_unreadable_private_key_names_file_section_key_and_uid(tmp_path):
    """
    A private key that exists but cannot be read (as the service user, on
    a reload after --uid; here a directory, since root reads any file) is
    one line naming chatd.ini, [tls] private_key, the key's file and the uid.
    """
    _, chain, _ = make_pki(str(tmp_path))
    unreadable = tmp_path / "unreadable.pem"
    unreadable.mkdir(mode=0o700)
    error = _refusal(tmp_path, tls__certificate=chain, tls__private_key=str(unreadable))
    assert (error.section, error.key) == ("tls", "private_key")
    assert error.why == f"cannot read {unreadable} as uid {os.geteuid()}: Is a directory"


@pytest.mark.parametrize("damage", ["truncated", "altered"])
def test_unparsable_private_key_is_named_never_echoed(tmp_path, damage):
    """A key file that is read but does not parse names [tls] private_key, and no line of the key."""
    _, chain, key = make_pki(str(tmp_path))
    with open(key, "rb") as f:
        pem = f.read()
    lines = pem.splitlines()
    if damage == "truncated":
        broken = b"\n".join(lines[:-2]) + b"\n"
    else:  # one character of the PKCS#8 header, the same bytes in every P-256 key
        body = lines[1]
        broken = b"\n".join([lines[0], body[:10] + (b"A" if body[10:11] != b"A" else b"B") + body[11:]] + lines[2:])
    with open(key, "wb") as f:
        f.write(broken)
    error = _refusal(tmp_path, tls__certificate=chain, tls__private_key=key)
    assert (error.section, error.key) == ("tls", "private_key")
    assert error.why == "not a valid, unencrypted PEM private key"
    for line in lines[1:-1]:
        assert line[:16].decode() not in str(error)


@pytest.mark.parametrize("content, why", [
    (b"not a certificate\n", "no PEM certificate in the file"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a valid PEM certificate"),
])
def test_unparsable_certificate_is_named(tmp_path, content, why):
    """A certificate file that is read but does not parse names [tls] certificate, and says why."""
    _, chain, key = make_pki(str(tmp_path))
    with open(chain, "wb") as f:
        f.write(content)
    error = _refusal(tmp_path, tls__certificate=chain, tls__private_key=key)
    assert (error.section, error.key, error.why) == ("tls", "certificate", why)


def test_tls13_prefers_aes_128(tmp_path):
    """
    A TLS 1.3 client that offers OpenSSL's default order (AES-256 first)
    gets TLS_AES_128_GCM_SHA256, the server's preference; a client that
    offers only AES-256 still gets it.
    """
    _, chain, key = make_pki(str(tmp_path))
    settings = config.replace(config.defaults(), tls__certificate=chain, tls__private_key=key)
    server_context = tls.certificate_options(settings).getContext()

    def negotiated(suites=None):
        client_context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        if suites is not None:
            client_context.set_tls13_ciphersuites(suites)
        server = SSL.Connection(server_context, None)
        server.set_accept_state()
        client = SSL.Connection(client_context, None)
        client.set_connect_state()
        for _ in range(10):  # a TLS 1.3 handshake takes two flights each way
            for source, sink in ((client, server), (server, client)):
                try:
                    source.do_handshake()
                except SSL.WantReadError:
                    pass
                try:
                    sink.bio_write(source.bio_read(65536))
                except SSL.WantReadError:
                    pass
        assert server.get_protocol_version_name() == "TLSv1.3"
        return server.get_cipher_name()

    assert negotiated() == "TLS_AES_128_GCM_SHA256"
    assert negotiated(b"TLS_AES_256_GCM_SHA384") == "TLS_AES_256_GCM_SHA384"


class _Recorder(protocol.Protocol):
    """Keeps what it receives and whether its connection was lost."""

    def __init__(self):
        self.received = b""
        self.lost = False

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = True


class _TLSPairs:
    """Server connections of one L{tls.CoalescingTLSFactory}, each with a TLS client, in memory."""

    def __init__(self, tmp_path):
        _, chain, key = make_pki(str(tmp_path))
        settings = config.replace(config.defaults(), tls__certificate=chain, tls__private_key=key)
        self.clock = task.Clock()
        self.factory = tls.CoalescingTLSFactory(
            tls.certificate_options(settings), protocol.Factory.forProtocol(_Recorder), self.clock
        )
        self.client_factory = TLSMemoryBIOFactory(
            ssl.CertificateOptions(), True, protocol.Factory.forProtocol(_Recorder), self.clock
        )

    def connect(self):
        """
        @return: (server TLS protocol, client app, pump, underlying server
            writes) once the handshake is over; each underlying write is
            what one TLS write produced.
        """
        client, server, pump = iosim.connectedServerAndClient(
            lambda: self.factory.buildProtocol(None), lambda: self.client_factory.buildProtocol(None),
            clock=self.clock,
        )
        pump.flush()
        assert server.wrappedProtocol.transport is server  # the handshake is over
        writes = []
        write = server.transport.write
        server.transport.write = lambda data: (writes.append(data), write(data))
        return server, client.wrappedProtocol, pump, writes


def test_server_connection_provides_what_its_transport_does(tmp_path):
    """
    The TLS server protocol declares its transport's interfaces as Twisted's
    does (twisted.web asks for ISSLTransport, Autobahn for the TCP ones),
    its application is connected once, over TLS, and the handshake runs.
    """
    from twisted.internet.interfaces import ISSLTransport, ITCPTransport
    from zope.interface import providedBy

    pairs = _TLSPairs(tmp_path)
    server, client, pump, _ = pairs.connect()
    assert set(providedBy(server.transport)) <= set(providedBy(server))
    assert ISSLTransport.providedBy(server) and ITCPTransport.providedBy(server)
    assert server.wrappedProtocol.transport is server and pairs.factory.protocols == {server: 1}
    server.write(b"hello")
    pump.flush()
    assert client.received == b"hello"


def test_writes_of_one_turn_are_one_tls_write(tmp_path):
    """Three writes in one reactor turn reach the peer in order, as one TLS write at the next turn."""
    server, client, pump, writes = _TLSPairs(tmp_path).connect()
    for part in (b"one ", b"two ", b"three"):
        server.write(part)
    assert writes == []  # not before the turn ends
    pump.flush()
    assert client.received == b"one two three"
    assert len(writes) == 1


def test_one_timer_for_every_connection_written_to(tmp_path):
    """Connections written to in one turn are flushed by one delayed call, not one each."""
    pairs = _TLSPairs(tmp_path)
    connections = [pairs.connect() for _ in range(3)]
    for server, *_ in connections:
        server.write(b"event")
        server.write(b" and another")
    assert len(pairs.clock.getDelayedCalls()) == 1
    for _, client, pump, writes in connections:
        pump.flush()
        assert client.received == b"event and another" and len(writes) == 1


def test_flush_now_writes_the_turn_so_far(tmp_path):
    """
    flush_now writes each connection's writes so far as one TLS write, at
    once; writes after it in the same turn are one more write, at the
    turn's end, after the first.
    """
    pairs = _TLSPairs(tmp_path)
    connections = [pairs.connect() for _ in range(2)]
    for server, *_ in connections:
        server.write(b"one ")
        server.write(b"two ")
    pairs.factory.turn.flush_now()
    assert [len(writes) for *_, writes in connections] == [1, 1]
    connections[0][0].write(b"three")
    for _, client, pump, writes in connections:
        pump.flush()
    assert [client.received for _, client, *_ in connections] == [b"one two three", b"one two "]
    assert [len(writes) for *_, writes in connections] == [2, 1]


def test_close_after_writes_goes_last(tmp_path):
    """loseConnection in the turn of the writes sends them first, then closes."""
    server, client, pump, writes = _TLSPairs(tmp_path).connect()
    server.write(b"last words, ")
    server.write(b"then the close frame")
    server.loseConnection()
    pump.flush()
    assert client.received == b"last words, then the close frame"
    assert client.lost


def test_over_the_pending_limit_writes_at_once(tmp_path):
    """Pending bytes over MAX_PENDING are written at once, not held for the turn."""
    server, client, pump, writes = _TLSPairs(tmp_path).connect()
    server.write(b"x" * 1000)
    assert writes == []
    server.write(b"y" * tls.CoalescingTLSProtocol.MAX_PENDING)
    assert writes != []
    server.write(b"z")
    pump.flush()
    assert client.received == b"x" * 1000 + b"y" * tls.CoalescingTLSProtocol.MAX_PENDING + b"z"


def test_writes_after_the_connection_is_lost_are_dropped(tmp_path):
    """A write to a lost connection is dropped and schedules nothing."""
    pairs = _TLSPairs(tmp_path)
    server, client, pump, writes = pairs.connect()
    server.loseConnection()
    pump.flush()
    assert client.lost
    server.write(b"too late")
    assert pairs.clock.getDelayedCalls() == []


class _RawClient:
    """
    A TLS server protocol of a factory on a C{StringTransport}, and a
    pyOpenSSL client on memory BIOs, handshaken: the test decides where TLS
    records begin and end and how the bytes are cut into reads.
    """

    def __init__(self, server_factory, clock, version=None, finish=True):
        """
        @param version: the highest TLS version the client offers
            (C{SSL.TLS1_2_VERSION}, ...); L{None}: OpenSSL's (TLS 1.3).
        @param finish: whether the client's TLS 1.3 Finished is sent now;
            if not, it goes with the client's next records.
        """
        self.clock = clock
        self.server = server_factory.buildProtocol(None)
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)
        self.app = self.server.wrappedProtocol
        context = SSL.Context(SSL.TLS_METHOD)
        if version is not None:
            context.set_max_proto_version(version)
        self.client = SSL.Connection(context, None)
        self.client.set_connect_state()
        for _ in range(20):
            try:
                self.client.do_handshake()
            except SSL.WantReadError:
                pass
            else:
                break
            self._pump()
        else:
            raise AssertionError("the handshake never finished")
        if finish:
            self._pump()  # the client's Finished (TLS 1.3; TLS 1.2's went in the loop)

    def _pump(self):
        """What the client wrote to the server, the server's answer to the client."""
        data = self._from_client()
        if data:
            self.server.dataReceived(data)
        self._to_client()

    def _from_client(self):
        try:
            return self.client.bio_read(1 << 20)
        except SSL.WantReadError:
            return b""

    def _to_client(self):
        data = self.transport.value()
        self.transport.clear()
        if data:
            self.client.bio_write(data)

    def records(self, messages, close=False):
        """Each message as its own TLS record (then a close_notify), as bytes."""
        out = []
        for message in messages:
            self.client.send(message)
            out.append(self._from_client())
        if close:
            self.client.shutdown()
            out.append(self._from_client())
        return b"".join(out)

    def client_reads(self):
        """Everything the server sent since, decrypted by the client."""
        self.clock.advance(0)
        self._to_client()
        got = []
        for _ in range(1000):
            try:
                got.append(self.client.recv(1 << 16))
            except (SSL.WantReadError, SSL.ZeroReturnError):
                break
        return b"".join(got)


def _plain_factory(options, clock):
    """Twisted's own server TLS factory: the oracle for chatd's."""
    return TLSMemoryBIOFactory(options, False, protocol.Factory.forProtocol(_Recorder), clock)


@pytest.fixture(scope="module")
def tls_options(tmp_path_factory):
    """The listener's TLS options, made once for the module."""
    _, chain, key = make_pki(str(tmp_path_factory.mktemp("pki")))
    settings = config.replace(config.defaults(), tls__certificate=chain, tls__private_key=key)
    return tls.certificate_options(settings)


def _cuts(data, points):
    """C{data} cut at C{points} (fractions of its length)."""
    at = sorted({int(p * len(data)) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(at, at[1:])]


@settings(max_examples=40, deadline=None)
@given(
    messages=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=8),
    points=st.lists(st.floats(0, 1), max_size=6),
    close=st.booleans(),
    garbage=st.booleans(),
    probes=st.booleans(),
    version=st.sampled_from([SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION]),
)
def test_reads_as_twisted_does(tls_options, messages, points, close, garbage, probes, version):
    """
    Any records (one per message), then maybe a close_notify or garbage,
    cut into reads anywhere, over TLS 1.2 or 1.3: chatd's TLS delivers
    exactly what Twisted's own TLSMemoryBIOProtocol delivers (the messages,
    in order), and loses the connection when and as Twisted's does, with or
    without the BIO probes.
    """
    results = []
    saved = tls._PROBES
    tls._PROBES = saved if probes else None  # not monkeypatch: its undo comes only after every example
    try:
        for chatd_tls in (True, False):
            clock = task.Clock()
            if chatd_tls:
                factory = tls.CoalescingTLSFactory(tls_options, protocol.Factory.forProtocol(_Recorder), clock)
            else:
                factory = _plain_factory(tls_options, clock)
            pair = _RawClient(factory, clock, version)
            stream = pair.records(messages, close=close) + (b"\x17\x03\x03\x00\x05junk" if garbage else b"")
            for chunk in _cuts(stream, points):
                pair.server.dataReceived(chunk)
            results.append((pair.app.received, pair.app.lost, pair.transport.disconnecting))
    finally:
        tls._PROBES = saved
    assert results[0] == results[1]
    assert results[0][0] == b"".join(messages)


def test_reads_answer_only_when_tls_has_something_to_send(tls_options):
    """A read that decrypts to data writes nothing back; a large write reaches the client whole, in order."""
    clock = task.Clock()
    pair = _RawClient(tls.CoalescingTLSFactory(tls_options, protocol.Factory.forProtocol(_Recorder), clock), clock)
    pair.client_reads()  # the session tickets, if any
    pair.server.dataReceived(pair.records([b"hello", b"again"]))
    assert pair.app.received == b"helloagain"
    assert pair.transport.value() == b""
    big = bytes(range(256)) * 400  # 100 KiB: several records, more than one bio_read of Twisted's size
    pair.server.write(big)
    pair.server.write(b"after")
    assert pair.client_reads() == big + b"after"


class _Answering(_Recorder):
    """Answers every read with a write, as the upgrade's 101 answers the request."""

    def dataReceived(self, data):
        super().dataReceived(data)
        self.transport.write(b"answer to " + data)


def test_what_tls_makes_while_reading_goes_with_the_answer(tls_options):
    """
    A TLS 1.3 client's Finished and its request in one read: the session
    tickets TLS makes on reading the Finished and the application's answer
    (held for the turn) leave in one write, not the tickets at once and the
    answer at the turn's end.  Under Twisted's own TCP both would meet in
    its write buffer; chatd's eager TCP (chatd/eager.py) sends each write
    at once, so two writes were two sends.
    """
    clock = task.Clock()
    factory = tls.CoalescingTLSFactory(tls_options, protocol.Factory.forProtocol(_Answering), clock)
    pair = _RawClient(factory, clock, finish=False)
    writes = []
    write = pair.transport.write
    pair.transport.write = lambda data: (writes.append(data), write(data))
    pair.client.send(b"GET /ws")
    pair.server.dataReceived(pair._from_client())  # the Finished, then the request's record
    assert writes == []  # not before the turn ends
    clock.advance(0)
    assert pair.app.received == b"GET /ws"
    assert len(writes) == 1
    assert pair.client_reads() == b"answer to GET /ws"


def test_close_notify_after_data_in_one_read(tls_options):
    """Data and the client's close_notify in one read: the data is delivered, then the connection closes."""
    clock = task.Clock()
    pair = _RawClient(tls.CoalescingTLSFactory(tls_options, protocol.Factory.forProtocol(_Recorder), clock), clock)
    pair.server.dataReceived(pair.records([b"bye"], close=True))
    assert pair.app.received == b"bye"
    assert pair.transport.disconnecting


class _LostRecorder(_Recorder):
    """L{_Recorder} that keeps the reason's type."""

    def connectionLost(self, reason):
        self.lost = reason.type


def _both_tls(tls_options, version):
    """A chatd TLS pair and a Twisted TLS pair (the oracle), each handshaken at C{version}."""
    pairs = []
    for chatd_tls in (True, False):
        clock = task.Clock()
        app = protocol.Factory.forProtocol(_LostRecorder)
        if chatd_tls:
            factory = tls.CoalescingTLSFactory(tls_options, app, clock)
        else:
            factory = TLSMemoryBIOFactory(tls_options, False, app, clock)
        pairs.append(_RawClient(factory, clock, version))
    return pairs


@pytest.mark.parametrize("probes", [True, False])
def test_renegotiation_is_refused_as_by_twisted(tls_options, probes, monkeypatch):
    """
    A TLS 1.2 client asking to renegotiate between records: chatd answers
    what Twisted's TLS answers (OpenSSL's no_renegotiation alert), delivers
    the same data and keeps the connection as Twisted does.
    """
    if not probes:
        monkeypatch.setattr(tls, "_PROBES", None)
    results = []
    for pair in _both_tls(tls_options, SSL.TLS1_2_VERSION):
        pair.server.dataReceived(pair.records([b"before"]))
        pair.client.renegotiate()
        with pytest.raises(SSL.WantReadError):
            pair.client.do_handshake()
        pair.server.dataReceived(pair._from_client())
        answer = pair.transport.value()
        results.append((pair.app.received, answer != b"", pair.app.lost, pair.transport.disconnecting))
    assert results[0] == results[1]
    assert results[0][0] == b"before" and results[0][1]


@pytest.mark.parametrize("version", [SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION])
@pytest.mark.parametrize("cut", [0, 3])
def test_connection_lost_without_close_notify_as_by_twisted(tls_options, version, cut):
    """
    The TCP connection ends after whole records, or inside one, with no
    close_notify: chatd delivers the whole records and reports the loss
    with the reason Twisted's TLS gives (ConnectionLost, a truncation).
    """
    results = []
    for pair in _both_tls(tls_options, version):
        stream = pair.records([b"x", b"y"])
        pair.server.dataReceived(stream[:len(stream) - cut])
        pair.server.connectionLost(Failure(error.ConnectionDone()))
        results.append((pair.app.received, pair.app.lost))
    assert results[0] == results[1]
    assert results[0] == (b"xy" if not cut else b"x", error.ConnectionLost)


def test_chain_and_key_as_cryptography_objects(tmp_path):
    """
    Every certificate in the PEM file is served (leaf first, then the rest),
    loaded as cryptography objects: building the context raises none of
    pyOpenSSL's deprecation warnings for X509/PKey objects.
    """
    ca, chain, key = make_pki(str(tmp_path))
    with open(chain, "ab") as f, open(ca, "rb") as extra:
        f.write(b"\n" + extra.read())
    settings = config.replace(config.defaults(), tls__certificate=chain, tls__private_key=key)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        options = tls.certificate_options(settings)
        options.getContext()
    assert isinstance(options.certificate, x509.Certificate)
    assert options.certificate.subject == _name("localhost")
    assert [c.subject for c in options.extraCertChain] == [_name("chatd test CA")]
    assert isinstance(options.privateKey, ec.EllipticCurvePrivateKey)


def test_sslyze_mozilla_intermediate(start_chatd, tmp_path):
    """
    sslyze's Mozilla "intermediate" check passes: TLS 1.2 and 1.3 only, the
    profile's ciphers and groups, no compression, a valid chain.
    """
    python = sslyze_python()
    ca, chain, key = make_pki(str(tmp_path))
    server = start_chatd(tls__certificate=chain, tls__private_key=key)
    report = tmp_path / "sslyze.json"
    scan = subprocess.run(
        [python, "-m", "sslyze", "--mozilla_config=intermediate", f"--certinfo_ca_file={ca}",
         f"--json_out={report}", f"localhost:{server.port}{{127.0.0.1}}"],
        capture_output=True, text=True, timeout=SCAN_TIMEOUT,
    )
    assert scan.returncode == 0 and "OK - Compliant" in scan.stdout, scan.stdout[-4000:] + scan.stderr[-2000:]

    result = json.loads(report.read_text())["server_scan_results"][0]["scan_result"]
    for old in ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1"):
        assert accepted(result, old) == set(), old
    assert accepted(result, "tls_1_2") and accepted(result, "tls_1_2") <= INTERMEDIATE_TLS12
    assert accepted(result, "tls_1_3") and accepted(result, "tls_1_3") <= INTERMEDIATE_TLS13
    curves = {c["name"] for c in result["elliptic_curves"]["result"]["supported_curves"]}
    assert curves == INTERMEDIATE_CURVES
    assert result["tls_compression"]["result"]["supports_compression"] is False
    assert "Traceback" not in server.log_text()


def _memory_handshake(server_context, client_context, session=None):
    """A TLS handshake between a pyOpenSSL server and a Python ssl client over memory BIOs."""
    import ssl as stdlib_ssl

    from OpenSSL import SSL

    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    incoming, outgoing = stdlib_ssl.MemoryBIO(), stdlib_ssl.MemoryBIO()
    client = client_context.wrap_bio(incoming, outgoing, server_side=False, session=session)
    for _ in range(10):  # a TLS 1.3 handshake takes two flights each way
        try:
            client.do_handshake()
            done = True
        except stdlib_ssl.SSLWantReadError:
            done = False
        data = outgoing.read()
        if data:
            server.bio_write(data)
            try:
                server.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                incoming.write(server.bio_read(65536))
            except SSL.WantReadError:
                pass
        elif done:
            break
    try:
        client.read(1)  # takes in what the server sent after the handshake
    except stdlib_ssl.SSLWantReadError:
        pass
    return client


def test_no_session_is_resumed(tmp_path):
    """
    Resumption stays off (docs/security.md): a client offering the session
    of an earlier connection gets a full handshake, over TLS 1.3 and 1.2.
    """
    import ssl as stdlib_ssl

    _, chain, key = make_pki(str(tmp_path))
    settings = config.replace(config.defaults(), tls__certificate=chain, tls__private_key=key)
    server_context = tls.certificate_options(settings).getContext()
    for version in (stdlib_ssl.TLSVersion.TLSv1_3, stdlib_ssl.TLSVersion.TLSv1_2):
        client_context = stdlib_ssl.create_default_context()
        client_context.check_hostname = False
        client_context.verify_mode = stdlib_ssl.CERT_NONE
        client_context.minimum_version = client_context.maximum_version = version
        first = _memory_handshake(server_context, client_context)
        assert first.version() == version.name.replace("v1_", "v1.")
        again = _memory_handshake(server_context, client_context, session=first.session)
        assert not again.session_reused
