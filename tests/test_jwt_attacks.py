"""
Forged and broken JWTs against POST /auth/ticket on a real chatd over TLS:
every one is answered 401 (never 200, never 500), and none shows up in the
log.  One server uses the kit's HS256 secret; another RS256 with a public
key file, issuer and audience, which is where algorithm confusion lives.
"""

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from jwt.algorithms import RSAAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support import http

ISSUER = "https://login.example"
AUDIENCE = "chatd"


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def segments(header, payload):
    return b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())


def hmac_token(key, payload, alg="HS256"):
    """An HS* token made by hand: PyJWT refuses to use a PEM key as an HMAC secret."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = segments({"alg": alg, "typ": "JWT"}, payload)
    signature = hmac.new(key, signing_input.encode(), digest).digest()
    return signing_input + "." + b64(signature)


def unsigned(payload, alg="none"):
    return segments({"alg": alg, "typ": "JWT"}, payload) + "."


def claims(sub="mallory", ttl=3600, **extra):
    now = int(time.time())
    payload = {"sub": sub, "iat": now, "exp": now + ttl}
    payload.update(extra)
    return {k: v for k, v in payload.items() if v is not None}


def new_rsa():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def ticket_status(server, token):
    status, headers, body = http("POST", server.base + "/auth/ticket", token=token)
    if status == 401:
        assert body["error"] == "invalid_token" and headers["www-authenticate"].startswith("Bearer")
    return status


def assert_all_refused(server, cases):
    accepted = {name: status for name, token in cases if (status := ticket_status(server, token)) != 401}
    assert accepted == {}, accepted
    log = server.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert "eyJ" not in log  # no token, or any part of one, was logged


@pytest.fixture
def rs256(start_chatd, tmp_path):
    """chatd with RS256, a public key file, issuer and audience; and its private key."""
    private_pem, public_pem = new_rsa()
    public_path = tmp_path / "jwt-public.pem"
    public_path.write_bytes(public_pem)
    server = start_chatd(
        auth__algorithms="RS256",
        auth__public_key_file=str(public_path),
        auth__issuer=ISSUER,
        auth__audience=AUDIENCE,
    )
    return server, private_pem, public_pem


def test_rs256_attacks_are_refused(rs256):
    """
    alg none, HS256 signed with the server's own public key (algorithm
    confusion), another key, an embedded attacker jwk, an algorithm outside
    the allowlist, expired, not yet valid, missing or wrong claims: all 401.
    """
    server, private_pem, public_pem = rs256
    attacker_pem, attacker_public = new_rsa()
    good = dict(iss=ISSUER, aud=AUDIENCE)

    def rs(payload, key=private_pem, alg="RS256", headers=None):
        return jwt.encode(payload, key, algorithm=alg, headers=headers)

    assert ticket_status(server, rs(claims(**good))) == 200  # the control
    cases = [
        ("alg none", unsigned(claims(**good))),
        ("alg None", unsigned(claims(**good), alg="None")),
        ("alg none with a signature", unsigned(claims(**good)) + b64(b"x" * 32)),
        ("HS256 with the public key PEM as secret", hmac_token(public_pem, claims(**good))),
        ("HS256 with the stripped PEM body", hmac_token(b"".join(public_pem.splitlines()[1:-1]), claims(**good))),
        ("another RSA key", rs(claims(**good), key=attacker_pem)),
        ("attacker key in a jwk header", rs(
            claims(**good), key=attacker_pem,
            headers={"jwk": json.loads(RSAAlgorithm.to_jwk(serialization.load_pem_public_key(attacker_public)))},
        )),
        ("RS512, not in the allowlist", rs(claims(**good), alg="RS512")),
        ("PS256, not in the allowlist", rs(claims(**good), alg="PS256")),
        ("expired", rs(claims(ttl=-60, **good))),
        ("not yet valid (nbf)", rs(claims(nbf=int(time.time()) + 600, **good))),
        ("no sub", rs(claims(sub=None, **good))),
        ("no exp", rs({k: v for k, v in claims(**good).items() if k != "exp"})),
        ("no iss", rs(claims(aud=AUDIENCE))),
        ("wrong iss", rs(claims(iss="https://evil.example", aud=AUDIENCE))),
        ("no aud", rs(claims(iss=ISSUER))),
        ("wrong aud", rs(claims(iss=ISSUER, aud="other-service"))),
        ("aud list without ours", rs(claims(iss=ISSUER, aud=["a", "b"]))),
        ("sub not a string", rs(claims(sub=12345, **good))),
        ("exp not a number", rs(dict(claims(**good), exp="9999999999"))),
        ("tampered payload", (lambda t: t.split(".")[0] + "." + b64(json.dumps(claims(sub="admin", **good)).encode())
                              + "." + t.split(".")[2])(rs(claims(**good)))),
        ("signature removed", rs(claims(**good)).rsplit(".", 1)[0] + "."),
    ]
    assert_all_refused(server, cases)


def test_hs256_attacks_are_refused(chatd):
    """
    Against the HS256 deployment: alg none, the wrong secret, an empty
    secret, an algorithm outside the allowlist, broken encodings, bad claim
    types and names that could forge log lines: all 401.
    """
    secret = chatd.secret
    assert ticket_status(chatd, hmac_token(secret, claims())) == 200  # the control
    cases = [
        ("alg none", unsigned(claims())),
        ("alg NONE", unsigned(claims(), alg="NONE")),
        ("wrong secret", hmac_token(b"not the secret, but long enough to pass", claims())),
        ("empty secret", hmac_token(b"", claims())),
        ("HS512 with the right secret", hmac_token(secret, claims(), alg="HS512")),
        ("RS256 header on an HMAC signature", segments({"alg": "RS256"}, claims()) + "."
         + hmac_token(secret, claims()).rsplit(".", 1)[1]),
        ("expired", hmac_token(secret, claims(ttl=-1))),
        ("not yet valid", hmac_token(secret, claims(nbf=int(time.time()) + 600))),
        ("no exp", hmac_token(secret, {"sub": "mallory"})),
        ("no sub", hmac_token(secret, claims(sub=None))),
        ("two segments", segments({"alg": "HS256"}, claims())),
        ("four segments", hmac_token(secret, claims()) + ".x"),
        ("header not JSON", b64(b"{not json") + "." + b64(b"{}") + "." + b64(b"sig")),
        ("payload a list", hmac_token(secret, ["sub", "mallory"])),
        ("not base64", "!!!.???.***"),
        ("name with a newline", hmac_token(secret, claims(name="Eve\n2026-01-01T00:00:00 [chatd] forged"))),
        ("name with ESC", hmac_token(secret, claims(name="\x1b[31mEve"))),
        ("name a lone surrogate", hmac_token(secret, claims(name="\ud800"))),
        ("name too long", hmac_token(secret, claims(name="x" * 65))),
        ("sub with a control char", hmac_token(secret, claims(sub="eve\x00"))),
        ("rooms not a list", hmac_token(secret, claims(rooms="lobby"))),
        ("rooms with a bad name", hmac_token(secret, claims(rooms=["lob by"]))),
    ]
    assert_all_refused(chatd, cases)
