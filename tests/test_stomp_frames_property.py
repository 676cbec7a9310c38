# -*- test-case-name: tests.test_stomp_frames_property -*-
"""
chatd.stomp.frames over arbitrary input: what the encoder writes the parser
reads back unchanged in every version, however the bytes are split into
WebSocket messages and with heart-beats anywhere between frames; and any
bytes at all end in frames or a FrameError, nothing else.
"""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.stomp import frames
from chatd.stomp.frames import Frame, FrameError, FrameParser

CAP = 4096

# Unicode that UTF-8 can carry (no lone surrogates: no STOMP peer can send
# them) and no NUL, which ends a frame.
text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0"), max_size=20)
raw_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\0\r\n"), max_size=20)
escaped_commands = sorted(frames.COMMANDS - frames.UNESCAPED_COMMANDS)
HEART_BEATS = st.sampled_from([b"", b"\n", b"\r\n", b"\n\n", b"\r\n\n"])


@st.composite
def frames_in(draw, version):
    """A frame the encoder can write in C{version}."""
    raw = version == frames.V10 or draw(st.booleans())
    if raw:
        command = draw(st.sampled_from(sorted(frames.COMMANDS)))
        names, values = raw_text.filter(lambda n: ":" not in n), raw_text
    else:
        command = draw(st.sampled_from(escaped_commands))
        names = values = text if version == frames.V12 else text.filter(lambda t: "\r" not in t)
    names = names.filter(lambda n: n != "content-length")
    headers = tuple(draw(st.lists(st.tuples(names, values), max_size=5)))
    body = draw(st.binary(max_size=300))
    return version, Frame(command, headers, body)


versions = st.sampled_from(frames.VERSIONS)
any_frame = versions.flatmap(frames_in)


def as_read(frame):
    """The frame as the parser yields it: with the content-length encode() adds."""
    if frame.body:
        return Frame(frame.command, frame.headers + (("content-length", str(len(frame.body))),), frame.body)
    return frame


@given(any_frame)
@settings(max_examples=200, deadline=None)
def test_encode_then_parse_round_trips(case):
    """parse(encode(f)) == f in every version, repeats, colons and escapes included."""
    version, frame = case
    [back] = list(FrameParser(CAP, version).feed(frames.encode(frame, version)))
    assert back == as_read(frame)


@st.composite
def split_stream(draw):
    """Frames of one version, heart-beats between, cut at arbitrary points."""
    version = draw(versions)
    chosen = draw(st.lists(frames_in(version), min_size=1, max_size=5))
    data = b""
    for _, frame in chosen:
        data += draw(HEART_BEATS) + frames.encode(frame, version)
    data += draw(HEART_BEATS)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    return version, [frame for _, frame in chosen], pieces


@given(split_stream())
@settings(max_examples=200, deadline=None)
def test_any_split_reassembles_the_same_frames(case):
    """However the stream is cut into messages, the same frames come out, in order."""
    version, expected, pieces = case
    parser = FrameParser(CAP, version)
    got = []
    for piece in pieces:
        got += list(parser.feed(piece))
    assert got == [as_read(frame) for frame in expected]


@st.composite
def hostile_stream(draw):
    """Arbitrary bytes, or valid frames with bytes inserted, cut arbitrarily."""
    if draw(st.booleans()):
        data = draw(st.binary(max_size=600))
    else:
        version, frame = draw(any_frame)
        data = bytearray(frames.encode(frame, version))
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.sampled_from([b"\0", b"\n", b"\r", b":", b"\\", b"\xff", b"x"]))
        data = bytes(data)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


@given(hostile_stream(), st.sampled_from(frames.VERSIONS), st.integers(16, 700))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_bytes_give_frames_or_frame_error(pieces, version, cap):
    """Nothing but FrameError ever escapes, and every frame read is a known command within the cap."""
    parser = FrameParser(cap, version)
    try:
        for piece in pieces:
            for frame in parser.feed(piece):
                assert frame.command in frames.COMMANDS
                assert len(frames.encode(frame, frames.V12)) <= cap + 40  # + a content-length line
    except FrameError as e:
        assert e.code in ("bad_request", "too_large")


@st.composite
def message_frames_in(draw):
    """A version, and a destination, subscription id, message id and body a MESSAGE can carry in it."""
    version = draw(versions)
    if version == frames.V10:
        values = raw_text
    else:
        values = text if version == frames.V12 else text.filter(lambda t: "\r" not in t)
    return version, draw(values), draw(values), draw(values), draw(st.text(max_size=50))


@given(message_frames_in())
@settings(max_examples=200, deadline=None)
def test_message_frames_are_what_encode_writes(case):
    """MessageFrames, for any subscription id, writes the very bytes encode(message(...)) does."""
    version, destination, subscription, message_id, body = case
    expected = frames.encode(frames.message(destination, subscription, message_id, body), version)
    assert frames.MessageFrames(destination, message_id, body, version).encode(subscription) == expected
