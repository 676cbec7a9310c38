# -*- test-case-name: tests.test_auth -*-
"""
chatd.auth: real PyJWT tokens through TokenVerifier, and the claim rules
PyJWT does not enforce.
"""

import time

import jwt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chatd import config
from chatd.auth import NAME_WITH_FORMAT_CHARACTERS, InvalidToken, Principal, TokenVerifier, principal_from_claims

SECRET = b"k" * 64  # long enough for HS512 without a warning
OTHER_SECRET = b"o" * 64


def token(ttl=3600, key=SECRET, algorithm="HS256", **claims):
    """A JWT for sub 'alice' (unless overridden); a claim set to None is left out."""
    now = int(time.time())
    payload = {"sub": "alice", "iat": now, "exp": now + ttl}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=algorithm)


def verifier(**kwargs):
    kwargs.setdefault("key", SECRET)
    kwargs.setdefault("algorithms", ["HS256"])
    return TokenVerifier(**kwargs)


def refusal(token_, **kwargs):
    with pytest.raises(InvalidToken) as info:
        verifier(**kwargs).verify(token_)
    return str(info.value)


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_public_pem(rsa_key):
    return rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# --- accepted ------------------------------------------------------------------------------


def test_valid_token():
    """A signed token with sub and exp gives a Principal; name falls back to sub."""
    exp = int(time.time()) + 60
    principal = verifier().verify(token(exp=exp))
    assert principal == Principal(sub="alice", name="alice", exp=exp, rooms=None)


def test_name_and_rooms():
    """name and rooms come from their claims."""
    principal = verifier().verify(token(name="Alice Ünal", rooms=["lobby", "ops"]))
    assert principal.name == "Alice Ünal"
    assert principal.rooms == frozenset({"lobby", "ops"})
    assert principal.may_enter("ops") and not principal.may_enter("secret")


def test_no_rooms_claim_means_any_room():
    """Without rooms every room may be entered; an empty list allows none."""
    assert verifier().verify(token()).may_enter("anything")
    assert not verifier().verify(token(rooms=[])).may_enter("lobby")


def test_aud_not_checked_when_audience_unset():
    """A token with aud is accepted when no audience is configured (PyJWT would refuse it)."""
    assert verifier().verify(token(aud="some-other-service")).sub == "alice"


def test_iss_not_checked_when_issuer_unset():
    """A token with any iss is accepted when no issuer is configured."""
    assert verifier().verify(token(iss="https://elsewhere")).sub == "alice"


def test_issuer_and_audience_when_configured():
    """With issuer and audience set, matching claims are accepted (aud may be a list)."""
    v = verifier(issuer="https://idp", audience="chatd")
    assert v.verify(token(iss="https://idp", aud="chatd")).sub == "alice"
    assert v.verify(token(iss="https://idp", aud=["web", "chatd"])).sub == "alice"


def test_leeway_allows_skew():
    """leeway seconds of clock skew are allowed on exp."""
    assert verifier(leeway=60).verify(token(ttl=-5)).sub == "alice"


def test_rs256(rsa_key, rsa_public_pem):
    """RS256 tokens verify against the configured public key."""
    v = verifier(key=rsa_public_pem, algorithms=["RS256"])
    assert v.verify(token(key=rsa_key, algorithm="RS256")).sub == "alice"


def test_from_settings(tmp_path):
    """from_settings takes key, algorithms, iss, aud and leeway from the settings."""
    settings = config.replace(
        config.defaults(auth__issuer="https://idp", auth__leeway=60), auth__audience="chatd"
    )
    import dataclasses

    settings = dataclasses.replace(settings, jwt_key=SECRET)
    v = TokenVerifier.from_settings(settings)
    assert v.verify(token(ttl=-5, iss="https://idp", aud="chatd")).sub == "alice"
    with pytest.raises(InvalidToken, match="wrong audience"):
        v.verify(token(iss="https://idp", aud="other"))


# --- refused by PyJWT's checks ---------------------------------------------------------


def test_expired():
    """A token whose exp passed is refused."""
    assert refusal(token(ttl=-1)) == "token expired"


def test_not_yet_valid():
    """nbf in the future is refused; so is an iat in the future."""
    assert refusal(token(nbf=int(time.time()) + 600)) == "token not yet valid"
    assert refusal(token(iat=int(time.time()) + 600)) == "token not yet valid"


@pytest.mark.parametrize("claim", ["sub", "exp"])
def test_required_claims(claim):
    """sub and exp are required (PyJWT would accept a token without exp)."""
    assert refusal(token(**{claim: None})) == f"token has no {claim} claim"


def test_issuer_checked_when_set():
    """With an issuer configured, a wrong or missing iss is refused."""
    assert refusal(token(iss="https://evil"), issuer="https://idp") == "wrong issuer"
    assert refusal(token(), issuer="https://idp") == "token has no iss claim"


def test_audience_checked_when_set():
    """With an audience configured, a wrong or missing aud is refused."""
    assert refusal(token(aud="other"), audience="chatd") == "wrong audience"
    assert refusal(token(), audience="chatd") == "token has no aud claim"


def test_alg_none():
    """An unsigned token (alg none) is never accepted."""
    unsigned = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, None, algorithm="none")
    assert refusal(unsigned) == "algorithm not allowed"


def test_algorithm_outside_allowlist():
    """A token signed with the right secret but another algorithm is refused."""
    assert refusal(token(algorithm="HS512")) == "algorithm not allowed"


def test_hs_rs_confusion(rsa_public_pem):
    """An HS256 token 'signed' with the RSA public key is refused by an RS256 verifier."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    # Forged by hand: PyJWT itself refuses to use a PEM as an HMAC secret.
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": "mallory", "exp": int(time.time()) + 60}).encode())
    signature = b64(hmac.new(rsa_public_pem, header + b"." + body, hashlib.sha256).digest())
    forged = (header + b"." + body + b"." + signature).decode()
    assert refusal(forged, key=rsa_public_pem, algorithms=["RS256"]) == "algorithm not allowed"


def test_wrong_key():
    """A token signed with another secret is refused."""
    assert refusal(token(key=OTHER_SECRET)) == "bad signature"


def test_wrong_rsa_key(rsa_public_pem):
    """An RS256 token from another key pair is refused."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = token(key=other, algorithm="RS256")
    assert refusal(forged, key=rsa_public_pem, algorithms=["RS256"]) == "bad signature"


@pytest.mark.parametrize("bad", ["", None, 5, "not.a.jwt", "abc", "eyJhbGciOiJIUzI1NiJ9..."])
def test_malformed(bad):
    """Garbage and non-strings are refused without detail."""
    assert refusal(bad) in ("missing token", "malformed token")


def test_tampered_payload():
    """Changing the payload after signing breaks the signature."""
    import base64
    import json

    head, _, sig = token().split(".")
    body = base64.urlsafe_b64encode(
        json.dumps({"sub": "root", "exp": int(time.time()) + 60}).encode()
    ).rstrip(b"=").decode()
    assert refusal(f"{head}.{body}.{sig}") == "bad signature"


# --- claim shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("sub", ["", " alice", "alice ", "a\x00b", "a\nb", "a\u2028b", "x" * 257, 42])
def test_bad_sub(sub):
    """sub must be a printable string of 1-256 characters without surrounding space."""
    with pytest.raises(InvalidToken):
        verifier().verify(token(sub=sub))


def test_sub_limits():
    """256 printable characters, non-ASCII included, are a valid sub, and the default name."""
    principal = verifier().verify(token(sub="ü" * 256))
    assert principal.sub == principal.name == "ü" * 256


@pytest.mark.parametrize(
    "name", ["", " Alice", "Alice ", "A\x1b[31m", "A\tB", "A\u0085B", "x" * 65, 7, ["A"], True]
)
def test_bad_name(name):
    """name must be a printable string of 1-64 characters."""
    assert refusal(token(name=name)) == "name must be a printable string of 1-64 characters"


@pytest.mark.parametrize(
    "name",
    [
        "Ali\u200bce",  # zero-width space
        "Alice\u200d",  # zero-width joiner, at the end
        "\u202eecilA",  # right-to-left override: shows as "Alice"
        "Al\u2066ice\u2069",  # left-to-right isolate
        "\ufeffAlice",  # byte order mark
        "Al\u00adice",  # soft hyphen
        "Alice\U000e0041",  # tag character
    ],
)
def test_name_with_format_characters(name):
    """A display name holding an invisible or reordering character (Cf) is refused, saying so."""
    assert refusal(token(name=name)) == NAME_WITH_FORMAT_CHARACTERS


def test_sub_as_name_with_format_characters():
    """Without a name claim sub is the display name, so the same rule applies to it."""
    assert refusal(token(sub="ali\u200bce")) == NAME_WITH_FORMAT_CHARACTERS
    assert verifier().verify(token(sub="ali\u200bce", name="Alice")).sub == "ali\u200bce"


def test_visible_non_ascii_names():
    """Letters, marks and emoji without joiners are fine: only Cf is refused."""
    for name in ("Zoë", "José", "李小龍", "Ñandú 🦩", "\u0645\u062d\u0645\u062f"):
        assert verifier().verify(token(name=name)).name == name


def test_name_of_64_characters():
    """64 characters is the longest name."""
    assert verifier().verify(token(name="N" * 64)).name == "N" * 64


@pytest.mark.parametrize("rooms", ["lobby", {"lobby": 1}, ["ok", "bad room"], ["ok", 5], [""]])
def test_bad_rooms(rooms):
    """rooms must be a list of valid room names."""
    assert refusal(token(rooms=rooms)) == "rooms must be a list of room names"


@pytest.mark.parametrize("exp", ["soon", True, None, [1]])
def test_bad_exp_shape(exp):
    """principal_from_claims refuses an exp that is not a number."""
    with pytest.raises(InvalidToken, match="exp must be a number"):
        principal_from_claims({"sub": "a", "exp": exp})


def test_float_exp_is_truncated():
    """A fractional exp becomes whole seconds."""
    assert principal_from_claims({"sub": "a", "exp": 12.9}).exp == 12


# --- Principal ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rooms", [None, frozenset(), frozenset({"b", "a"})])
def test_principal_json_round_trip(rooms):
    """to_json/from_json round-trips, with rooms sorted in the JSON."""
    import json

    principal = Principal(sub="s", name="N", exp=123, rooms=rooms)
    data = json.loads(json.dumps(principal.to_json()))
    assert Principal.from_json(data) == principal
    if rooms:
        assert data["rooms"] == ["a", "b"]
    if rooms is None:
        assert data["rooms"] is None


# --- the path that accepts common tokens without PyJWT's generality -----------------


def _outcome(call, token_):
    """What a verification comes to: the Principal, or the refusal's text."""
    try:
        return call(token_)
    except InvalidToken as e:
        return f"refused: {e}"


def test_a_common_token_is_accepted_without_pyjwt(monkeypatch):
    """An HS256 token with the usual claims is accepted by chatd's own checks; PyJWT is not called."""
    v = verifier(issuer="https://issuer.example")
    monkeypatch.setattr(jwt, "decode", lambda *a, **kw: pytest.fail("PyJWT was asked"))
    principal = v.verify(token(name="Alice", rooms=["lobby"], iss="https://issuer.example", jti="j1"))
    assert (principal.sub, principal.name, principal.rooms) == ("alice", "Alice", frozenset({"lobby"}))


@pytest.mark.parametrize("why, token_, kwargs", [
    ("wrong key", lambda: token(key=OTHER_SECRET), {}),
    ("expired", lambda: token(ttl=-10), {}),
    ("alg none", lambda: jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, None, algorithm="none"), {}),
    ("alg not allowed", lambda: token(algorithm="HS384"), {}),
    ("float exp", lambda: token(exp=time.time() + 60), {}),
    ("kid header", lambda: jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, SECRET, headers={"kid": "k"}), {}),
    ("audience configured", lambda: token(aud="chat"), {"audience": "chat"}),
    ("wrong issuer", lambda: token(iss="https://other.example"), {"issuer": "https://issuer.example"}),
    ("padded segments", lambda: token().replace(".", "=.", 1), {}),
])
def test_anything_else_is_pyjwts_to_decide(why, token_, kwargs):
    """Tokens off the common path get PyJWT's verdict, word for word, whatever it is."""
    v = verifier(**kwargs)
    t = token_()
    assert v._accepted_at_once(t) is None, why
    assert _outcome(v.verify, t) == _outcome(lambda x: principal_from_claims(v._decoded(x)), t)


def test_a_short_key_leaves_every_token_to_pyjwt():
    """A key PyJWT warns about for an allowed algorithm turns chatd's own path off."""
    assert verifier(key=b"short", algorithms=["HS256"])._fast_key is None
    assert verifier(key=b"k" * 32, algorithms=["HS256", "HS512"])._fast_key is None
    assert verifier(key=b"k" * 64, algorithms=["HS256", "HS512"])._fast_key == b"k" * 64


_NOW = int(time.time())
_TIMES = st.one_of(
    st.sampled_from([_NOW - 10_000, _NOW - 5, _NOW + 5, _NOW + 10_000]),
    st.floats(min_value=_NOW - 10_000, max_value=_NOW + 10_000).filter(lambda t: abs(t - _NOW) > 100),
    st.sampled_from(["1999999999", True, None, [1]]),
)
_STRINGS = st.one_of(st.sampled_from(["alice", "https://issuer.example", ""]), st.integers(), st.none())


def _b64(data):
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.one_of(
        st.sampled_from([{"alg": "HS256"}, {"alg": "HS256", "typ": "JWT"}, {"typ": "JWT", "alg": "HS512"}]),
        st.dictionaries(
            st.sampled_from(["alg", "typ", "kid", "crit", "b64"]),
            st.sampled_from(["HS256", "HS384", "HS512", "none", "RS256", "JWT", "jwt", 7, None, ["exp"], False]),
        ),
    ),
    changes=st.dictionaries(st.sampled_from(["exp", "iat", "nbf", "sub", "iss", "aud", "jti", "name"]),
                            st.one_of(_TIMES, _STRINGS, st.just("(drop)")), max_size=3),
    payload_kind=st.sampled_from(["object"] * 8 + ["list", "junk"]),
    key=st.sampled_from([SECRET] * 4 + [OTHER_SECRET]),
    tamper=st.sampled_from([""] * 8 + ["pad", "junk", "dots", "unicode"]),
    issuer=st.sampled_from(["", "https://issuer.example"]),
    audience=st.sampled_from(["", "", "", "alice"]),
    leeway=st.sampled_from([0, 30]),
    algorithms=st.sampled_from([["HS256"], ["HS256"], ["HS256", "HS512"], ["HS384"]]),
)
def test_chatd_path_and_pyjwt_agree_on_every_token(
    header, changes, payload_kind, key, tamper, issuer, audience, leeway, algorithms
):
    """
    Whatever the token, verify() comes to what PyJWT alone decides (with
    chatd's own claim rules after it), and chatd's own path accepts only
    tokens PyJWT accepts.
    """
    import hmac as hmac_
    import json as json_

    from chatd.auth import _HMAC_HASHES

    claims = {"sub": "alice", "exp": _NOW + 10_000, "iat": _NOW - 5, "iss": "https://issuer.example"}
    claims.update(changes)
    claims = {name: value for name, value in claims.items() if value != "(drop)"}
    body = {"object": json_.dumps(claims), "list": "[1]", "junk": "{"}[payload_kind].encode()
    signing_input = f"{_b64(json_.dumps(header).encode())}.{_b64(body)}"
    digest = _HMAC_HASHES.get(header.get("alg") if isinstance(header.get("alg"), str) else None, None)
    signature = hmac_.new(key, signing_input.encode(), digest or "sha256").digest()
    t = f"{signing_input}.{_b64(signature)}"
    t = {"": t, "pad": t + "=", "junk": t[:5] + "!" + t[5:], "dots": t + ".x", "unicode": t + "é"}[tamper]
    v = TokenVerifier(SECRET, algorithms, issuer=issuer, audience=audience, leeway=leeway)
    fast = v._accepted_at_once(t)
    pyjwt = _outcome(lambda x: principal_from_claims(v._decoded(x)), t)
    if fast is not None:
        assert fast == v._decoded(t)  # PyJWT accepts it too, with the same claims
    assert _outcome(v.verify, t) == pyjwt
