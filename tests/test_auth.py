# -*- test-case-name: tests.test_auth -*-
"""
chatd.auth: real PyJWT tokens through TokenVerifier, and the claim rules
PyJWT does not enforce.
"""

import time
import unicodedata

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd import config
from chatd.auth import (
    _SEGMENT, NAME_WITH_FORMAT_CHARACTERS, InvalidToken, Principal, TokenVerifier, _SegmentJWS,
    has_format_characters, principal_from_claims,
)

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


@pytest.mark.parametrize("form", ["pem", "openssh", "der"])
def test_public_key_as_hs_secret_is_a_refusal(rsa_key, form):
    """
    PyJWT refuses a public key as an HMAC secret with InvalidKeyError, which
    is no InvalidTokenError: a verifier built with one refuses every token
    with InvalidToken (a 401), rather than letting PyJWT's error out.
    """
    encodings = {
        "pem": (serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        "openssh": (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
        "der": (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
    }
    key = rsa_key.public_key().public_bytes(*encodings[form])
    assert refusal(token(), key=key) == "token cannot be verified"


@pytest.mark.parametrize("key", [SECRET, b""], ids=["secret", "empty"])
def test_secret_as_rs256_key_is_a_refusal(rsa_key, key):
    """An RS256 verifier whose key is no public key refuses a well-signed token with InvalidToken."""
    assert refusal(token(key=rsa_key, algorithm="RS256"), key=key, algorithms=["RS256"]) == (
        "token cannot be verified"
    )


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


# --- the key prepared once -------------------------------------------------------------------


def keys_passed_to(monkeypatch, cls, name):
    """The keys PyJWT's C{cls.name(self, key)} is called with from now on, in a list; it still runs."""
    keys = []
    real = getattr(cls, name)

    def recording(self, key):
        keys.append(key)
        return real(self, key)

    monkeypatch.setattr(cls, name, recording)
    return keys


def test_key_prepared_once_per_key(monkeypatch):
    """
    PyJWT's key preparation (for HS*, the check that the secret is no PEM,
    SSH or DER key) runs once for the verifier's key, not once per token,
    and again once for a key set by use_key; tokens are still checked.
    """
    tokens = [token(algorithm=algorithm) for algorithm in ("HS256", "HS512", "HS256")]
    other, old = token(key=OTHER_SECRET), token()
    prepared = keys_passed_to(monkeypatch, jwt.algorithms.HMACAlgorithm, "prepare_key")
    v = verifier(algorithms=["HS256", "HS512"])
    for token_ in tokens:
        assert v.verify(token_).sub == "alice"
    assert prepared == [SECRET, SECRET]  # once for each algorithm's object
    with pytest.raises(InvalidToken):
        v.verify(other)
    v.use_key(OTHER_SECRET)
    assert v.verify(other).sub == "alice"
    with pytest.raises(InvalidToken):
        v.verify(old)
    assert prepared == [SECRET, SECRET, OTHER_SECRET]


@pytest.mark.parametrize("algorithm", ["HS256", "RS256"])
def test_keyed_decoder_answers_as_pyjwt(rsa_key, rsa_public_pem, algorithm):
    """
    Every token of a mixed set (good, expired, wrong key, other algorithm,
    alg none, tampered, malformed) gets the same answer from the verifier's
    decoder as from PyJWT's own jwt.decode.
    """
    if algorithm == "HS256":
        key, signing, other = SECRET, SECRET, OTHER_SECRET
    else:
        key, signing = rsa_public_pem, rsa_key
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    good = token(key=signing, algorithm=algorithm)
    head, body, signature = good.split(".")
    tokens = [
        good, token(ttl=-10, key=signing, algorithm=algorithm), token(key=other, algorithm=algorithm),
        token(key=SECRET, algorithm="HS512"), token(key=None, algorithm="none"), f"{head}.{body}x.{signature}",
        f"{head}.{body}", "a.b.c", good + "=",
    ]
    v = verifier(key=key, algorithms=[algorithm])
    options = {"require": ["exp", "sub"], "verify_aud": False}

    def answer(decode, token_):
        try:
            return decode(token_, key, algorithms=[algorithm], options=options)
        except jwt.PyJWTError as e:
            return type(e)

    for token_ in tokens * 2:  # the second time with the key prepared
        assert answer(v._jwt.decode, token_) == answer(jwt.decode, token_), token_


def test_key_length_checked_once_per_key(monkeypatch):
    """
    PyJWT's key length check runs once for the verifier's key (per
    algorithm), not once per token, and again once for a key set by
    use_key; a key it finds short is still warned about on every token.
    """
    tokens = [token(algorithm=algorithm) for algorithm in ("HS256", "HS512", "HS256", "HS512")]
    short = b"s" * 16
    with pytest.warns(jwt.warnings.InsecureKeyLengthWarning):
        weak = token(key=short)
    checked = keys_passed_to(monkeypatch, jwt.algorithms.HMACAlgorithm, "check_key_length")
    v = verifier(algorithms=["HS256", "HS512"])
    for token_ in tokens:
        assert v.verify(token_).sub == "alice"
    assert checked == [SECRET, SECRET]  # once for each algorithm's object
    v.use_key(short)
    for _ in range(2):
        with pytest.warns(jwt.warnings.InsecureKeyLengthWarning, match="16 bytes long"):
            assert v.verify(weak).sub == "alice"
    assert checked == [SECRET, SECRET, short]


# --- base64url segments: PyJWT's function and chatd's -------------------------------------------

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_pyjwt_segment = jwt.api_jws.PyJWS._decode_base64url_segment
_chatd_segment = _SegmentJWS._decode_base64url_segment


def _outcome(decode, segment):
    """What decode makes of segment: its bytes, or the type and words of its exception."""
    try:
        return decode(segment, "payload")
    except Exception as e:  # any exception, its type and words, is part of the answer compared
        return type(e), str(e)


def _assert_decoded_as_by_pyjwt(segment):
    """chatd's segment decoder answers as PyJWT's, and takes its own path exactly for what PyJWT accepts."""
    expected = _outcome(_pyjwt_segment, segment)
    assert _outcome(_chatd_segment, segment) == expected, segment
    assert (_SEGMENT.fullmatch(segment) is not None) == isinstance(expected, bytes), segment


def _near_valid_segments():
    """Base64url text as issuers write it and as they get it wrong: padding, stray and non-canonical characters."""
    letters = st.sampled_from(list(_ALPHABET))
    any_byte = st.integers(0, 255)
    return st.builds(
        lambda body, last, padding, junk: _insert(bytes(body) + bytes(last) + padding, junk),
        body=st.lists(letters, max_size=14),
        last=st.lists(letters | any_byte | st.sampled_from(list(b"=.+/ \n")), max_size=1),
        padding=st.sampled_from([b"", b"=", b"==", b"===", b"===="]),
        junk=st.none() | st.tuples(
            st.integers(0, 20), st.sampled_from([b"=", b"+", b"/", b"!", b"\n", b" ", b"\x80", b"."])
        ),
    )


def _insert(segment, junk):
    """segment with junk's bytes inserted at junk's offset (or at its end), if any."""
    if junk is None:
        return segment
    at, what = junk
    at = min(at, len(segment))
    return segment[:at] + what + segment[at:]


@settings(max_examples=3000, deadline=None)
@given(segment=st.binary(max_size=24) | _near_valid_segments())
def test_segment_decoded_as_by_pyjwt(segment):
    """
    Over arbitrary bytes and near-valid base64url (trailing '=' of any
    count, lengths of every remainder, non-canonical last characters,
    characters outside the alphabet anywhere), chatd's segment decoder
    returns the bytes PyJWT's _decode_base64url_segment returns, or raises
    what it raises (type and message), and its own path is taken for
    exactly the segments PyJWT accepts.
    """
    _assert_decoded_as_by_pyjwt(segment)


def test_every_last_quantum_decoded_as_by_pyjwt():
    """
    Every last quantum (one to four characters, the last of them any
    byte, then zero to three '='), after no or one full quantum, gets
    PyJWT's answer: the canonical-form and padding rules live there.
    """
    for prefix in (b"", b"QUJD"):
        for quantum in (b"", b"A", b"Az", b"Az-"):
            for last in range(256):
                for padding in (b"", b"=", b"==", b"==="):
                    _assert_decoded_as_by_pyjwt(prefix + quantum + bytes([last]) + padding)
    for segment in (b"", b"=", b"==", b"====", b"QUJD====", "QUJD".encode("utf-16-le")):
        _assert_decoded_as_by_pyjwt(segment)


def test_segments_of_real_tokens_decoded_as_by_pyjwt(rsa_key):
    """The three segments of real HS256, HS512 and RS256 tokens decode to what PyJWT decodes them to."""
    for key, algorithm in ((SECRET, "HS256"), (SECRET, "HS512"), (rsa_key, "RS256")):
        for claims in ({}, {"name": "Alice Ünal", "rooms": ["lobby", "ops"]}, {"pad": "x" * 100}):
            for segment in token(key=key, algorithm=algorithm, **claims).encode().split(b"."):
                assert _chatd_segment(segment, "x") == _pyjwt_segment(segment, "x")


@settings(max_examples=500, deadline=None)
@given(
    which=st.integers(0, 2),
    change=st.sampled_from(["=", "==", "===", "!", ".", "A", "B", "Q", "_", " "]),
    at=st.integers(0, 400),
    replace=st.booleans(),
)
def test_verifier_decodes_altered_tokens_as_pyjwt(which, change, at, replace):
    """
    A good token with one segment altered (a character replaced or added,
    '=' appended, a dot added) gets the same answer from the verifier's
    decoder as from PyJWT's own jwt.decode: the payload, or the error's
    type and words.
    """
    segments = token(name="Alice", rooms=["lobby"]).split(".")
    segment = segments[which]
    at = min(at, len(segment))
    segments[which] = segment[:at] + change + segment[at + 1 if replace else at:]
    token_ = ".".join(segments)
    v = verifier()
    options = {"require": ["exp", "sub"], "verify_aud": False}

    def answer(decode):
        try:
            return decode(token_, SECRET, algorithms=["HS256"], options=options)
        except jwt.PyJWTError as e:
            return type(e), str(e)

    assert answer(v._jwt.decode) == answer(jwt.decode)


def test_verifier_decodes_segments_with_chatds_decoder():
    """The verifier's own PyJWS is the one whose segment decoder the tests above hold to PyJWT's."""
    jws = verifier()._jwt._jws
    assert type(jws) is _SegmentJWS
    assert isinstance(jws, jwt.PyJWS)


def test_no_ascii_character_is_a_format_character():
    """
    has_format_characters answers an ASCII text without looking at each
    character: no ASCII character is in category Cf, and such texts are
    answered as the full scan answers them.
    """
    assert not [c for c in map(chr, range(128)) if unicodedata.category(c) == "Cf"]
    assert not has_format_characters("".join(map(chr, range(128))))
    assert has_format_characters("Al\u00adice") and has_format_characters("\u200b")


@settings(max_examples=500, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=20) | st.text(max_size=20))
def test_format_characters_found_as_by_the_full_scan(text):
    """has_format_characters agrees with a scan of every character's category."""
    assert has_format_characters(text) == any(unicodedata.category(c) == "Cf" for c in text)


def _verify_with_options_per_call(key, algorithms, issuer, audience, leeway, token_):
    """
    TokenVerifier.verify's PyJWT call as it was up to cbd21b4 (the options
    built on each call and merged by PyJWT): the reference for the decoder
    that has them as its own.
    """
    options = {"require": ["exp", "sub"], "verify_aud": audience is not None}
    if issuer is not None:
        options["require"].append("iss")
    if audience is not None:
        options["require"].append("aud")
    try:
        return jwt.decode(
            token_, key, algorithms=algorithms, options=options, issuer=issuer, audience=audience, leeway=leeway,
        )
    except jwt.PyJWTError as e:
        return type(e)


_CLAIMS = {
    "sub": st.sampled_from([None, "alice", ""]),
    "exp": st.sampled_from([None, -3600, -5, 3600]),
    "nbf": st.sampled_from([None, -10, 5, 3600]),
    "iat": st.sampled_from([None, 0, 3600]),
    "iss": st.sampled_from([None, "https://issuer.example", "https://other.example"]),
    "aud": st.sampled_from([None, "chatd", "other", ["chatd", "x"], ["x"]]),
}


@settings(max_examples=300, deadline=None)
@given(
    claims=st.fixed_dictionaries(_CLAIMS),
    issuer=st.sampled_from(["", "https://issuer.example"]),
    audience=st.sampled_from(["", "chatd"]),
    leeway=st.sampled_from([0, 10]),
    algorithm=st.sampled_from(["HS256", "HS512"]),
    signed_with=st.sampled_from([SECRET, OTHER_SECRET]),
)
def test_verifier_decodes_as_with_options_per_call(claims, issuer, audience, leeway, algorithm, signed_with):
    """
    The verifier's decoder, whose options are its own, accepts and refuses
    every generated token as PyJWT's jwt.decode with the options passed on
    each call, and the claims it accepts are the same.
    """
    now = int(time.time())
    payload = {
        name: now + value if name in ("exp", "nbf", "iat") else value
        for name, value in claims.items() if value is not None
    }
    token_ = jwt.encode(payload, signed_with, algorithm=algorithm)
    v = verifier(algorithms=["HS256"], issuer=issuer, audience=audience, leeway=leeway)
    expected = _verify_with_options_per_call(
        SECRET, ["HS256"], issuer or None, audience or None, leeway, token_
    )
    try:
        got = v._jwt.decode(
            token_, SECRET, algorithms=["HS256"], options=v._options, issuer=issuer or None,
            audience=audience or None, leeway=leeway,
        )
    except jwt.PyJWTError as e:
        got = type(e)
    assert got == expected
