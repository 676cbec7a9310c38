# -*- test-case-name: tests.test_stomp_session,tests.test_stomp_session_property -*-
"""
One STOMP connection's conversation, on top of a chatd.v1 L{Session}.

No Autobahn here: the WebSocket adapter feeds the bytes of each message in
(L{StompSession.received}) and provides an L{IStompConnection}.  Each STOMP
command that acts on rooms becomes the chatd.v1 command it stands for
(L{chatd.stomp.mapping}) and goes through an ordinary L{Session}, so the
per-connection rules (rooms claim, rooms per connection, AUTH renewal,
token expiry) and the one table from domain refusals to error codes
(L{chatd.session.ERROR_TABLE}) are chatd.v1's own.  What the session and
the hub send back in chatd.v1 text is turned into STOMP here: events and
REPLAY markers into MESSAGE frames for the room's subscription, ERROR into
an ERROR frame and the close STOMP prescribes.

Frames are handled one at a time, in order: a SEND right after a SUBSCRIBE
(what Spring-style clients do) waits for the ENTER.  Every frame takes a
token of the rate limit when it arrives, so the queue stays within
C{[limits] burst}; a client over the limit gets ERROR C{rate_limited} and
close 1008 (STOMP closes after every ERROR).

docs/stomp.md is the contract.
"""

import collections
import itertools
import json
import weakref

from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

import chatd
from chatd import errors, messages
from chatd.errors import ProtocolError
from chatd.hub import IConnection
from chatd.limits import TokenBucket
from chatd.logs import printable
from chatd.session import Session
from chatd.stomp import frames, mapping
from chatd.stomp.frames import FrameError

log = Logger()

SERVER = "chatd/" + chatd.__version__
UNSUPPORTED = frozenset({"ACK", "NACK", "BEGIN", "COMMIT", "ABORT"})
CLOSE_NORMAL = 1000  # after an ERROR frame: the frame says why

# ERROR codes whose close says more than "normal".
_CLOSE_FOR = {errors.RATE_LIMITED: errors.CLOSE_POLICY_VIOLATION}


class IStompConnection(Interface):
    """What a L{StompSession} needs of its WebSocket (L{chatd.ws} provides it)."""

    connection_id = Attribute("Unique across instances.")

    framing = Attribute(
        "How the transport wraps a STOMP frame (hashable; plain or SockJS): "
        "connections alike share one prepared MESSAGE (see L{EventFrames})."
    )

    def send_frame(data):
        """Send one STOMP frame (or a heart-beat), as bytes."""

    def send_shared_frame(prepared):
        """
        Send a MESSAGE frame of the event being fanned out, as the
        instance's L{EventFrames} prepared it for this connection's
        C{framing}: the very same object goes to every connection alike.
        """

    def close(code, reason):
        """Close with a WebSocket close C{code} and a short C{reason}, once."""

    def when_drained():
        """As L{chatd.hub.IConnection.when_drained}: the send buffer is low again."""


def _unprepared(data, framing):
    return data


class Slot:
    """
    Where the MESSAGE frame of one L{EventFrames.key} for the event being
    fanned out is kept: one object for every subscription of that key, so
    a member whose slot already holds this event's frame sends it with one
    identity check (L{_SessionSide.send_shared}).

    @ivar key: the key.
    @ivar text: the event text the frame was made for, or L{None}.
    @ivar prepared: that frame, prepared.
    """

    __slots__ = ("key", "text", "prepared", "__weakref__")

    def __init__(self, key):
        self.key = key
        self.text = None
        self.prepared = None


class EventFrames:
    """
    The MESSAGE frames of the event being fanned out, made once per
    destination, subscription id, version and framing (a L{key}): the hub
    hands the very same C{str} to every local member (see
    L{chatd.hub.IConnection.send_shared}), and clients of one app subscribe
    alike (stomp.js calls every first subscription C{sub-0}), so a room
    usually shares one frame.  Subscribers with ids of their own each get
    one, made from the event's headers and body encoded once
    (L{frames.MessageFrames}).  One per instance, shared by its STOMP
    connections; each key has one L{Slot} while a subscription holds it,
    and only the last event's frames are kept (at most one per local
    subscriber of its room).

    @ivar text: the chatd.v1 text of the last event.
    @ivar room: its room.
    """

    def __init__(self, prepare=_unprepared):
        """
        @param prepare: C{prepare(data, framing)}: what a connection of
            that framing's C{send_shared_frame} takes for the MESSAGE frame
            C{data} (bytes); by default, C{data}.
        """
        self._prepare = prepare
        self.text = None
        self.room = None
        self._event = None
        self._body = None
        self._encoders = {}
        self._slots = weakref.WeakValueDictionary()  # key -> Slot, while subscribed
        self._filled = []  # the slots holding the last event's frames

    @staticmethod
    def key(subscription, version, framing):
        """
        The key of the frames for a L{mapping.Subscribe} in C{version} and
        C{framing} (the id in it is written as the frame carries it).
        """
        return (subscription.destination, frames.header_value(subscription.id, version), version, framing)

    def slot(self, key):
        """
        @return: the L{Slot} of C{key}, the same one for every subscription
            of that key while one holds it.
        """
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = Slot(key)
        return slot

    def start(self, text):
        """Decode the event text C{text} the hub shared, once per event."""
        event = messages.RoomEvent.from_wire(json.loads(text))
        for slot in self._filled:
            slot.text = slot.prepared = None
        self._filled = []
        self._event = event
        self._body = mapping.event_body(event)
        self._encoders = {}
        self.room = event.room
        self.text = text

    def fill(self, text, slot):
        """
        @param text: the chatd.v1 event text the hub shared.
        @param slot: from L{slot}; its destination names C{text}'s room.
        @return: the prepared MESSAGE frame, kept in C{slot} for this event.
        """
        if text is not self.text:
            self.start(text)
        if slot.text is not text:
            destination, value, version, framing = slot.key
            encoder = self._encoders.get((destination, version))
            if encoder is None:
                encoder = self._encoders[(destination, version)] = frames.MessageFrames(
                    destination, self._event.id, self._body, version
                )
            slot.prepared = self._prepare(encoder.encode_value(value), framing)
            slot.text = text
            self._filled.append(slot)
        return slot.prepared

    def frame(self, text, key):
        """
        @param text: the chatd.v1 event text the hub shared.
        @param key: from L{key}.
        @return: the prepared MESSAGE frame (the same object for the same
            event and key).
        """
        return self.fill(text, self.slot(key))


@implementer(IConnection)
class _SessionSide:
    """
    The L{IConnection} the chatd.v1 session and the hub talk to.

    The hub calls C{send_shared} once per member per event, so the common
    case is done here, on this small slotted object alone: when the
    session's one subscription shares a L{Slot} that already holds this
    event's frame (every member but the first of each key), write it.
    The session keeps C{slot} (L{None} while it has no subscription or
    several, and once it is closing).
    """

    __slots__ = ("_stomp", "connection_id", "slot", "_write")

    def __init__(self, stomp, connection_id, write):
        """
        @param write: the connection's C{send_shared_frame}.
        """
        self._stomp = stomp
        self.connection_id = connection_id
        self.slot = None
        self._write = write

    def send_shared(self, text):
        """IConnection API"""
        slot = self.slot
        if slot is not None and slot.text is text:
            write = self._write  # a slot's value: LOAD_METHOD would not specialize on it
            write(slot.prepared)
        else:
            self._stomp._shared_event(text)

    def send_text(self, text):
        """IConnection API"""
        self._stomp._from_session(text)

    def close(self, code, reason):
        """IConnection API"""
        self._stomp._closed_by_session(code, reason)

    def when_drained(self):
        """IConnection API"""
        return self._stomp._connection.when_drained()


class StompSession:
    """
    One STOMP connection's conversation.

    @param connection: an L{IStompConnection}.
    @param principal: the L{chatd.auth.Principal} the ticket granted, or
        L{None} when C{[stomp] connect_auth} let the upgrade through without
        one: then CONNECT must carry a valid JWT.
    @param hub: the instance's L{chatd.hub.Hub}.
    @param verifier: checks JWTs (CONNECT, AUTH, a SEND's Authorization).
    @param settings: L{chatd.config.Settings} (C{limits}, C{stomp},
        C{websocket.handshake_timeout}).
    @param clock: an C{IReactorTime}.
    @param event_frames: the instance's L{EventFrames}.
    @param metrics: the service's L{chatd.metrics.Metrics}, handed to the
        chatd.v1 session (commands by type, errors by code), or L{None}.
    @param expiries: the L{chatd.session.Expiries} the chatd.v1 session's
        token expiry goes on (the factory's, shared by its sessions), or
        L{None} for one of its own.
    """

    def __init__(self, connection, principal, hub, verifier, settings, clock, event_frames=None,
                 metrics=None, expiries=None):
        self._connection = connection
        self._principal = principal
        self._hub = hub
        self._verifier = verifier
        self._settings = settings
        self._limits = settings.limits
        self._clock = clock
        self._event_frames = event_frames if event_frames is not None else EventFrames()
        self._metrics = metrics
        self._expiries = expiries
        self._routes = mapping.Routes.from_settings(settings.stomp)
        self._parser = frames.FrameParser(settings.limits.max_message_bytes)
        self._subscriptions = mapping.Subscriptions()
        self._slots = {}  # room -> its subscription's EventFrames slot
        self._send_shared_frame = connection.send_shared_frame
        self._side = _SessionSide(self, connection.connection_id, self._send_shared_frame)
        self._bucket = TokenBucket(self._limits.rate, self._limits.burst, clock)
        self._queue = collections.deque()
        self._busy = False
        self._closing = False
        self._session = None  # the chatd.v1 Session, from CONNECT on
        self._version = None  # negotiated by CONNECT
        self._refs = itertools.count(1)
        self._replays = itertools.count(1)
        self._refused = None  # the ERROR the session sent during a command
        self._deadline = None
        self._beats = None
        self._watch = None
        self._expect = 0.0
        self._last_heard = clock.seconds()

    @property
    def user(self):
        """The display name, once known (for logs)."""
        principal = self._session.principal if self._session else self._principal
        return principal.name if principal else None

    @property
    def sub(self):
        """The user id, once known (the server API's disconnect finds connections by it)."""
        principal = self._session.principal if self._session else self._principal
        return principal.sub if principal else None

    def open(self):
        """The WebSocket is open: CONNECT must come within the handshake timeout."""
        self._deadline = self._clock.callLater(
            self._settings.websocket.handshake_timeout, self._no_connect
        )

    def received(self, data):
        """
        Bytes of one WebSocket message (text or binary).  Frames are queued
        and handled in order; errors become ERROR frames and a close.
        """
        if self._closing:
            return
        self._last_heard = self._clock.seconds()
        try:
            for frame in self._parser.feed(data):
                if not self._bucket.take():
                    self._queue.append(ProtocolError(errors.RATE_LIMITED, "slow down: too many frames"))
                    break
                self._queue.append(frame)
        except FrameError as e:
            self._queue.append(e)
        self._pump()

    def closed(self):
        """
        The WebSocket is gone: quit every room.

        @return: a Deferred that fires once the broker heard every QUIT.
        """
        self._stop()
        if self._session is None:
            return defer.succeed(None)
        return self._session.closed()

    # --- the queue ---------------------------------------------------------

    def _pump(self):
        if self._busy or not self._queue:
            return
        self._busy = True
        d = defer.ensureDeferred(self._drain())
        d.addErrback(self._unexpected)

    async def _drain(self):
        try:
            while self._queue and not self._closing:
                item = self._queue.popleft()
                if isinstance(item, ProtocolError):
                    self._fail(item)
                    return
                await self._handle(item)
        finally:
            self._busy = False

    async def _handle(self, frame):
        receipt = frame.get("receipt")
        try:
            done = await self._dispatch(frame)
        except ProtocolError as e:
            self._fail(e, receipt)
            return
        if receipt is not None and not done and not self._closing:
            self._send(frames.receipt(receipt))

    def _unexpected(self, failure):
        log.failure("unexpected error in a STOMP session of {user}", failure, user=printable(self.user or "-"))
        self._fail(ProtocolError(errors.UNAVAILABLE, "internal error, try again"))

    async def _dispatch(self, frame):
        """Handle one frame; C{True} when it answered its receipt itself."""
        command = frame.command
        if self._version is None:
            if command not in ("CONNECT", "STOMP"):
                raise ProtocolError(errors.BAD_REQUEST, f"the first frame must be CONNECT, not {command}")
            self._connect(frame)
            return False
        if command in ("CONNECT", "STOMP"):
            raise ProtocolError(errors.BAD_REQUEST, "already connected")
        if command in frames.SERVER_COMMANDS:
            raise ProtocolError(errors.BAD_REQUEST, f"{command} is a server frame")
        if command in UNSUPPORTED:
            raise ProtocolError(errors.BAD_REQUEST, f"{command} is not supported")
        if command == "SUBSCRIBE":
            await self._subscribe(frame)
        elif command == "UNSUBSCRIBE":
            subscription = self._unsubscribed(mapping.unsubscribe(frame))
            await self._command(type=messages.QUIT, room=subscription.room)
        elif command == "SEND":
            await self._send_frame(frame)
        elif command == "DISCONNECT":
            await self._disconnect(frame)
            return True
        return False

    # --- commands ----------------------------------------------------------

    def _connect(self, frame):
        version = frames.negotiate_version(frame.get("accept-version"))
        send_ms, expect_ms = frames.negotiate_heart_beat(frames.parse_heart_beat(frame.get("heart-beat")))
        principal = self._principal
        if principal is None:
            jwt = mapping.token(frame)
            if jwt is None:
                raise ProtocolError(
                    errors.UNAUTHORIZED, "CONNECT needs Authorization: Bearer <JWT> (or a ticket on the URL)"
                )
            principal = self._verify(jwt)
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._version = self._parser.version = version
        self._session = Session(
            principal, self._side, self._hub, self._verifier, self._limits, self._clock,
            metrics=self._metrics, expiries=self._expiries,
        )
        self._send(frames.connected(version, frames.SERVER_HEART_BEAT, SERVER, principal.name))
        self._session.open()  # its WELCOME is dropped; it closes 4001 at exp
        self._start_heart_beats(send_ms, expect_ms)

    def _verify(self, jwt):
        from chatd.auth import InvalidToken

        try:
            return self._verifier.verify(jwt)
        except InvalidToken as e:
            raise ProtocolError(errors.UNAUTHORIZED, str(e)) from None

    async def _subscribe(self, frame):
        subscription = mapping.subscribe(frame, self._routes)
        self._subscriptions.add(subscription)
        self._slots[subscription.room] = self._event_frames.slot(
            EventFrames.key(subscription, self._version, self._connection.framing)
        )
        self._only_slot()
        try:
            await self._command(type=messages.ENTER, room=subscription.room, since=subscription.since)
        except ProtocolError:
            self._unsubscribed(subscription.id)
            raise

    def _unsubscribed(self, subscription_id):
        subscription = self._subscriptions.remove(subscription_id)
        del self._slots[subscription.room]
        self._only_slot()
        return subscription

    def _only_slot(self):
        # _SessionSide.send_shared's short way: with one subscription, an
        # event its slot holds a frame of is an event of its room.
        only = len(self._slots) == 1 and not self._closing
        self._side.slot = next(iter(self._slots.values())) if only else None

    async def _send_frame(self, frame):
        destination = frame.get("destination")
        if destination != mapping.AUTH_DESTINATION:
            jwt = mapping.token(frame)
            if jwt is not None:
                await self._command(type=messages.AUTH, token=jwt)
        command = mapping.send(frame, self._routes, self._limits.max_talk_chars)
        if isinstance(command, messages.Talk):
            if self._subscriptions.of_room(command.room) is None:
                raise ProtocolError(errors.NOT_MEMBER, f"subscribe to {command.room} before sending to it")
            await self._command(type=messages.TALK, room=command.room, message=command.message, cid=command.cid)
        elif isinstance(command, messages.Auth):
            await self._command(type=messages.AUTH, token=command.token)
        # mapping.Presence: the subscription is the presence; nothing more.

    async def _disconnect(self, frame):
        session, self._session = self._session, None
        await session.closed()
        receipt = frame.get("receipt")
        if receipt is not None:
            self._send(frames.receipt(receipt))
        self._close(CLOSE_NORMAL, "disconnected")

    async def _command(self, **wire):
        """
        Run one chatd.v1 command through the session.

        @raise ProtocolError: the ERROR the session answered it with.
        """
        wire = {key: value for key, value in wire.items() if value is not None}
        wire["ref"] = next(self._refs)
        self._refused = None
        await self._session.received(messages.encode(wire))
        refused, self._refused = self._refused, None
        if refused is not None:
            raise refused

    # --- from the session and the hub ----------------------------------------

    def _from_session(self, text):
        if self._closing:
            return
        wire = json.loads(text)
        kind = wire["type"]
        if kind in (messages.ENTER, messages.TALK, messages.QUIT):
            event = messages.RoomEvent.from_wire(wire)
            subscription = self._subscriptions.of_room(event.room)
            if subscription is not None:
                body = mapping.event_body(event)
                self._send(frames.message(subscription.destination, subscription.id, event.id, body))
        elif kind == "REPLAY":
            subscription = self._subscriptions.of_room(wire["room"])
            if subscription is not None:
                body = mapping.replay_body(wire["room"], wire["count"], wire["complete"])
                message_id = f"replay-{next(self._replays)}"
                self._send(frames.message(subscription.destination, subscription.id, message_id, body))
        elif kind == "ERROR":
            refused = ProtocolError(wire["code"], wire["message"])
            if self._busy:
                self._refused = refused  # the command in flight fails with it
            else:
                self._fail(refused)
        # WELCOME: CONNECTED said it; a renewal's answer is the RECEIPT.

    def _shared_event(self, text):
        # What _SessionSide.send_shared did not do at once: the first
        # member of a key, or one of several rooms.
        if self._closing:
            return
        shared = self._event_frames
        if text is not shared.text:
            shared.start(text)
        slot = self._slots.get(shared.room)
        if slot is not None:
            self._send_shared_frame(shared.fill(text, slot))

    def _closed_by_session(self, code, reason):
        if code == errors.CLOSE_TOKEN_EXPIRED:
            self._fail(ProtocolError(errors.UNAUTHORIZED, "token expired"), close_code=code)
        elif code == errors.CLOSE_POLICY_VIOLATION:
            self._fail(ProtocolError(errors.RATE_LIMITED, reason), close_code=code)
        else:
            self._close(code, reason)

    # --- heart-beats and deadlines -------------------------------------------

    def _no_connect(self):
        if self._principal is None:
            why = ProtocolError(errors.UNAUTHORIZED, "no CONNECT with a valid JWT in time")
        else:
            why = ProtocolError(errors.BAD_REQUEST, "no CONNECT in time")
        self._fail(why)

    def _start_heart_beats(self, send_ms, expect_ms):
        if send_ms:
            self._beats = task.LoopingCall(self._beat)
            self._beats.clock = self._clock
            self._beats.start(send_ms / 1000.0, now=False)
        if expect_ms:
            self._expect = 2 * expect_ms / 1000.0
            self._last_heard = self._clock.seconds()
            self._watch = self._clock.callLater(self._expect, self._check_heard)

    def _beat(self):
        # Sent even after other data: skipping one would let a gap grow to
        # nearly twice the interval, which is where clients give up.
        self._connection.send_frame(frames.HEART_BEAT)

    def _check_heard(self):
        idle = self._clock.seconds() - self._last_heard
        if idle >= self._expect:
            log.info("STOMP client {user} silent for {idle:.0f}s; closing", user=printable(self.user or "-"), idle=idle)
            self._close(CLOSE_NORMAL, "no heart-beat")
        else:
            self._watch = self._clock.callLater(self._expect - idle, self._check_heard)

    # --- sending and closing -------------------------------------------------

    def _send(self, frame):
        self._connection.send_frame(frames.encode(frame, self._version or frames.V12))

    def _fail(self, error, receipt=None, close_code=None):
        """ERROR, then close, as STOMP prescribes; once."""
        if self._closing:
            return
        self._send(frames.error_for(error, receipt))
        if close_code is None:
            close_code = getattr(error, "close_code", None) or _CLOSE_FOR.get(error.code, CLOSE_NORMAL)
        self._close(close_code, error.message)

    def _close(self, code, reason):
        if self._closing:
            return
        self._stop()
        self._connection.close(code, reason)

    def _stop(self):
        self._closing = True
        self._side.slot = None
        self._queue.clear()
        for call in (self._deadline, self._watch):
            if call is not None and call.active():
                call.cancel()
        if self._beats is not None and self._beats.running:
            self._beats.stop()
