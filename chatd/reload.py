# -*- test-case-name: tests.test_reload -*-
"""
SIGHUP: read the TLS certificate and key and the JWT key again, without
dropping anyone.

  - TLS: the listener's C{TLSMemoryBIOFactory} is given a
    L{ReloadableServerTLS} instead of the C{CertificateOptions} themselves.
    Each new TLS connection asks it for an C{SSL.Connection}, made from
    whatever options are current; connections already open keep the
    context they were made with.  A reload swaps the options.
  - JWT: the one L{chatd.auth.TokenVerifier} is handed the new key; tokens
    signed only with the old key are refused from then on.  Open WebSockets
    are not touched (their ticket was redeemed already).

Every file is checked before anything is swapped, as at start-up (the same
functions do it): a broken file (unreadable, not PEM, a key that does not
match the certificate, a secret too short) is refused with one log line
naming the file and the reason, and the old material stays in use.  TLS and
JWT are independent: one refused does not keep the other from being
reloaded.  A SIGHUP during a drain is ignored (logged).

The files are small and read in the reactor thread, as at start-up.
"""

import signal

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from chatd import config, tls
from chatd.metrics import certificate_expiry

log = Logger()


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """
    The server side of TLS for C{TLSMemoryBIOFactory}, with options that can
    be swapped while serving.
    """

    def __init__(self, options):
        """
        @param options: C{CertificateOptions} (as L{chatd.tls.certificate_options} makes).
        """
        self.options = options

    def serverConnectionForTLS(self, tlsProtocol):
        """IOpenSSLServerConnectionCreator API: a connection from the current context."""
        return SSL.Connection(self.options.getContext(), None)


class Reloader:
    """What one SIGHUP does (see the module docstring)."""

    def __init__(self, settings, verifier, server_tls=None, notifier=None, metrics=None,
                 draining=lambda: False):
        """
        @param settings: the loaded settings (the file names to read again).
        @param verifier: the L{chatd.auth.TokenVerifier} in use.
        @param server_tls: the listener's L{ReloadableServerTLS}; L{None}
            when C{tls = off}.
        @param notifier: a L{chatd.systemd.Notifier}, told RELOADING then READY.
        @param metrics: a L{chatd.metrics.Metrics}, for the certificate expiry.
        @param draining: returns whether a drain has started.
        """
        self._settings = settings
        self._verifier = verifier
        self._server_tls = server_tls
        self._notifier = notifier
        self._metrics = metrics
        self._draining = draining

    def reload(self):
        """
        @return: C{{"tls": ok, "jwt": ok}}, or L{None} when ignored.
        """
        if self._draining():
            log.warn("SIGHUP ignored: draining")
            return None
        if self._notifier is not None:
            self._notifier.reloading()
        outcome = {"jwt": self._reload_jwt_key()}
        if self._server_tls is not None:
            outcome["tls"] = self._reload_tls()
        status = "serving; " + ", ".join(
            f"{name} {'reloaded' if ok else 'kept'}" for name, ok in sorted(outcome.items())
        )
        log.info("reload done: {status}", status=status)
        if self._notifier is not None:
            self._notifier.ready(status)
        return outcome

    def _refused(self, section, key, why):
        filename = getattr(getattr(self._settings, section), key)
        log.error(
            "reload refused: {file}: {reason}; keeping the old one",
            file=filename, reason=why, section=section, key=key,
        )
        return False

    def _reload_tls(self):
        try:
            options = tls.certificate_options(self._settings)
        except config.ConfigError as e:
            return self._refused(e.section, e.key, e.why)
        except OSError as e:
            key = "certificate" if e.filename == self._settings.tls.certificate else "private_key"
            return self._refused("tls", key, e.strerror or str(e))
        self._server_tls.options = options
        if self._metrics is not None:
            self._metrics.certificate_expiry = certificate_expiry(options.certificate)
        log.info("TLS certificate {file} reloaded", file=self._settings.tls.certificate)
        return True

    def _reload_jwt_key(self):
        try:
            key = config.read_jwt_key(self._settings)
        except config.ConfigError as e:
            return self._refused(e.section, e.key, e.why)
        self._verifier.use_key(key)
        which = "secret_file" if self._settings.auth.algorithms[0] in config.HS_ALGORITHMS else "public_key_file"
        log.info("JWT key {file} reloaded", file=getattr(self._settings.auth, which))
        return True


class ReloadService(Service):
    """
    Owns the SIGHUP handler while running.  The handler only schedules the
    reload on the reactor (C{callFromThread} is the call that is safe from a
    signal handler); the reload itself runs as ordinary reactor code.
    """

    _previous = None

    def __init__(self, reloader, reactor):
        self._reloader = reloader
        self._reactor = reactor

    def startService(self):
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self):
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame):
        self._reactor.callFromThread(self._reloader.reload)
