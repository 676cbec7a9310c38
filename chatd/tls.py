# -*- test-case-name: tests.test_tls -*-
"""
TLS for the listener: the configured PEM chain and key as Twisted
C{CertificateOptions}, with Mozilla's "intermediate" profile: TLS 1.2 and
1.3 only, AEAD ciphers with forward secrecy, key exchange on X25519, P-256
and P-384 only, the chain served as given.  tests/test_tls.py checks the
result with sslyze's Mozilla checker.
"""

import os
import stat

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

from chatd.config import ConfigError
from chatd.guard import provide_like

# Mozilla "intermediate" (server side TLS guidelines v5.7), TLS 1.2 suites;
# TLS 1.3 suites are OpenSSL's defaults, which are all intermediate-grade.
INTERMEDIATE_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
])
INTERMEDIATE_GROUPS = b"X25519:P-256:P-384"
# TLS 1.3 suites: the profile's three, in its order.  OpenSSL's default order
# puts AES-256 first, whose SHA-384 key schedule cost about 20 us more
# server CPU per handshake here than AES-128's SHA-256 (docs/performance.md);
# with the server's preference on (Twisted sets it), AES-128 is chosen
# whenever the client offers it, as every client does.
INTERMEDIATE_TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

log = Logger()

# Permission bits a private key file must not have: anything for others,
# write for the group.  Group read stays allowed (Debian's ssl-cert group:
# keys 0640 root:ssl-cert); ssh and PostgreSQL refuse keys the same way.
KEY_FORBIDDEN_MODE = stat.S_IRWXO | stat.S_IWGRP

def limit_groups(context):
    """
    Restrict C{context}'s key exchange groups to L{INTERMEDIATE_GROUPS}.

    OpenSSL's default list also offers X448, P-521 and the FFDHE groups,
    which the profile (and sslyze's check of it) rejects.  pyOpenSSL has no
    public call for a group list (only C{set_tmp_ecdh}, which sets a single
    curve), so this calls OpenSSL's C{SSL_CTX_set1_curves_list} through the
    cryptography binding pyOpenSSL itself is built on, the same route
    Twisted takes for C{SSL_CTX_set_ecdh_auto}.  Should a future pyOpenSSL
    or cryptography drop that, it falls back to the public
    C{set_tmp_ecdh(P-256)}: still within the profile, but P-256 only (TLS 1.3
    clients that only offered an X25519 key share then pay a
    HelloRetryRequest round trip).

    @return: the groups now allowed, as text, for the startup log.
    """
    try:
        from OpenSSL._util import lib

        set_list = lib.SSL_CTX_set1_curves_list
        raw_context = context._context
    except (ImportError, AttributeError):
        context.set_tmp_ecdh(ec.SECP256R1())
        return "P-256"
    if set_list(raw_context, INTERMEDIATE_GROUPS) != 1:
        raise SSL.Error("OpenSSL refused the group list " + INTERMEDIATE_GROUPS.decode())
    return INTERMEDIATE_GROUPS.decode()


class _IntermediateOptions(ssl.CertificateOptions):
    """CertificateOptions that also limit key exchange to the profile's groups."""

    groups = None  # what limit_groups allowed, once the context exists

    def getContext(self):
        # CertificateOptions makes its context once and caches it; every
        # connection is made from that one context.
        context = super().getContext()
        if self.groups is None:
            self.groups = limit_groups(context)
            context.set_tls13_ciphersuites(INTERMEDIATE_TLS13_SUITES)
            # Not SSL_MODE_RELEASE_BUFFERS: measured, it changed nothing in
            # the memory per idle connection (docs/performance.md).
        return context


def _read_private_key(path, filename):
    """
    The key file's bytes, refused (as ssh refuses an unprotected key) when
    its mode lets others read or write it.

    @raise ConfigError: naming [tls] private_key.
    """
    try:
        with open(filename, "rb") as f:
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)  # the file read, not the path again
            if mode & KEY_FORBIDDEN_MODE:
                raise ConfigError(
                    path, "tls", "private_key",
                    f"{filename} is accessible to others (mode {mode:04o}); "
                    "chmod 600 it (or 640 for a group such as ssl-cert)",
                )
            return f.read()
    except OSError as e:
        raise ConfigError(
            path, "tls", "private_key",
            f"cannot read {filename} as uid {os.geteuid()}: {e.strerror}",
        ) from None


def certificate_options(settings):
    """
    The listener's TLS options from C{[tls] certificate} (a PEM chain, leaf
    first) and C{private_key}, as cryptography objects: Twisted passes them
    to pyOpenSSL, which takes them in place of its deprecated X509/PKey.

    @raise ConfigError: naming [tls] certificate or private_key when the
        files do not hold a usable chain and matching key.
    """
    path = settings.path
    with open(settings.tls.certificate, "rb") as f:
        chain_pem = f.read()
    if b"-----BEGIN CERTIFICATE-----" not in chain_pem:
        raise ConfigError(path, "tls", "certificate", "no PEM certificate in the file")
    try:
        certs = x509.load_pem_x509_certificates(chain_pem)
    except ValueError:
        raise ConfigError(path, "tls", "certificate", "not a valid PEM certificate") from None
    key_pem = _read_private_key(path, settings.tls.private_key)
    try:
        # No password: an encrypted key is refused here (TypeError) instead
        # of OpenSSL prompting on the terminal (or hanging).
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(path, "tls", "private_key", "not a valid, unencrypted PEM private key") from None
    options = _IntermediateOptions(
        privateKey=key,
        certificate=certs[0],
        extraCertChain=certs[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(INTERMEDIATE_CIPHERS),
    )
    try:
        options.getContext()
    except SSL.Error:
        raise ConfigError(path, "tls", "private_key", "does not match the certificate") from None
    log.info("TLS 1.2+, key exchange groups {groups}", groups=options.groups)
    return options


# --- writes: one TLS write per connection per reactor turn -------------------


def _bio_probes():
    """
    The raw calls that say how many bytes an OpenSSL memory BIO holds
    (C{BIO_get_mem_data(bio, NULL)}) and how many decrypted bytes an C{SSL}
    holds (C{SSL_pending}): C{(mem_data, ssl_pending, NULL)}, or L{None}
    where pyOpenSSL's binding does not have them.

    pyOpenSSL only says "nothing there" by raising C{WantReadError}, an
    exception built and caught twice for every read of a TLS connection
    (docs/performance.md).  C{BIO_get_mem_data} (with no pointer to fill:
    the length only) and C{SSL_pending} are in the cryptography binding
    pyOpenSSL itself is built on, the route L{limit_groups} takes; if a
    future one drops them, the TLS layer does what Twisted does.
    """
    try:
        from OpenSSL._util import ffi, lib

        return lib.BIO_get_mem_data, lib.SSL_pending, ffi.NULL
    except (ImportError, AttributeError):
        return None


_PROBES = _bio_probes()


class TurnFlush:
    """
    The TLS connections written to in this reactor turn, flushed together
    by one delayed call at the next.

    Twisted's own buffering (C{BufferingTLSTransport}) schedules one
    C{callLater(0)} per connection written to; a fan-out writes to every
    member in one turn, so that was a thousand timers per event in a room
    of a thousand (docs/performance.md).
    """

    def __init__(self, clock):
        self._clock = clock
        self._dirty = []
        self._scheduled = None

    def add(self, protocol):
        self._dirty.append(protocol)
        if self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self._flush)

    def flush_now(self):
        """
        Write out now what was written in this turn so far, each
        connection's writes as one TLS write, instead of at the next turn
        (the hub's fan-out of a burst, a slice of members at a time).  The
        timer stays, for what is written after.
        """
        dirty, self._dirty = self._dirty, []
        self._flush_all(dirty)

    def _flush(self):
        self._scheduled = None
        dirty, self._dirty = self._dirty, []
        self._flush_all(dirty)

    def _flush_all(self, dirty):
        for protocol in dirty:
            try:
                protocol.flush_writes()
            except Exception:
                # One connection's failure must not keep the others' bytes.
                log.failure("flushing writes to {peer}", peer=protocol.getPeer())


class CoalescingTLSProtocol(TLSMemoryBIOProtocol):
    """
    TLS whose writes within one reactor turn become one TLS write (one
    C{SSL_write}, one record for small writes), in order, at the next
    turn, as Twisted's C{BufferingTLSTransport} does, but with one timer for
    all connections (L{TurnFlush}).  Over C{MAX_PENDING} bytes the pending
    writes go at once; C{loseConnection} sends them first, so a close frame
    queued last still goes last.
    """

    MAX_PENDING = 64_000  # as Twisted's _AggregateSmallWrites

    _pending = None
    _pending_bytes = 0
    _lost = False

    def makeConnection(self, transport):
        # TLSMemoryBIOProtocol's (a server's: the wrapped protocol connects at
        # once), with the transport's interfaces declared once, not once per
        # interface and again, and the declaration shared (guard.provide_like).
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        provide_like(self, transport)
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(self)
        self._checkHandshakeStatus()

    def write(self, data):
        if self._lost:
            return
        pending = self._pending
        if pending is None:
            self._pending = pending = []
            self.factory.turn.add(self)
        pending.append(bytes(data))  # a copy if mutable: the caller may reuse it
        self._pending_bytes += len(data)
        if self._pending_bytes > self.MAX_PENDING:
            self.flush_writes()

    def writeSequence(self, iovec):
        self.write(b"".join(iovec))

    def flush_writes(self):
        """Write what is pending now, as one TLS write."""
        pending = self._pending
        if pending:
            self._pending = None
            self._pending_bytes = 0
            TLSMemoryBIOProtocol.write(self, pending[0] if len(pending) == 1 else b"".join(pending))

    def _flushSendBIO(self):
        """
        Twisted's: write what TLS made to the transport; but with the BIO
        asked first, so there is no C{WantReadError} when there is nothing
        (every read, once its data has gone up), and all of it in one write.
        """
        if _PROBES is None:
            return super()._flushSendBIO()
        connection = self._tlsConnection
        try:
            pending = _PROBES[0](connection._from_ssl, _PROBES[2])
        except AttributeError:  # not a memory-BIO connection as pyOpenSSL makes them
            return super()._flushSendBIO()
        if pending > 0:
            self.transport.write(connection.bio_read(pending))

    def _flushReceiveBIO(self):
        """
        Twisted's: deliver what the bytes received decrypt to, then write
        what TLS made; but once a read leaves nothing behind (no decrypted
        bytes held, nothing left in the BIO) the loop ends there, instead of
        at the C{WantReadError} of one more C{SSL_read}: there is nothing
        for it to read.  Anything left (a second record, an alert, a
        post-handshake message) is read as in Twisted's loop.  When the
        application wrote in answer, what TLS made waits for those writes
        at the end of the turn: a client's Finished and its upgrade request
        in one read are answered with one send (tickets, 101 and WELCOME),
        as Twisted's unbuffered writes answer them, not two.
        """
        if _PROBES is None:
            return super()._flushReceiveBIO()
        mem_data, ssl_pending, null = _PROBES
        connection = self._tlsConnection
        try:
            into, ssl_object = connection._into_ssl, connection._ssl
        except AttributeError:
            return super()._flushReceiveBIO()
        while not self._lostTLSConnection:
            try:
                data = connection.recv(2**15)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                self._tlsShutdownFinished(Failure())
            else:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, data)
                if not ssl_pending(ssl_object) and not mem_data(into, null):
                    break
        if not self._pending:
            self._flushSendBIO()
        # else: what TLS made while reading (a TLS 1.3 handshake's
        # NewSessionTickets, say) goes with the writes pending for this
        # turn, in the one send of flush_writes, not in a send of its own.

    def loseConnection(self):
        self.flush_writes()
        super().loseConnection()

    def connectionLost(self, reason):
        self.flush_writes()  # as Twisted's buffering does; a no-op once TLS is gone
        self._lost = True
        super().connectionLost(reason)


class CoalescingTLSFactory(TLSMemoryBIOFactory):
    """A server C{TLSMemoryBIOFactory} of L{CoalescingTLSProtocol}s."""

    protocol = CoalescingTLSProtocol

    def __init__(self, creator, wrapped_factory, clock, turn=None):
        """
        @param creator: the server's TLS connection creator (such as
            L{chatd.reload.ReloadableServerTLS}).
        @param wrapped_factory: the factory of the protocol inside TLS.
        @param clock: an C{IReactorTime}: the reactor whose turns count.
        @param turn: the L{TurnFlush} on C{clock} to flush through, when
            others ask it to flush now (the hub); a new one when L{None}.
        """
        super().__init__(creator, False, wrapped_factory, clock)
        self.turn = TurnFlush(clock) if turn is None else turn
