# -*- test-case-name: tests.test_auth -*-
"""
The application's JWT, verified into a L{Principal}.

Pure: no I/O, no Twisted.  The rules the issue fixes, and the library
defaults they override: C{exp} and C{sub} are required (PyJWT accepts a
token without C{exp} unless told), algorithms come from the configuration and
never from the token header, C{iss}/C{aud} are checked only when configured
(PyJWT would otherwise refuse any token carrying C{aud}).
"""

import binascii
import dataclasses
import re
import unicodedata
from typing import FrozenSet, Optional

import jwt

from chatd.messages import is_room_name

# Printable, no control characters, no leading/trailing space: names reach
# every member's screen and the logs.  No lone surrogates either: JSON's
# \u escapes can spell them, and no UTF-8 encoder (WELCOME, the log) takes them.
_NAME = re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]{1,64}\Z")
_SUB = re.compile(r"[^\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]{1,256}\Z")
NAME_WITH_FORMAT_CHARACTERS = (
    "name must not contain invisible format characters (Unicode category Cf: "
    "zero-width characters, bidi overrides); without a name claim, sub is the name"
)


def has_format_characters(text):
    """
    True when C{text} holds a Unicode format character (category Cf):
    zero-width space and joiners, bidi embeddings, overrides and isolates,
    the BOM, soft hyphen, tag characters.  They are invisible or reorder
    what is shown around them, so a display name holding one can pass for
    another user's name.
    """
    # No ASCII character is one (the first is U+00AD): most names are ASCII.
    return not text.isascii() and any(unicodedata.category(c) == "Cf" for c in text)


class InvalidToken(Exception):
    """The JWT was refused; the message is safe to show the client."""


@dataclasses.dataclass(frozen=True, slots=True)  # one per connection: no per-instance dict
class Principal:
    """Who a connection acts for, as the JWT said."""

    sub: str
    name: str
    exp: int
    rooms: Optional[FrozenSet[str]] = None  # None: any room

    def may_enter(self, room):
        return self.rooms is None or room in self.rooms

    def to_json(self):
        return {
            "sub": self.sub,
            "name": self.name,
            "exp": self.exp,
            "rooms": sorted(self.rooms) if self.rooms is not None else None,
        }

    @classmethod
    def from_json(cls, data):
        rooms = data.get("rooms")
        return cls(
            sub=data["sub"],
            name=data["name"],
            exp=int(data["exp"]),
            rooms=frozenset(rooms) if rooms is not None else None,
        )


_KEYED = {}  # a PyJWT algorithm class -> its subclass that prepares each key once


def _keyed(algorithm):
    """
    C{algorithm} (a PyJWT C{Algorithm}) as one whose C{prepare_key}
    remembers the key it last prepared, by identity: PyJWT prepares the key
    on every token (for an HS* secret, a check that it is no PEM, SSH or DER
    key, DER by two failed parses, in about a third of a token's time;
    docs/performance.md), and the verifier's key is one object, checked
    when it is loaded (L{chatd.config.read_jwt_key}).  Its C{check_key_length}
    (PyJWT asks it on every token too; for an HS* secret, two hash objects
    made to learn a digest size) likewise remembers its verdict for the key
    it last checked: the prepared key, the same object token after token.
    Everything else, every check of the token itself, is PyJWT's own.
    """
    base = type(algorithm)
    keyed = _KEYED.get(base)
    if keyed is None:

        def prepare_key(self, key):
            last = self.__dict__.get("_chatd_prepared")
            if last is not None and last[0] is key:
                return last[1]
            prepared = base.prepare_key(self, key)
            self._chatd_prepared = (key, prepared)  # the key object is kept: its id cannot be reused
            return prepared

        def check_key_length(self, key):
            last = self.__dict__.get("_chatd_length")
            if last is not None and last[0] is key:
                return last[1]
            verdict = base.check_key_length(self, key)
            self._chatd_length = (key, verdict)
            return verdict

        methods = {"prepare_key": prepare_key}
        if hasattr(base, "check_key_length"):  # the PyJWTs that have it ask it on every token
            methods["check_key_length"] = check_key_length
        keyed = _KEYED[base] = type(base.__name__, (base,), methods)
    copy = object.__new__(keyed)
    copy.__dict__.update(algorithm.__dict__)
    return copy


# A base64url segment as PyJWT 2.15's PyJWS._decode_base64url_segment accepts
# it: the URL-safe alphabet, no length of 4n+1, '=' only to pad a last
# quantum to 4 characters, and canonical: the bits a last quantum of 2 (3)
# characters leaves over are zero, as re-encoding what it decoded to checks.
_SEGMENT = re.compile(
    rb"(?:[A-Za-z0-9_-]{4})*+"
    rb"(?:[A-Za-z0-9_-][AQgw](?:==)?|[A-Za-z0-9_-]{2}[AEIMQUYcgkosw048]=?)?"
)
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")


class _SegmentJWS(jwt.PyJWS):
    """
    PyJWT's PyJWS, whose C{_decode_base64url_segment} takes the segments it
    accepts in one pass of L{_SEGMENT} and one C{binascii} call: PyJWT 2.15's
    walks each character of the segment in a generator and encodes what it
    decoded again to compare (about 12 of a token's 30 µs).  It adds no
    state, so the verifier's own PyJWS can be made one (L{_decoder}).

    Same bytes out, for the same segments: a segment L{_SEGMENT} matches is
    one PyJWT accepts, padded as PyJWT pads it (to a multiple of 4 with '=';
    a padded one already is) and decoded by the same C{binascii.a2b_base64}
    after the translation of '-_' to '+/' that C{base64.urlsafe_b64decode}
    makes.  Any other segment goes to PyJWT's own function, so every refusal
    is PyJWT's, in its words.  tests/test_auth.py drives both over arbitrary
    and near-valid segments with the PyJWT installed: an upgrade that
    changes what PyJWT accepts fails there.
    """

    @staticmethod
    def _decode_base64url_segment(segment, name):
        if segment.__class__ is bytes and _SEGMENT.fullmatch(segment) is not None:
            return binascii.a2b_base64((segment + b"=="[: -len(segment) % 4]).translate(_FROM_URLSAFE))
        return jwt.PyJWS._decode_base64url_segment(segment, name)


def _decoder(algorithms, options):
    """
    A PyJWT instance of its own, with C{options} as its own (merged with
    PyJWT's defaults once, not on every token), whose C{algorithms} prepare
    each key once (L{_keyed}) and whose PyJWS decodes base64url segments
    as L{_SegmentJWS}; PyJWT's module-level decoder if its layout (a
    private C{_jws}) ever changes.

    @return: C{(decoder, options)}: what to call C{decode} on and the
        options to pass it (L{None}: the instance's own).
    """
    decoder = jwt.PyJWT(options)
    try:
        jws = decoder._jws
        if type(jws) is jwt.PyJWS:
            jws.__class__ = _SegmentJWS
        for name in algorithms:
            keyed = _keyed(jws.get_algorithm_by_name(name))
            jws.unregister_algorithm(name)
            jws.register_algorithm(name, keyed)
    except (AttributeError, KeyError, NotImplementedError, TypeError, ValueError):
        return jwt, options
    return decoder, None


class TokenVerifier:
    """Checks JWTs against one deployment's key, algorithms, iss and aud."""

    def __init__(self, key, algorithms, issuer="", audience="", leeway=0):
        self._key = key
        self._algorithms = list(algorithms)
        self._issuer = issuer or None
        self._audience = audience or None
        self._leeway = leeway
        require = ["exp", "sub"]
        if self._issuer is not None:
            require.append("iss")
        if self._audience is not None:
            require.append("aud")
        options = {"require": require, "verify_aud": self._audience is not None}
        self._jwt, self._options = _decoder(self._algorithms, options)

    @classmethod
    def from_settings(cls, settings):
        auth = settings.auth
        return cls(settings.jwt_key, auth.algorithms, auth.issuer, auth.audience, auth.leeway)

    def use_key(self, key):
        """
        Verify with C{key} from now on (a SIGHUP reload, see
        L{chatd.reload}); tokens signed only with the old key are refused.
        """
        self._key = key

    def verify(self, token):
        """
        @return: the L{Principal} the token names.
        @raise InvalidToken: for any token chatd does not accept.
        """
        if not isinstance(token, str) or not token:
            raise InvalidToken("missing token")
        try:
            claims = self._jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                options=self._options,
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("token not yet valid") from None
        except jwt.MissingRequiredClaimError as e:
            raise InvalidToken(f"token has no {e.claim} claim") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("wrong audience") from None
        except jwt.InvalidAlgorithmError:
            raise InvalidToken("algorithm not allowed") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except jwt.InvalidKeyError:
            # The key does not suit an allowed algorithm (a PEM as an HS*
            # secret, say).  config.read_jwt_key refuses such keys at
            # start-up and on reload; a verifier built otherwise still
            # answers "no" (401), never an error out of verify.
            raise InvalidToken("token cannot be verified") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            # DecodeError and friends (and any other PyJWT error, which
            # is not an InvalidTokenError): nothing worth telling a client
            # beyond "no".
            raise InvalidToken("malformed token") from None
        return principal_from_claims(claims)


def is_sub(value):
    """A user id as tokens carry it: printable, 1-256 characters, no outer spaces."""
    return isinstance(value, str) and _SUB.match(value) is not None and value == value.strip()


def is_display_name(value):
    """A display name: printable, 1-64 characters, no outer spaces, no format characters."""
    return (
        isinstance(value, str) and _NAME.match(value) is not None and value == value.strip()
        and not has_format_characters(value)
    )


def principal_from_claims(claims):
    """The checks PyJWT does not do: claim types and shapes."""
    sub = claims.get("sub")
    if not is_sub(sub):
        raise InvalidToken("sub must be a printable string of 1-256 characters")
    name = claims.get("name", sub)  # sub as checked above: the contract allows it up to 256 characters
    if isinstance(name, str) and has_format_characters(name):
        raise InvalidToken(NAME_WITH_FORMAT_CHARACTERS)
    if "name" in claims and not is_display_name(name):
        raise InvalidToken("name must be a printable string of 1-64 characters")
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        raise InvalidToken("exp must be a number")
    rooms = claims.get("rooms")
    if rooms is not None:
        if not isinstance(rooms, list) or not all(is_room_name(r) for r in rooms):
            raise InvalidToken("rooms must be a list of room names")
        rooms = frozenset(rooms)
    return Principal(sub=sub, name=name, exp=int(exp), rooms=rooms)
