# -*- test-case-name: tests.test_tls -*-
"""
TLS for the listener: the configured PEM chain and key as Twisted
C{CertificateOptions}, with Mozilla's "intermediate" profile: TLS 1.2 and
1.3 only, AEAD ciphers with forward secrecy, the chain served as given.
"""

import re

from OpenSSL import SSL, crypto
from twisted.internet import ssl

from chatd.config import ConfigError

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

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)


class _IntermediateOptions(ssl.CertificateOptions):
    """CertificateOptions that also limit key exchange to the profile's groups."""

    _groups_limited = False

    def getContext(self):
        context = super().getContext()
        if not self._groups_limited:
            set_groups = getattr(context, "set_groups", None)
            if set_groups is not None:
                set_groups(INTERMEDIATE_GROUPS)
            self._groups_limited = True
        return context


def certificate_options(settings):
    """
    @raise ConfigError: naming [tls] certificate or private_key when the
        files do not hold a usable chain and matching key.
    """
    path = settings.path
    with open(settings.tls.certificate, "rb") as f:
        chain = _PEM_CERT.findall(f.read())
    if not chain:
        raise ConfigError(path, "tls", "certificate", "no PEM certificate in the file")
    try:
        certs = [crypto.load_certificate(crypto.FILETYPE_PEM, pem) for pem in chain]
    except crypto.Error:
        raise ConfigError(path, "tls", "certificate", "not a valid PEM certificate") from None
    with open(settings.tls.private_key, "rb") as f:
        key_pem = f.read()
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error:
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
    return options
