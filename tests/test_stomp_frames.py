# -*- test-case-name: tests.test_stomp_frames -*-
"""
chatd.stomp.frames: STOMP framing as the 1.0-1.2 specs and the real
clients (stomp.js 2.3.3, @stomp/stompjs 7) write it, and every refusal.
"""

import pytest

from chatd import errors
from chatd.stomp import frames
from chatd.stomp.frames import Frame, FrameError, FrameParser, FrameTooLarge, VersionMismatch

CAP = 1024


def parse(data, version=frames.V12, cap=CAP):
    """Every frame C{data} holds, fed in one piece."""
    return list(FrameParser(cap, version).feed(data))


def refusal(data, version=frames.V12, cap=CAP):
    """The FrameError that parsing C{data} ends in."""
    parser = FrameParser(cap, version)
    with pytest.raises(FrameError) as info:
        list(parser.feed(data))
    return info.value


# --- reading -----------------------------------------------------------------


def test_connect_as_stompjs_writes_it():
    """@stomp/stompjs 7's CONNECT: headers in order, empty body."""
    [frame] = parse(b"CONNECT\naccept-version:1.2,1.1,1.0\nheart-beat:10000,10000\n\n\0")
    assert frame.command == "CONNECT"
    assert frame.headers == (("accept-version", "1.2,1.1,1.0"), ("heart-beat", "10000,10000"))
    assert frame.body == b""


def test_crlf_lines():
    """CRLF ends lines as well as LF, including the blank line."""
    [frame] = parse(b"SEND\r\ndestination:/app/chat/a\r\n\r\nhi\0")
    assert frame.get("destination") == "/app/chat/a"
    assert frame.body == b"hi"


def test_heart_beats_between_frames_are_skipped():
    """Bare LFs and CRLFs before, between and after frames are heart-beats, not frames."""
    got = parse(b"\n\r\n\nDISCONNECT\n\n\0\n\r\nDISCONNECT\nreceipt:7\n\n\0\n")
    assert [f.command for f in got] == ["DISCONNECT", "DISCONNECT"]
    assert got[1].get("receipt") == "7"


def test_only_heart_beats():
    """Heart-beats alone yield nothing and leave the parser ready."""
    parser = FrameParser(CAP)
    assert list(parser.feed(b"\n\n\r\n")) == []
    assert list(parser.feed(b"\r")) == []  # maybe half a CRLF
    assert list(parser.feed(b"\nSEND\ndestination:/x\n\n\0"))[0].command == "SEND"


def test_content_length_lets_the_body_hold_nul():
    """With content-length the body may contain NUL and is read by length."""
    [frame] = parse(b"SEND\ndestination:/d\ncontent-length:3\n\na\0b\0")
    assert frame.body == b"a\0b"


def test_frame_split_over_messages():
    """A frame arriving in pieces (stomp.js splits at 16 KiB) is put back together."""
    data = b"SEND\ndestination:/d\n\n" + b"x" * 600 + b"\0"
    parser = FrameParser(CAP)
    got = []
    for i in range(0, len(data), 7):
        got += list(parser.feed(data[i : i + 7]))
    assert len(got) == 1 and got[0].body == b"x" * 600


def test_split_inside_crlf_and_content_length():
    """Splits inside the blank CRLF line and inside a content-length body are fine."""
    parser = FrameParser(CAP)
    assert list(parser.feed(b"SEND\r\ncontent-length:4\r\n\r")) == []
    assert list(parser.feed(b"\nab")) == []
    [frame] = list(parser.feed(b"\0d\0"))
    assert frame.body == b"ab\0d"


def test_several_frames_in_one_message():
    """One WebSocket message may hold several frames and the start of the next."""
    parser = FrameParser(CAP)
    got = list(parser.feed(b"SEND\ndestination:/a\n\n1\0SEND\ndestination:/b\n\n2\0SEND\n"))
    assert [f.body for f in got] == [b"1", b"2"]
    assert [f.body for f in parser.feed(b"destination:/c\n\n3\0")] == [b"3"]


def test_first_header_wins():
    """Repeated headers are all kept, and get() reads the first, as 1.2 says."""
    [frame] = parse(b"SEND\ndestination:/a\ndestination:/b\n\n\0")
    assert frame.get("destination") == "/a"
    assert frame.headers == (("destination", "/a"), ("destination", "/b"))


def test_value_keeps_later_colons():
    """A header splits at its first colon; later ones belong to the value (1.0, CONNECT)."""
    [frame] = parse(b"CONNECT\nlogin:a:b\n\n\0")
    assert frame.get("login") == "a:b"


def test_empty_header_value():
    """An empty value is a value (stomp.js sends some)."""
    [frame] = parse(b"SEND\ndestination:/d\nreceipt:\n\n\0")
    assert frame.get("receipt") == ""


@pytest.mark.parametrize(
    "version,raw,value",
    [
        (frames.V12, rb"a\nb\cc\\d\re", "a\nb:c\\d\re"),
        (frames.V11, rb"a\nb\cc\\d", "a\nb:c\\d"),
        (frames.V10, rb"a\nb", r"a\nb"),
    ],
)
def test_header_unescaping(version, raw, value):
    """Values are unescaped as the version says (1.0: not at all)."""
    [frame] = parse(b"SEND\nx" + raw + b":" + raw + b"\n\n\0", version)
    assert frame.headers == (("x" + value, value),)


def test_connect_is_never_unescaped():
    """CONNECT (and STOMP) values are taken as written, even in 1.2."""
    [frame] = parse(b"STOMP\npasscode:a\\cb\n\n\0")
    assert frame.get("passcode") == "a\\cb"


@pytest.mark.parametrize("version,escape", [(frames.V12, rb"\t"), (frames.V11, rb"\r"), (frames.V12, b"\\")])
def test_undefined_escape_is_fatal(version, escape):
    """An undefined escape (\\t; \\r in 1.1; a trailing backslash) is a protocol error."""
    error = refusal(b"SEND\ndestination:/d" + escape + b"\n\n\0", version)
    assert error.code == errors.BAD_REQUEST and "undefined escape" in error.message


# --- refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    "data,why",
    [
        (b"HELLO\n\n\0", "unknown command 'HELLO'"),
        (b"send\n\n\0", "unknown command 'send'"),
        (b"\0", "blank line between its headers"),
        (b"SEND\n\0", "blank line between its headers"),
        (b"SEND\nno-colon\n\n\0", "a header is name:value, got 'no-colon'"),
        (b"SEND\ndestination:/d\0\n\n", "blank line between its headers and its body"),
        (b"SEND\nx:\xff\n\n\0", "must be UTF-8"),
        (b"SEND\ncontent-length:x\n\n\0", "content-length must be a number"),
        (b"SEND\ncontent-length:-1\n\n\0", "content-length must be a number"),
        (b"SEND\ncontent-length:1\n\nab\0", "must end in NUL after content-length"),
        (b"\rSEND\n\n\0", "a CR between frames"),
        (b"SEND\nreceipt:a\rb\n\n\0", "a bare CR"),
        (b"SEND\nreceipt:a\r\r\n\n\0", "a bare CR"),
    ],
)
def test_malformed_frames(data, why):
    """Each malformed frame is a FrameError with code bad_request naming the problem."""
    error = refusal(data)
    assert not isinstance(error, FrameTooLarge)
    assert error.code == errors.BAD_REQUEST
    assert why in error.message


def test_long_bad_values_are_cut_in_the_answer():
    """An ERROR quotes at most 64 characters of what it refuses."""
    error = refusal(b"X" * 500 + b"\n\n\0")
    assert len(error.message) < 100


@pytest.mark.parametrize(
    "data",
    [
        b"SEND\n" + b"h:" + b"v" * CAP,  # a head that never ends
        b"SEND\ndestination:/d\n\n" + b"x" * CAP,  # a body that never ends
        b"SEND\ncontent-length:2000\n\n",  # announced too long: refused before it arrives
        b"SEND\n\n" + b"x" * (CAP - 6) + b"\0",  # complete, one byte over
    ],
)
def test_too_large(data):
    """Over the cap is FrameTooLarge (ERROR too_large, close 1009), however it is reached."""
    error = refusal(data)
    assert isinstance(error, FrameTooLarge)
    assert error.code == errors.TOO_LARGE and error.close_code == errors.CLOSE_MESSAGE_TOO_BIG
    assert str(CAP) in error.message


def test_exactly_the_cap_is_accepted():
    """A frame of exactly max bytes, NUL included, is read; heart-beats do not count."""
    data = b"SEND\n\n" + b"x" * (CAP - 7) + b"\0"
    assert len(data) == CAP
    [frame] = parse(b"\n" * 50 + data)
    assert len(frame.body) == CAP - 7


def test_cap_counts_one_frame_not_the_stream():
    """Many small frames in a row never add up to 'too large'."""
    parser = FrameParser(64)
    for _ in range(100):
        assert len(list(parser.feed(b"SEND\ndestination:/d\n\nhello\0"))) == 1


def test_good_frames_before_a_bad_one_are_yielded():
    """Frames before the bad one come out first, then the error; the parser stays broken."""
    parser = FrameParser(CAP)
    got = []
    with pytest.raises(FrameError):
        for frame in parser.feed(b"SEND\ndestination:/a\n\n1\0NOPE\n\n\0SEND\n\n\0"):
            got.append(frame)
    assert [f.body for f in got] == [b"1"]
    with pytest.raises(FrameError):
        parser.feed(b"SEND\n\n\0")


# --- writing -----------------------------------------------------------------


def test_encode_message_with_content_length():
    """MESSAGE gets content-length, escaped values, and reads back the same."""
    frame = frames.message("/topic/a", "sub:0", "5-1", '{"message":"a\\nb"}')
    data = frames.encode(frame)
    assert data.startswith(b"MESSAGE\ndestination:/topic/a\nsubscription:sub\\c0\n")
    assert b"content-type:application/json\ncontent-length:18\n\n" in data
    assert data.endswith(b'"}\0')
    [back] = parse(data)
    assert back.get("subscription") == "sub:0" and back.body == frame.body


def test_encode_adds_no_second_content_length():
    """A frame that names content-length keeps its own."""
    data = frames.encode(Frame("SEND", (("content-length", "2"),), b"ab"))
    assert data.count(b"content-length") == 1


def test_encode_connected_unescaped():
    """CONNECTED is written raw in every version, as clients read it before knowing one."""
    frame = frames.connected("1.2", (10000, 10000), "chatd/1.0", "Ann: admin")
    data = frames.encode(frame)
    assert data == (
        b"CONNECTED\nversion:1.2\nheart-beat:10000,10000\nserver:chatd/1.0\n"
        b"user-name:Ann: admin\n\n\0"
    )


def test_connected_never_carries_a_line_break():
    """A user name with a line break could forge headers; CONNECTED flattens it."""
    frame = frames.connected("1.2", (0, 0), "chatd", "a\r\nmessage:evil")
    assert frame.get("user-name") == "a  message:evil"
    [back] = parse(frames.encode(frame))
    assert back.get("message") is None


@pytest.mark.parametrize(
    "version,frame",
    [
        (frames.V12, Frame("CONNECTED", (("a", "b\nc"),))),
        (frames.V10, Frame("MESSAGE", (("a", "b\nc"),))),
        (frames.V11, Frame("MESSAGE", (("a", "b\rc"),))),
        (frames.V10, Frame("MESSAGE", (("a:b", "c"),))),
        (frames.V12, Frame("MESSAGE", (("a", "b\0c"),))),
    ],
)
def test_encode_refuses_what_the_version_cannot_carry(version, frame):
    """Values a version cannot write are a programming error, not a garbled frame."""
    with pytest.raises(ValueError):
        frames.encode(frame, version)


@pytest.mark.parametrize(
    "version,subscription,line",
    [
        (frames.V12, "sub-0", b"subscription:sub-0\n"),
        (frames.V12, "a:b\\c\r\nd", b"subscription:a\\cb\\\\c\\r\\nd\n"),
        (frames.V11, "a:b\nc", b"subscription:a\\cb\\nc\n"),
        (frames.V10, "a:b", b"subscription:a:b\n"),
    ],
)
def test_message_frames_per_subscription(version, subscription, line):
    """One event's MESSAGE for any subscription id: the id escaped as the version says, the rest alike."""
    encoder = frames.MessageFrames("/topic/a", "7-0", '{"m":1}', version)
    data = encoder.encode(subscription)
    assert data.startswith(b"MESSAGE\ndestination:/topic/a\n" + line + b"message-id:7-0\n")
    assert data.endswith(b'content-length:7\n\n{"m":1}\0')
    [back] = FrameParser(4096, version).feed(data)
    assert back.get("subscription") == subscription
    assert encoder.encode_value(frames.header_value(subscription, version)) == data


@pytest.mark.parametrize("version,subscription", [(frames.V10, "a\nb"), (frames.V11, "a\rb"), (frames.V12, "a\0b")])
def test_message_frames_refuse_what_the_version_cannot_carry(version, subscription):
    """As encode: a subscription id the version cannot write is a ValueError."""
    with pytest.raises(ValueError):
        frames.MessageFrames("/topic/a", "7-0", "{}", version).encode(subscription)
    with pytest.raises(ValueError):
        frames.header_value(subscription, version)


def test_error_frame():
    """ERROR: message is the chatd code, the body the explanation, receipt-id when asked."""
    frame = frames.error(errors.FORBIDDEN, "no topic", receipt_id="r1")
    assert frame.get("message") == "forbidden" and frame.get("receipt-id") == "r1"
    assert frame.body == b"no topic"
    assert frames.error(errors.BAD_REQUEST, "x").get("receipt-id") is None


def test_error_for_version_mismatch_lists_versions():
    """ERROR for a version mismatch carries version:1.0,1.1,1.2 as the spec asks."""
    frame = frames.error_for(VersionMismatch())
    assert frame.get("version") == "1.0,1.1,1.2" and frame.get("message") == "bad_request"
    assert frames.error_for(FrameTooLarge(10)).get("message") == "too_large"


def test_receipt():
    """RECEIPT names the receipt it answers."""
    assert frames.encode(frames.receipt("77")) == b"RECEIPT\nreceipt-id:77\n\n\0"


# --- negotiation -------------------------------------------------------------


@pytest.mark.parametrize(
    "header,version",
    [(None, "1.0"), ("1.0", "1.0"), ("1.1,1.0", "1.1"), ("1.0,1.1,1.2", "1.2"), (" 1.2 , 2.0", "1.2")],
)
def test_negotiate_version(header, version):
    """The highest version both speak; no accept-version means 1.0."""
    assert frames.negotiate_version(header) == version


def test_no_version_in_common():
    """Only unknown versions: VersionMismatch."""
    with pytest.raises(VersionMismatch):
        frames.negotiate_version("2.0,3.0")


@pytest.mark.parametrize(
    "client,expected",
    [
        ((0, 0), (0, 0)),  # client wants none
        ((5000, 5000), (10000, 10000)),  # server's 10 s is the floor both ways
        ((20000, 0), (0, 20000)),  # client sends every 20 s, wants none
        ((0, 30000), (30000, 0)),  # client wants one every 30 s, sends none
    ],
)
def test_negotiate_heart_beat(client, expected):
    """The spec's rule: 0 on either side disables a direction, else the larger interval."""
    assert frames.negotiate_heart_beat(client) == expected


def test_negotiate_heart_beat_when_server_offers_none():
    """A server offer of 0,0 disables both directions."""
    assert frames.negotiate_heart_beat((1000, 1000), (0, 0)) == (0, 0)


@pytest.mark.parametrize("value,parsed", [(None, (0, 0)), ("10000,10000", (10000, 10000)), (" 0 , 5 ", (0, 5))])
def test_parse_heart_beat(value, parsed):
    """heart-beat is two millisecond counts; absent means none."""
    assert frames.parse_heart_beat(value) == parsed


@pytest.mark.parametrize("value", ["", "1", "1,2,3", "-1,0", "a,b", "1234567890,0"])
def test_bad_heart_beat(value):
    """Anything but two small counts is bad_request."""
    with pytest.raises(FrameError) as info:
        frames.parse_heart_beat(value)
    assert "heart-beat" in info.value.message


@pytest.mark.parametrize(
    "offered,chosen",
    [
        (["v10.stomp", "v11.stomp", "v12.stomp"], "v12.stomp"),
        (["v11.stomp", "v10.stomp"], "v11.stomp"),
        (["v10.stomp"], "v10.stomp"),
        (["chatd.v1"], None),
        ([], None),
    ],
)
def test_stomp_subprotocol(offered, chosen):
    """The highest STOMP subprotocol offered, whatever the order."""
    assert frames.stomp_subprotocol(offered) == chosen
