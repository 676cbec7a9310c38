"""
chatd.api: the request rules as pure functions, then the resource through
real twisted.web request parsing (a Site over a StringTransport) with a
backend that records what it was asked.
"""

import json

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web import server
from zope.interface import implementer

from chatd import api, config
from chatd.api import (
    BadRequest, Disconnect, History, HistoryQuery, IApiBackend, Kick, Publish, RoomPresence,
    UnknownRoom, UserPresence,
)
from chatd.errors import BrokerUnavailable, RoomLimitReached
from chatd.messages import RoomEvent

KEY = "k" * 40
OLD_KEY = "o" * 32


def body(**fields):
    return json.dumps(fields).encode()


def bad(call, *args):
    """The BadRequest message C{call(*args)} raises."""
    with pytest.raises(BadRequest) as info:
        call(*args)
    return info.value.message


# --- pure rules --------------------------------------------------------------------


def test_publish_minimal_and_full():
    """room and message are required; sender defaults to system; cid is optional; unknown fields are ignored."""
    assert api.parse_publish(body(room="lobby", message="hi"), 4000) == Publish("lobby", "hi", "system", None)
    parsed = api.parse_publish(body(room="a.b-c_1", message="x", sender="Bot", cid="c1", extra=[1]), 4000)
    assert parsed == Publish("a.b-c_1", "x", "Bot", "c1")


@pytest.mark.parametrize("fields, message", [
    ({"message": "x"}, "room must be a string, got null"),
    ({"room": 5, "message": "x"}, "room must be a string, got number"),
    ({"room": "bad room", "message": "x"}, "room: room names are 1-64"),
    ({"room": "r"}, "message must be a string, got null"),
    ({"room": "r", "message": ["x"]}, "message must be a string, got array"),
    ({"room": "r", "message": ""}, "message must be a non-empty string"),
    ({"room": "r", "message": "x" * 11}, "message is longer than 10 characters"),
    ({"room": "r", "message": "x", "sender": True}, "sender must be a string, got boolean"),
    ({"room": "r", "message": "x", "sender": " pad"}, "sender must be printable, 1-64"),
    ({"room": "r", "message": "x", "sender": "s" * 65}, "sender must be printable, 1-64"),
    ({"room": "r", "message": "x", "cid": 7}, "cid must be a string, got number"),
    ({"room": "r", "message": "x", "cid": "c" * 65}, "cid must be a string of 1-64 characters"),
])
def test_publish_names_the_field(fields, message):
    """Every bad field is named in the message, with the JSON type it had when the type is wrong."""
    assert bad(api.parse_publish, json.dumps(fields).encode(), 10).startswith(message)


@pytest.mark.parametrize("raw, message", [
    (b"", "the body must be one JSON object"),
    (b"{", "the body must be one JSON object"),
    (b"\xff{}", "the body must be one JSON object"),
    (b"[]", "the body must be a JSON object, got array"),
    (b'"x"', "the body must be a JSON object, got string"),
    (b"[" * 100000, "the body is over"),
    (b"[" * 5000 + b"]" * 5000, "the body must be one JSON object"),
])
def test_malformed_bodies(raw, message):
    """Empty, broken, non-object, oversized and deeply nested bodies are a 400, not a crash."""
    assert bad(api.parse_body, raw).startswith(message)


def test_lone_surrogate_message_is_refused():
    """A JSON escape for a lone surrogate cannot be stored or sent: refused as not valid Unicode."""
    raw = b'{"room": "r", "message": "\\ud800"}'
    assert "valid Unicode" in bad(api.parse_publish, raw, 10)


def test_disconnect_rules():
    """sub is required; the reason is optional, printable and fits a close frame (123 bytes)."""
    assert api.parse_disconnect(body(sub="u1")) == Disconnect("u1", "")
    assert api.parse_disconnect(body(sub="u1", reason="banned")) == Disconnect("u1", "banned")
    assert bad(api.parse_disconnect, body(reason="x")) == "sub must be a string, got null"
    assert bad(api.parse_disconnect, body(sub="")).startswith("sub must be printable")
    assert bad(api.parse_disconnect, body(sub="u", reason=3)) == "reason must be a string, got number"
    assert bad(api.parse_disconnect, body(sub="u", reason="é" * 62)).startswith("reason is longer than 123 bytes")
    assert bad(api.parse_disconnect, body(sub="u", reason="a\nb")) == "reason must be printable text"


def test_kick_rules():
    """kick takes the room from the path and sub from the body."""
    assert api.parse_kick("lobby", body(sub="u1", x=1)) == Kick("lobby", "u1")
    assert bad(api.parse_kick, "lobby", body(sub={"a": 1})) == "sub must be a string, got object"


@pytest.mark.parametrize("segment, room", [(b"lobby", "lobby"), (b"a%2Eb", "a.b")])
def test_room_from_path(segment, room):
    """A room in the path is percent-decoded and checked like any room name."""
    assert api.parse_room(segment) == room


@pytest.mark.parametrize("segment", [b"a%20b", b"%ff", b"x" * 65, b"a%2Fb"])
def test_bad_room_in_path(segment):
    """A path segment that is not a room name is a 400 naming room."""
    assert bad(api.parse_room, segment).startswith("room: room names")


def test_history_query():
    """since is an event id; limit defaults to 100 and is at most [history] size."""
    assert api.parse_history_query("r", {}, 500) == HistoryQuery("r", None, 100)
    assert api.parse_history_query("r", {}, 20) == HistoryQuery("r", None, 20)
    assert api.parse_history_query("r", {b"since": [b"12-3"], b"limit": [b"500"], b"x": [b"?"]}, 500) == HistoryQuery("r", "12-3", 500)
    assert bad(api.parse_history_query, "r", {b"limit": [b"501"]}, 500) == "limit must be a whole number from 1 to 500"
    assert bad(api.parse_history_query, "r", {b"limit": [b"0"]}, 500).startswith("limit must be")
    assert bad(api.parse_history_query, "r", {b"limit": [b"\xd9\xa3"]}, 500).startswith("limit must be")
    assert bad(api.parse_history_query, "r", {b"since": [b"x"]}, 500).startswith("since must be an event id")
    assert bad(api.parse_history_query, "r", {b"since": [b"1", b"2"]}, 500) == "give since at most once"


def test_key_matches():
    """Any configured key matches; a prefix, a longer string, no key or an empty one do not."""
    digests = api.key_digests([OLD_KEY, KEY])
    assert api.key_matches(KEY.encode(), digests)
    assert api.key_matches(OLD_KEY.encode(), digests)
    for wrong in (None, b"", KEY[:-1].encode(), (KEY + "k").encode(), b"x" * 40):
        assert not api.key_matches(wrong, digests)


# --- the resource --------------------------------------------------------------------


def event(n, room="lobby"):
    return RoomEvent(type="TALK", id=f"{n}-0", room=room, sender="Alice", message=f"m{n}", user_count=1, ts=n)


@implementer(IApiBackend)
class FakeBackend:
    """Answers from C{results} (a value, an exception to raise, or a Deferred); records calls."""

    def __init__(self, **results):
        self.calls = []
        self.results = results

    def _answer(self, name, *args):
        self.calls.append((name,) + args)
        result = self.results.get(name)
        if isinstance(result, Exception):
            raise result
        return result

    def publish(self, request):
        return self._answer("publish", request)

    def list_rooms(self):
        return self._answer("list_rooms")

    def room_presence(self, room):
        return self._answer("room_presence", room)

    def history(self, query):
        return self._answer("history", query)

    def disconnect(self, request):
        return self._answer("disconnect", request)

    def kick(self, request):
        return self._answer("kick", request)


class Api:
    """An ApiResource under /api in a real Site, spoken to over a StringTransport."""

    def __init__(self, backend, keys=(OLD_KEY, KEY), history_size=500):
        from twisted.web.resource import Resource

        root = Resource()
        root.putChild(b"api", api.ApiResource(keys, backend, max_talk_chars=4000, history_size=history_size))
        self.site = server.Site(root, reactor=MemoryReactorClock())

    def call(self, method, path, payload=None, key=KEY, headers=()):
        """One HTTP/1.0 request; returns (status, headers, JSON body) once answered."""
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
        transport = StringTransport()
        channel.makeConnection(transport)
        raw = payload if isinstance(payload, bytes) else (json.dumps(payload).encode() if payload is not None else b"")
        lines = [f"{method} {path} HTTP/1.0", "Host: chat.example", f"Content-Length: {len(raw)}"]
        if key is not None:
            lines.append(f"X-API-Key: {key}")
        lines += [f"{name}: {value}" for name, value in headers]
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + raw)
        return self.response(transport)

    @staticmethod
    def response(transport):
        head, _, content = transport.value().partition(b"\r\n\r\n")
        if not head:
            return None
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        found = {}
        for line in header_lines:
            name, _, value = line.partition(": ")
            found[name.lower()] = value
        return int(status_line.split()[1]), found, json.loads(content)


@pytest.fixture
def logged():
    lines = []
    observer = lambda e: lines.append(formatEvent(e))  # noqa: E731
    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


@pytest.mark.parametrize("key", [None, "", "x" * 40, KEY[:-1]])
@pytest.mark.parametrize("method, path, payload", [
    ("POST", "/api/publish", {"room": "lobby", "message": "hi"}),
    ("POST", "/api/disconnect", {"sub": "u1"}),
    ("POST", "/api/rooms/lobby/kick", {"sub": "u1"}),
    ("GET", "/api/rooms", None),
    ("GET", "/api/rooms/lobby/history", None),
    ("GET", "/api/nowhere", None),
])
def test_missing_or_wrong_key_is_401_and_nothing_happens(key, method, path, payload, logged):
    """Without a good X-API-Key every path answers 401 invalid_key, the backend is not called, the key not logged."""
    backend = FakeBackend()
    status, _, answer = Api(backend).call(method, path, payload, key=key)
    assert (status, answer["error"]) == (401, "invalid_key")
    assert backend.calls == []
    assert not any(KEY[:-1] in line for line in logged)


def test_two_key_headers_are_refused():
    """Two X-API-Key headers are not a key: 401."""
    status, _, answer = Api(FakeBackend()).call("GET", "/api/rooms", key=KEY, headers=[("X-API-Key", KEY)])
    assert status == 401


def test_old_key_still_works_for_rotation():
    """Every key in the file is accepted, so keys can be rotated."""
    backend = FakeBackend(list_rooms=[("lobby", 2)])
    assert Api(backend).call("GET", "/api/rooms", key=OLD_KEY)[0] == 200


def test_publish(logged):
    """POST /api/publish hands the request to the backend and answers 200 {"id"}; no key in the log."""
    backend = FakeBackend(publish="7-0")
    status, headers, answer = Api(backend).call("POST", "/api/publish", {"room": "lobby", "message": "hi", "cid": "c"})
    assert (status, answer) == (200, {"id": "7-0"})
    assert headers["content-type"].startswith("application/json")
    assert headers["cache-control"] == "no-store"
    assert backend.calls == [("publish", Publish("lobby", "hi", "system", "c"))]
    assert any("api: published 7-0 to lobby" in line for line in logged)
    assert not any(KEY in line for line in logged)


def test_bad_body_is_400_naming_the_field():
    """A wrong type gets 400 bad_request naming field and type; the backend is not called."""
    backend = FakeBackend()
    status, _, answer = Api(backend).call("POST", "/api/publish", {"room": "lobby", "message": 3})
    assert status == 400
    assert answer == {"error": "bad_request", "message": "message must be a string, got number"}
    assert backend.calls == []


def test_malformed_json_is_400():
    """A body that is not JSON gets a 400, and the API keeps serving."""
    app = Api(FakeBackend(list_rooms=[]))
    status, _, answer = app.call("POST", "/api/publish", b"{not json")
    assert (status, answer["error"]) == (400, "bad_request")
    assert app.call("GET", "/api/rooms")[0] == 200


def test_rooms():
    """GET /api/rooms lists every room with its users."""
    backend = FakeBackend(list_rooms=[("lobby", 2), ("ops", 0)])
    status, _, answer = Api(backend).call("GET", "/api/rooms")
    assert (status, answer) == (200, {"rooms": [{"name": "lobby", "users": 2}, {"name": "ops", "users": 0}]})


def test_room_presence():
    """GET /api/rooms/{room} answers room, userCount and users with their connection counts."""
    presence = RoomPresence("lobby", (UserPresence("u1", "Ann", 2), UserPresence("u2", "Bo", 1)))
    backend = FakeBackend(room_presence=presence)
    status, _, answer = Api(backend).call("GET", "/api/rooms/lobby")
    assert status == 200
    assert answer == {
        "room": "lobby", "userCount": 2,
        "users": [{"sub": "u1", "name": "Ann", "connections": 2}, {"sub": "u2", "name": "Bo", "connections": 1}],
    }
    assert backend.calls == [("room_presence", "lobby")]


@pytest.mark.parametrize("method, path, payload, call", [
    ("GET", "/api/rooms/ghost", None, "room_presence"),
    ("GET", "/api/rooms/ghost/history", None, "history"),
    ("POST", "/api/rooms/ghost/kick", {"sub": "u"}, "kick"),
])
def test_unknown_room_is_404(method, path, payload, call):
    """A room nobody is in and with no history answers 404 not_found."""
    backend = FakeBackend(**{call: UnknownRoom("ghost")})
    status, _, answer = Api(backend).call(method, path, payload)
    assert (status, answer) == (404, {"error": "not_found", "message": "no room ghost"})


def test_history():
    """GET .../history passes since and limit and answers the events as clients see them, with complete."""
    backend = FakeBackend(history=History((event(3), event(4)), False))
    status, _, answer = Api(backend).call("GET", "/api/rooms/lobby/history?since=2-0&limit=2")
    assert status == 200
    assert answer == {"events": [event(3).to_wire(), event(4).to_wire()], "complete": False}
    assert backend.calls == [("history", HistoryQuery("lobby", "2-0", 2))]


def test_history_limit_over_history_size_is_400():
    """limit above [history] size is a 400 naming limit."""
    status, _, answer = Api(FakeBackend(), history_size=50).call("GET", "/api/rooms/lobby/history?limit=51")
    assert (status, answer["message"]) == (400, "limit must be a whole number from 1 to 50")


def test_disconnect_and_kick():
    """disconnect and kick answer {"ok": true} after the backend did its part."""
    backend = FakeBackend()
    app = Api(backend)
    assert app.call("POST", "/api/disconnect", {"sub": "u1", "reason": "banned"})[2] == {"ok": True}
    assert app.call("POST", "/api/rooms/lobby/kick", {"sub": "u1"})[2] == {"ok": True}
    assert backend.calls == [("disconnect", Disconnect("u1", "banned")), ("kick", Kick("lobby", "u1"))]


def test_answer_waits_for_the_backend():
    """Nothing is answered until the backend's Deferred fires."""
    pending = defer.Deferred()
    backend = FakeBackend(publish=pending)
    app = Api(backend)
    channel = app.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    channel.makeConnection(transport)
    raw = json.dumps({"room": "r", "message": "m"}).encode()
    channel.dataReceived(
        f"POST /api/publish HTTP/1.0\r\nX-API-Key: {KEY}\r\nContent-Length: {len(raw)}\r\n\r\n".encode() + raw
    )
    assert Api.response(transport) is None
    pending.callback("1-0")
    assert Api.response(transport)[2] == {"id": "1-0"}


def test_broker_outage_is_503(logged):
    """BrokerUnavailable from the backend is 503 unavailable, logged as no failure."""
    backend = FakeBackend(publish=BrokerUnavailable("redis down"))
    status, _, answer = Api(backend).call("POST", "/api/publish", {"room": "r", "message": "m"})
    assert (status, answer["error"]) == (503, "unavailable")
    assert not any("failed" in line for line in logged)


def test_room_limit_is_403():
    """Publishing that would make a room beyond [limits] max_rooms is 403 forbidden."""
    backend = FakeBackend(publish=RoomLimitReached())
    status, _, answer = Api(backend).call("POST", "/api/publish", {"room": "r", "message": "m"})
    assert (status, answer["error"]) == (403, "forbidden")


def test_unexpected_error_is_500_and_logged_once(logged, logged_failures):
    """A bug in the backend answers 500 internal and logs one failure line, without the key."""
    logged_failures.expect("api: GET /api/rooms failed")
    backend = FakeBackend(list_rooms=ValueError("boom"))
    status, _, answer = Api(backend).call("GET", "/api/rooms")
    assert (status, answer["error"]) == (500, "internal")
    assert sum("api: GET /api/rooms failed" in line for line in logged) == 1


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/publish"), ("POST", "/api/rooms"), ("DELETE", "/api/rooms/lobby"),
    ("GET", "/api/rooms/lobby/kick"), ("POST", "/api/rooms/lobby/history"),
])
def test_wrong_method_is_405(method, path):
    """A known path with the wrong method answers 405 with Allow."""
    status, headers, answer = Api(FakeBackend()).call(method, path, {})
    assert (status, answer["error"]) == (405, "method_not_allowed")
    assert headers["allow"] in ("GET", "POST")


@pytest.mark.parametrize("path", ["/api/", "/api/rooms/", "/api/rooms/lobby/x", "/api/rooms/a/b/c", "/api/x"])
def test_unknown_path_is_404(path):
    """Paths the API does not have answer 404 not_found (after the key check)."""
    status, _, answer = Api(FakeBackend()).call("GET", path)
    assert (status, answer["error"]) == (404, "not_found")


def test_bad_room_in_path_is_400():
    """A room segment that is not a room name is a 400 naming room."""
    status, _, answer = Api(FakeBackend()).call("GET", "/api/rooms/b%20d")
    assert (status, answer["message"]) == (400, "room: room names are 1-64 of A-Z a-z 0-9 _ - .")


def test_from_settings_off_without_keys():
    """No [api] key_file: no resource, so /api/ is left to the site's 404."""
    assert api.ApiResource.from_settings(config.defaults(), FakeBackend()) is None
    import dataclasses

    on = dataclasses.replace(config.defaults(), api_keys=(KEY,))
    assert isinstance(api.ApiResource.from_settings(on, FakeBackend()), api.ApiResource)
