# -*- test-case-name: tests.test_messages_property -*-
"""
chatd.messages.parse_client_message over arbitrary input: it returns a
command whose every field satisfies the protocol's rules, or raises
ProtocolError with a known code, and nothing else, ever.  The server's answers
built from either (events and ERROR frames) encode as UTF-8.

The strategies mix three kinds of input: arbitrary text; JSON of arbitrary
values, including lone surrogates spelled as escapes (valid UTF-8 on the
wire, unencodable once parsed); and frames built from the protocol's own
keys with values near and across each rule's edge, so the deep branches are
reached rather than rejected at "not JSON".
"""

import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chatd import errors, messages
from chatd.errors import ProtocolError

# Every code point, lone surrogates included (Hypothesis leaves them out by default).
ANY_CHAR = st.characters(exclude_categories=())
any_text = st.text(ANY_CHAR, max_size=80)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=12,
)

room_like = (
    st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True)
    | st.from_regex(r"[A-Za-z0-9_.\-]{65,70}", fullmatch=True)
    | st.sampled_from(["", "lobby", "lob by", "lobby\n", "ロビー", "../etc"])
    | any_text
)
event_id_like = (
    st.from_regex(r"[0-9]{1,20}(-[0-9]{1,20}){0,3}", fullmatch=True)
    | st.from_regex(r"[0-9]{1,22}(-[0-9]{0,3}){0,5}", fullmatch=True)
    | any_text
)
field_values = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["ENTER", "TALK", "QUIT", "AUTH", "talk", "", "WELCOME"]) | json_values,
        "room": room_like | json_values,
        "message": any_text | st.text(max_size=300) | json_values,
        "since": event_id_like | json_values,
        "cid": any_text | st.text(min_size=60, max_size=70) | json_values,
        "ref": any_text | st.integers() | st.sampled_from([2**53 - 1, 2**53, -(2**53)]) | json_values,
        "token": any_text | st.just("eyJ.a.b") | json_values,
    },
)
frames = st.one_of(
    any_text,
    json_values.map(json.dumps),
    field_values.map(json.dumps),
    # ensure_ascii=False cannot write lone surrogates; such frames keep the escapes.
    field_values.map(lambda f: _json_raw(f)),
    field_values.map(json.dumps).flatmap(lambda s: st.integers(0, len(s)).map(lambda n: s[:n])),
)


def _json_raw(frame):
    text = json.dumps(frame, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(frame)
    return text


def encodable(text):
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_ref(ref):
    if ref is None:
        return
    if isinstance(ref, str):
        assert len(ref) <= messages.MAX_REF_CHARS and encodable(ref)
    else:
        assert type(ref) is int and -(2**53) < ref < 2**53


def check_command(command, max_talk_chars):
    """The invariants a command promises the rest of chatd."""
    check_ref(command.ref)
    if isinstance(command, messages.Auth):
        assert isinstance(command.token, str) and command.token
        assert len(command.token) <= messages.MAX_TOKEN_CHARS and encodable(command.token)
        return
    assert messages.is_room_name(command.room)
    if isinstance(command, messages.Enter):
        if command.since is not None:
            messages.event_id_key(command.since)  # raises if it is not an id
    elif isinstance(command, messages.Talk):
        assert isinstance(command.message, str) and 0 < len(command.message) <= max_talk_chars
        if command.cid is not None:
            assert isinstance(command.cid, str) and 0 < len(command.cid) <= messages.MAX_CID_CHARS
            assert encodable(command.cid)
        # What the hub will broadcast must encode: the bug this test found.
        event = messages.RoomEvent("TALK", "1-1", command.room, "someone", command.message, 1, 0)
        messages.event(event, command.ref).encode("utf-8")
    else:
        assert isinstance(command, messages.Quit)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=frames, max_talk_chars=st.integers(1, 5000))
@example(text='{"type": "TALK", "room": "r", "message": "\\ud800"}', max_talk_chars=10)
@example(text='{"type": "TALK", "room": "r", "message": "x", "ref": "\\udfff"}', max_talk_chars=10)
@example(text='{"type": "TALK", "room": "r", "message": "x", "cid": "\\ud83d"}', max_talk_chars=10)
@example(text='{"type": "AUTH", "token": "\\ud800"}', max_talk_chars=10)
@example(text="[" * 5000, max_talk_chars=10)
@example(text='{"type": "ENTER", "room": "r", "ref": ' + "9" * 5000 + "}", max_talk_chars=10)
@example(text='{"type": "TALK", "room": "r", "message": "x", "ref": NaN}', max_talk_chars=10)
def test_parse_yields_a_valid_command_or_a_known_error(text, max_talk_chars):
    """Any input: a command that keeps every rule, or ProtocolError with a known code."""
    try:
        command = messages.parse_client_message(text, max_talk_chars)
    except ProtocolError as e:
        assert e.code in errors.ERROR_CODES
        assert isinstance(e.message, str) and e.message
        check_ref(e.ref)
        messages.error(e.code, e.message, e.ref).encode("utf-8")
        return
    check_command(command, max_talk_chars)


@settings(max_examples=300, deadline=None)
@given(room=st.from_regex(r"[A-Za-z0-9_.\-]{1,64}", fullmatch=True), message=st.text(min_size=1, max_size=50))
def test_well_formed_talk_is_accepted(room, message):
    """The property above is not vacuous: every well-formed TALK parses as given."""
    command = messages.parse_client_message(
        json.dumps({"type": "TALK", "room": room, "message": message, "ref": 7}), 50
    )
    assert command == messages.Talk(room=room, message=message, ref=7)


refs = st.one_of(
    st.none(), st.text(max_size=20), st.integers(-(2**53) + 1, 2**53 - 1),
    st.booleans(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2),
)
room_events = st.builds(
    messages.RoomEvent,
    type=st.sampled_from([messages.ENTER, messages.TALK, messages.QUIT]),
    id=st.from_regex(r"[0-9]{1,20}(-[0-9]{1,20}){0,3}", fullmatch=True),
    room=st.text(max_size=70),
    sender=st.text(max_size=30),
    message=st.text(max_size=200),
    user_count=st.one_of(st.integers(0, 10**6), st.booleans()),
    ts=st.one_of(st.integers(0, 2**53), st.floats(allow_nan=False, allow_infinity=False)),
    system=st.booleans(),
)


@settings(max_examples=1000, deadline=None)
@given(event=room_events, ref=refs)
@example(event=messages.RoomEvent("TALK", "1-1", "r", "a\u2028b", "\"\\\x00\ud800é", 1, 0), ref="\udfff")
def test_event_text_is_the_encoding_of_to_wire(event, ref):
    """
    event() builds the text directly; it is exactly the JSON encoding of
    to_wire(ref), and with_ref() of the shared text is the actor's copy,
    for any text, ref (of any type) and field value.
    """
    expected = json.dumps(event.to_wire(ref), ensure_ascii=False, separators=(",", ":"))
    assert messages.event(event, ref) == expected
    assert messages.with_ref(messages.event(event), ref) == expected


@settings(max_examples=1000, deadline=None)
@given(
    user=st.text(ANY_CHAR, max_size=40),
    expires=st.one_of(st.integers(-(2**70), 2**70), st.booleans(), st.floats(allow_nan=False)),
    ref=refs,
)
@example(user="\"\\\x00\x1f\x7f\u2028\ud800é ロ", expires=1732150800, ref=None)
def test_welcome_text_is_the_encoding_of_its_fields(user, expires, ref):
    """
    welcome() builds the common WELCOME directly; it is exactly the JSON
    encoding of its fields, for any name (control characters, non-ASCII,
    lone surrogates), expiry and ref.
    """
    wire = {"type": "WELCOME", "user": user, "expires": expires}
    if ref is not None:
        wire["ref"] = ref
    expected = json.dumps(wire, ensure_ascii=False, separators=(",", ":"))
    assert messages.welcome(user, expires, ref) == expected
