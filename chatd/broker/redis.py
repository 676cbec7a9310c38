# -*- test-case-name: tests.test_broker_redis,tests.test_broker_contract,tests.test_scaleout -*-
"""
The Redis broker: many chatd instances behave as one chat.

Redis holds what instances share (tickets, presence, history, the room
registry) and carries room events between them over pub/sub; the key layout
and the Lua scripts are in L{chatd.broker.redis_scripts}, the guarantees in
docs/delivery.md.

Two connections, as in Synapse's bridge: commands and scripts on one,
SUBSCRIBE on the other (a subscribed connection can do nothing else).  Each
is a txredisapi protocol (L{txredisapi.RedisProtocol},
L{txredisapi.SubscriberProtocol}) kept open by Twisted's C{ClientService}
rather than by txredisapi's own factory, on purpose:

  - txredisapi's C{connectionMade} calls C{factory.stopTrying()} when AUTH
    or SELECT fails or times out, so a Redis that is merely slow to answer
    a reconnect (SIGSTOP, a long fork) would end reconnection for good.
    Here the handshake is ours, and a failed one only drops the connection
    and backs off.
  - txredisapi's connection handler queues calls while it is disconnected,
    with no timeout at all.  Here a call without a usable connection fails
    at once with L{BrokerUnavailable}, and every call has the [redis]
    timeout: a call that is not answered in time fails and drops the
    connection, so a stopped Redis shows as unavailable, not as hangs.
  - C{convertNumbers} is off (ids and epochs stay strings), and the
    reactor is the injected one, also for txredisapi's own C{callLater}.
  - Nothing connects before C{startService}.

The subscriber does not re-subscribe by itself after a reconnect
(txredisapi's does not either): after every handshake this module
subscribes again to each room a local member is in, and only then reports
itself available.
"""

import json
import random
import re
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService, TimerService
from twisted.application.service import MultiService
from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from chatd import messages
from chatd.auth import Principal
from chatd.broker import redis_scripts as scripts
from chatd.broker.interfaces import Delivery, Entered, IBroker, Talked
from chatd.errors import BrokerUnavailable, RoomLimitReached
from chatd.logs import printable
from chatd.messages import RoomEvent, event_id_key
from chatd.rooms import DEDUP_WINDOW

log = Logger()

RECONNECT_INITIAL_DELAY = 0.1  # seconds; doubled per failed attempt...
RECONNECT_MAX_DELAY = 5.0  # ...up to this, with +-20% jitter
MAX_LUA_INTEGER = 2**53  # larger `since` parts are clamped: Lua numbers are doubles
_INSTANCE_ID = re.compile(r"[0-9a-f]{1,64}\Z")


def _new_instance_id():
    return "%012x" % random.SystemRandom().getrandbits(48)


def encode_envelope(kind, room, member, text, ref=None):
    """
    The part of an event chatd knows before Redis numbers it.  ASCII-only
    JSON: chat text can hold lone surrogates, which UTF-8 cannot carry.
    """
    return json.dumps(
        {
            "type": kind,
            "room": room,
            "sender": member.name,
            "message": text,
            "origin": member.connection_id,
            "ref": ref,
        },
        ensure_ascii=True,
        separators=(",", ":"),
    )


def decode_event(message):
    """
    A L{Delivery} from the string a script published or stored:
    C{"<id> <userCount> <ts> <envelope JSON>"}.

    @raise ValueError: for anything else.
    """
    if isinstance(message, bytes):
        message = message.decode("utf-8")
    event_id, count, ts, envelope = message.split(" ", 3)
    event_id_key(event_id)
    fields = json.loads(envelope)
    event = RoomEvent(
        type=fields["type"],
        id=event_id,
        room=fields["room"],
        sender=fields["sender"],
        message=fields["message"],
        user_count=int(count),
        ts=int(ts),
    )
    return Delivery(event, fields.get("origin"), fields.get("ref"))


def _quit_envelope(room, member):
    return encode_envelope(messages.QUIT, room, member, messages.left_text(member.name))


# --- connections -----------------------------------------------------------------


class _LinkProtocolMixin:
    """
    Reports connection and loss to the link; never asks txredisapi to stop
    trying.  Also parses all the data at hand in one reactor turn.
    """

    _rest = None

    def setLineMode(self, extra=b""):
        # txredisapi's LineReceiver pauses the transport after every bulk
        # string and hands the rest of the buffer to callLater(0): one
        # reactor turn per bulk, so a burst of pub/sub messages would be
        # fanned out one message per turn, each flushed to every WebSocket
        # on its own.  Keep the rest for dataReceived's loop instead.
        self.line_mode = 1
        if extra:
            self._rest = extra

    def dataReceived(self, data, unpause=False):
        while data:
            super().dataReceived(data)
            data, self._rest = self._rest, None

    def connectionMade(self):
        # password and dbid are None, so txredisapi's connectionMade only
        # marks the protocol usable; the handshake is the link's.
        super().connectionMade()
        self.factory.link.connection_made(self)

    def connectionLost(self, why):
        super().connectionLost(why)
        self.factory.link.connection_lost(self, why)


class _CommandProtocol(_LinkProtocolMixin, txredisapi.RedisProtocol):
    pass


class _SubscriberProtocol(_LinkProtocolMixin, txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.link.message_received(channel, message)


class _LinkFactory(protocol.Factory):
    noisy = False

    def __init__(self, link, protocol_class, clock):
        self.link = link
        self.protocol_class = protocol_class
        self.clock = clock

    def buildProtocol(self, addr):
        # txredisapi's protocols take their options in __init__ (its
        # RedisFactory passes them the same way); no password or dbid here.
        built = self.protocol_class(
            charset="utf-8", errors="strict", replyTimeout=None,
            password=None, dbid=None, convertNumbers=False,
        )
        built.factory = self
        built.callLater = self.clock.callLater  # not the global reactor's
        return built


class RedisLink:
    """
    One Redis connection, kept open with backoff, usable only once its
    handshake (AUTH, SELECT, PING, then C{on_ready}) went through.

    C{protocol} is the usable protocol or L{None}; callers never wait for a
    connection: without one they fail at once.
    """

    def __init__(self, name, protocol_class, endpoint, clock, timeout,
                 password=None, username=None, db=0, on_ready=None, on_message=None):
        self.name = name
        self.protocol = None
        self._clock = clock
        self._timeout = timeout
        self._password = password
        self._username = username
        self._db = db
        self._on_ready = on_ready
        self._on_message = on_message
        self._failed_handshakes = 0
        self._waiters = []
        self.service = ClientService(
            endpoint, _LinkFactory(self, protocol_class, clock),
            retryPolicy=self._retry_delay, clock=clock,
        )

    def _retry_delay(self, attempt):
        # ClientService forgets failures once TCP connects; a connection
        # whose handshake fails still counts, or a Redis that accepts and
        # then refuses would be retried in a tight loop.
        failures = max(attempt, self._failed_handshakes)
        delay = min(RECONNECT_MAX_DELAY, RECONNECT_INITIAL_DELAY * 2 ** min(failures - 1, 32))
        return delay * random.uniform(0.8, 1.2)

    def when_ready(self):
        """A Deferred that fires (with nothing) once the link is usable."""
        if self.protocol is not None:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        return waiter

    def call(self, what, issue, protocol=None):
        """
        Run C{issue(protocol)} (a txredisapi call returning a Deferred) with
        the timeout.  Redis failures come out as L{BrokerUnavailable}.
        """
        if protocol is None:
            protocol = self.protocol
        if protocol is None:
            return defer.fail(BrokerUnavailable(f"redis ({self.name}) is not connected"))
        d = defer.maybeDeferred(issue, protocol)
        d.addTimeout(self._timeout, self._clock)
        d.addErrback(self._failed, protocol, what)
        return d

    def _failed(self, failure, protocol, what):
        if failure.check(defer.TimeoutError):
            log.warn(
                "redis ({link}) did not answer {command} within {timeout}s; dropping the connection",
                link=self.name, command=what, timeout=self._timeout,
            )
            self._drop(protocol)
            raise BrokerUnavailable(f"redis ({self.name}) timed out") from None
        if failure.check(txredisapi.ResponseError):
            log.error(
                "redis ({link}) refused {command}: {why}",
                link=self.name, command=what, why=printable(failure.getErrorMessage()),
            )
            raise BrokerUnavailable(f"redis ({self.name}) refused {what}") from None
        if failure.check(txredisapi.ConnectionError, txredisapi.InvalidResponse):
            raise BrokerUnavailable(f"redis ({self.name}) connection lost") from None
        return failure

    # --- what the protocol reports ------------------------------------------

    def connection_made(self, protocol):
        d = defer.ensureDeferred(self._handshake(protocol))
        d.addErrback(self._handshake_failed, protocol)

    async def _handshake(self, protocol):
        if self._password is not None:
            args = ("AUTH", self._username, self._password) if self._username else ("AUTH", self._password)
            await self.call("AUTH", lambda p: p.execute_command(*args), protocol)
        if self._db:
            await self.call("SELECT", lambda p: p.execute_command("SELECT", self._db), protocol)
        await self.call("PING", lambda p: p.execute_command("PING"), protocol)
        if self._on_ready is not None:
            await self._on_ready(self, protocol)
        if not protocol.connected:
            raise BrokerUnavailable("lost during the handshake")
        self.protocol = protocol
        self._failed_handshakes = 0
        log.info("redis ({link}) connected to {peer}", link=self.name, peer=_peer(protocol))
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _handshake_failed(self, failure, protocol):
        self._failed_handshakes += 1
        if not failure.check(BrokerUnavailable):
            log.failure("redis ({link}) handshake failed", failure, link=self.name)
        elif self._failed_handshakes == 1:
            log.warn(
                "redis ({link}) handshake failed: {why}; retrying",
                link=self.name, why=failure.getErrorMessage(),
            )
        if protocol.connected:
            self._drop(protocol)

    def _drop(self, protocol):
        # Unusable from now on, not from when the reactor reports the loss.
        if protocol is self.protocol:
            self.protocol = None
        if protocol.transport is not None:
            protocol.transport.abortConnection()

    def connection_lost(self, protocol, why):
        if protocol is not self.protocol:
            return
        self.protocol = None
        if not self.service.running:
            log.info("redis ({link}) connection closed", link=self.name)
            return
        log.warn("redis ({link}) connection lost ({why}); reconnecting", link=self.name,
                 why=why.getErrorMessage().rstrip("."))

    def message_received(self, channel, message):
        if self._on_message is not None:
            self._on_message(channel, message)


def _peer(protocol):
    peer = protocol.transport.getPeer() if protocol.transport is not None else None
    return f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"


# --- the broker ------------------------------------------------------------------


@implementer(IBroker)
class RedisBroker(MultiService):
    """
    L{IBroker} on Redis.  A C{MultiService}: its children are the two
    connections and the presence timer (heartbeat, retries, the sweep for
    dead instances), all started by C{startService} and no earlier.
    """

    def __init__(self, clock, host, port, db=0, password=None, username=None,
                 timeout=5.0, presence_ttl=15.0, history_size=500, instance_id=None,
                 max_rooms=10000):
        super().__init__()
        self.instance_id = instance_id or _new_instance_id()
        self._clock = clock
        self._timeout = timeout
        self._presence_ttl = presence_ttl
        self._history_size = history_size
        self._max_rooms = max_rooms
        self._keys = scripts.Keys(db)
        self._deliver = None
        self._wanted = set()  # rooms the hub subscribed to
        self._live = set()  # ...whose SUBSCRIBE Redis confirmed on this subscriber connection
        self._local = {}  # room -> {connection id: Member}: what this instance has in presence
        self._unsure = {}  # (room, connection id) -> Member: QUITs to (re)try, only if present
        self._in_flight = set()
        self._judge_after = None  # no sweeping before this time (see _heartbeat)
        self._ticking = False
        self._stopping = False
        def endpoint():
            return HostnameEndpoint(clock, host, port, timeout=timeout)

        common = dict(clock=clock, timeout=timeout, password=password, username=username)
        self._commands = RedisLink(
            "commands", _CommandProtocol, endpoint(), db=db,
            on_ready=self._commands_ready, **common,
        )
        self._subscriber = RedisLink(
            "subscriber", _SubscriberProtocol, endpoint(),
            on_ready=self._subscriber_ready, on_message=self._message, **common,
        )
        self._commands.service.setServiceParent(self)
        self._subscriber.service.setServiceParent(self)
        self._timer = TimerService(self._upkeep_interval, self._tick)
        self._timer.clock = clock
        self._timer.setServiceParent(self)

    @classmethod
    def from_settings(cls, settings, reactor):
        url = urlsplit(settings.redis.url)
        db = url.path.lstrip("/")
        return cls(
            reactor,
            host=url.hostname,
            port=url.port or 6379,
            db=int(db) if db else 0,
            password=settings.redis_password,
            username=unquote(url.username) if url.username else None,
            timeout=settings.redis.timeout,
            presence_ttl=settings.redis.presence_ttl,
            history_size=settings.history.size,
            max_rooms=settings.limits.max_rooms,
        )

    @property
    def _upkeep_interval(self):
        return self._presence_ttl / 3.0

    # --- lifecycle ----------------------------------------------------------------

    def startService(self):
        log.info(
            "redis broker: instance {instance}, presence ttl {ttl}s, timeout {timeout}s",
            instance=self.instance_id, ttl=self._presence_ttl, timeout=self._timeout,
        )
        super().startService()

    def stopService(self):
        """
        Say goodbye before the connections close: finish the calls in
        flight (the QUITs of connections closed on shutdown), then take
        every remaining connection of this instance out of its rooms, with
        their QUIT events, and drop the heartbeat.
        """
        self._stopping = True
        d = defer.ensureDeferred(self._goodbye())
        d.addErrback(lambda f: log.failure("redis broker goodbye failed", f))
        d.addCallback(lambda _: MultiService.stopService(self))
        return d

    async def _goodbye(self):
        await self._timer.stopService()
        if self._in_flight:
            pending = defer.DeferredList(list(self._in_flight), consumeErrors=True)
            pending.addTimeout(self._timeout, self._clock)
            try:
                await pending
            except defer.TimeoutError:
                pass
        if self._commands.protocol is None:
            log.warn("redis broker stopping without Redis: other instances will time our users out")
            return
        try:
            await self._command("DEL", self._keys.heartbeat(self.instance_id))
            gone = await self._reap(self.instance_id)
        except BrokerUnavailable as e:
            log.warn("redis broker goodbye incomplete: {why}", why=str(e))
            return
        log.info("redis broker: {count} connections left their rooms on shutdown", count=gone)

    def when_available(self):
        """A Deferred that fires once both connections are usable (for tests and tools)."""
        return defer.gatherResults([self._commands.when_ready(), self._subscriber.when_ready()])

    def is_available(self):
        return self._commands.protocol is not None and self._subscriber.protocol is not None

    # --- plumbing -----------------------------------------------------------------

    def _track(self, d):
        self._in_flight.add(d)

        def done(result):
            self._in_flight.discard(d)
            return result

        d.addBoth(done)
        return d

    def _command(self, *args):
        return self._commands.call(args[0], lambda p: p.execute_command(*args))

    def _script(self, name, source, keys, args):
        return self._commands.call(name, lambda p: p.eval(source, keys, args))

    # --- the feed -----------------------------------------------------------------

    def set_feed(self, deliver):
        self._deliver = deliver

    def subscribe(self, room):
        self._wanted.add(room)
        protocol = self._subscriber.protocol
        d = self._subscriber.call("SUBSCRIBE", lambda p: p.subscribe(self._keys.channel(room)))
        d.addCallback(self._subscribed, room, protocol)
        return d

    def _subscribed(self, _, room, protocol):
        if room in self._wanted and protocol is self._subscriber.protocol:
            self._live.add(room)
        return None

    def unsubscribe(self, room):
        self._wanted.discard(room)
        self._live.discard(room)
        if self._subscriber.protocol is None:
            return defer.succeed(None)  # nothing to undo; a reconnect subscribes only to _wanted
        d = self._subscriber.call("UNSUBSCRIBE", lambda p: p.unsubscribe(self._keys.channel(room)))
        d.addCallback(lambda _: None)
        return d

    async def _subscriber_ready(self, link, protocol):
        """Subscribe again to every wanted room: Redis forgot them with the old connection."""
        self._live.clear()
        rooms = sorted(self._wanted)
        if rooms:
            await defer.gatherResults(
                [link.call("SUBSCRIBE", lambda p, r=r: p.subscribe(self._keys.channel(r)), protocol)
                 for r in rooms],
                consumeErrors=True,
            ).addErrback(lambda f: f.value.subFailure)
            dropped = [r for r in rooms if r not in self._wanted]  # left meanwhile
            for room in dropped:
                d = link.call("UNSUBSCRIBE", lambda p, r=room: p.unsubscribe(self._keys.channel(r)), protocol)
                d.addErrback(lambda f: f.trap(BrokerUnavailable))  # the connection is going anyway
            self._live.update(r for r in rooms if r in self._wanted)
            log.info("redis (subscriber) subscribed again to {count} rooms", count=len(rooms))

    def _message(self, channel, message):
        room = self._keys.room_of_channel(channel if isinstance(channel, str) else channel.decode())
        if room not in self._wanted or self._deliver is None:
            return
        try:
            delivery = decode_event(message)
        except (ValueError, KeyError, TypeError):
            log.error("dropping an undecodable event from {room}", room=printable(room))
            return
        self._feed(delivery)

    def _feed(self, delivery):
        try:
            self._deliver(delivery)
        except Exception:
            log.failure("delivering an event of {room} failed", room=printable(delivery.event.room))

    # --- tickets ------------------------------------------------------------------

    def issue_ticket(self, ticket, grant, ttl):
        grant_json = json.dumps(grant.to_json(), ensure_ascii=True)
        d = self._command("SET", self._keys.ticket(ticket), grant_json, "PX", int(ttl * 1000))
        d.addCallback(lambda _: None)
        return d

    def redeem_ticket(self, ticket):
        d = self._script("redeem", scripts.REDEEM_TICKET, [self._keys.ticket(ticket)], [])
        d.addCallback(self._grant)
        return d

    def _grant(self, stored):
        if stored is None:
            return None
        try:
            return Principal.from_json(json.loads(stored))
        except (ValueError, KeyError, TypeError):
            log.error("dropping an unreadable ticket grant")
            return None

    # --- rooms --------------------------------------------------------------------

    def enter(self, room, member, since=None, ref=None):
        return self._track(defer.ensureDeferred(self._enter(room, member, since, ref)))

    async def _enter(self, room, member, since, ref):
        since_epoch, since_seq = "", "0"
        if since is not None:
            since_key = event_id_key(since)
            since_epoch = str(min(since_key[0], MAX_LUA_INTEGER))
            since_seq = str(min(since_key[1], MAX_LUA_INTEGER) if len(since_key) > 1 else 0)
        self._local.setdefault(room, {})[member.connection_id] = member
        self._unsure.pop((room, member.connection_id), None)
        try:
            reply = await self._script(
                "enter", scripts.ENTER,
                self._keys.room_keys(room, self.instance_id),
                [room, member.connection_id, _quit_envelope(room, member),
                 encode_envelope(messages.ENTER, room, member, messages.entered_text(member.name), ref),
                 self._keys.channel(room), since_epoch, since_seq, str(self._max_rooms)],
            )
        except BrokerUnavailable:
            # It may have happened anyway (a timeout): make sure it is undone.
            self._forget_local(room, member)
            self._unsure[(room, member.connection_id)] = member
            raise
        if reply[0] == scripts.ROOM_LIMIT_REACHED:
            self._forget_local(room, member)
            raise RoomLimitReached(room)
        event = decode_event(reply[0]).event
        if since is None:
            return Entered(event)
        dropped = reply[1]
        own_key = event_id_key(event.id)
        replay = tuple(
            e for e in (decode_event(m).event for m in reply[2:])
            if since_key < event_id_key(e.id) < own_key
        )
        complete = since_key[0] == own_key[0] and (
            not dropped or since_key >= (own_key[0], int(dropped))
        )
        return Entered(event, replay, complete)

    def talk(self, room, member, text, cid=None, ref=None):
        return self._track(defer.ensureDeferred(self._talk(room, member, text, cid, ref)))

    async def _talk(self, room, member, text, cid, ref):
        keys = self._keys.room_keys(room, self.instance_id)
        keys.append(self._keys.accepted(room, member.sub, cid) if cid is not None else keys[0])
        reply = await self._script(
            "talk", scripts.TALK, keys,
            [room, member.connection_id, _quit_envelope(room, member),
             encode_envelope(messages.TALK, room, member, text, ref),
             self._keys.channel(room), self._history_size, int(DEDUP_WINDOW * 1000),
             "1" if cid is not None else "0"],
        )
        duplicate, delivery = reply[0] == 1, decode_event(reply[1])
        if not duplicate and room in self._wanted and (
            room not in self._live or self._subscriber.protocol is None
        ):
            # Our subscription to the room is down (Redis reconnecting):
            # the event is stored and published, but the feed will not
            # bring it back here, so the sender's acknowledgement comes
            # this way instead.
            self._feed(delivery)
        return Talked(delivery.event, duplicate)

    def quit(self, room, member, ref=None):
        self._forget_local(room, member)
        d = defer.ensureDeferred(self._quit(room, member, ref, only_if_present=False))
        d.addErrback(self._quit_failed, room, member)
        return self._track(d)

    def _quit_failed(self, failure, room, member):
        failure.trap(BrokerUnavailable)
        # Retried by the upkeep timer, so the room does not count a ghost.
        self._unsure[(room, member.connection_id)] = member
        return failure

    async def _quit(self, room, member, ref, only_if_present):
        reply = await self._script(
            "quit", scripts.QUIT,
            self._keys.room_keys(room, self.instance_id),
            [room, member.connection_id,
             encode_envelope(messages.QUIT, room, member, messages.left_text(member.name), ref),
             self._keys.channel(room), "1" if only_if_present else "0", scripts.IDLE_ROOM_MS],
        )
        return decode_event(reply).event if reply is not None else None

    def _forget_local(self, room, member):
        members = self._local.get(room)
        if members is not None:
            members.pop(member.connection_id, None)
            if not members:
                del self._local[room]

    def list_rooms(self):
        return self._track(defer.ensureDeferred(self._list_rooms()))

    async def _list_rooms(self):
        names = [n for n in await self._command("SMEMBERS", self._keys.registry)
                 if messages.is_room_name(n)]
        counts = await defer.gatherResults(
            [self._command("HLEN", self._keys.members(name)) for name in names],
            consumeErrors=True,
        ).addErrback(lambda f: f.value.subFailure)
        return sorted(zip(names, (int(c) for c in counts)))

    # --- presence upkeep ----------------------------------------------------------

    def _commands_ready(self, link, protocol):
        # Register this instance as soon as Redis is reachable, not a
        # timer period later.
        self._clock.callLater(0, self._tick)
        return defer.succeed(None)

    def _tick(self):
        """The upkeep timer: heartbeat, retried QUITs, the dead-instance sweep, subscriber ping."""
        if self._ticking or self._stopping:
            return defer.succeed(None)
        self._ticking = True
        d = defer.ensureDeferred(self._upkeep())
        d.addErrback(lambda f: log.failure("presence upkeep failed", f))

        def done(_):
            self._ticking = False

        return d.addBoth(done)

    async def _upkeep(self):
        if self._subscriber.protocol is not None:
            try:
                # Also how a silent subscriber connection is noticed.
                await self._subscriber.call("PING", lambda p: p.execute_command("PING"))
            except BrokerUnavailable:
                pass
        if self._commands.protocol is None or self._stopping:
            return
        try:
            await self._heartbeat()
            await self._retry_unsure()
            await self._sweep()
        except BrokerUnavailable:
            pass  # logged by the link; next time

    async def _heartbeat(self):
        existed = await self._script(
            "heartbeat", scripts.HEARTBEAT,
            [self._keys.heartbeat(self.instance_id), self._keys.instances],
            [self.instance_id, int(self._presence_ttl * 1000)],
        )
        if existed == 1:
            return
        # New, or our heartbeat ran out (Redis lost its data, or was out of
        # reach for longer than the TTL).  Then every instance's heartbeat
        # may have run out with ours: judge nobody dead until they all had
        # a full TTL to come back, or live users would be reaped.
        self._judge_after = self._clock.seconds() + self._presence_ttl
        for room in sorted(self._local):
            members = self._local.get(room)
            if not members:
                continue
            args = [room]
            for connection_id, member in members.items():
                args += [connection_id, _quit_envelope(room, member)]
            added = await self._script(
                "reassert", scripts.REASSERT,
                [self._keys.meta(room), self._keys.members(room), self._keys.registry,
                 self._keys.instance_rooms(self.instance_id)],
                args,
            )
            if added:
                log.info("put {count} connections back into {room}", count=added, room=printable(room))

    async def _retry_unsure(self):
        for (room, connection_id), member in list(self._unsure.items()):
            if connection_id in self._local.get(room, {}):
                del self._unsure[(room, connection_id)]  # entered again meanwhile
                continue
            event = await self._quit(room, member, None, only_if_present=True)
            self._unsure.pop((room, connection_id), None)
            if event is not None:
                log.info("recorded the late QUIT of {user} from {room}",
                         user=printable(member.name), room=printable(room))

    async def _sweep(self):
        if self._judge_after is None or self._clock.seconds() < self._judge_after:
            return
        others = [i for i in await self._command("SMEMBERS", self._keys.instances)
                  if i != self.instance_id and _INSTANCE_ID.match(i)]
        if not others:
            return
        beats = await self._command("MGET", *[self._keys.heartbeat(i) for i in others])
        for instance_id, beat in zip(others, beats):
            if beat is None:
                gone = await self._reap(instance_id)
                log.info(
                    "instance {instance} stopped sending heartbeats: {count} of its connections left",
                    instance=instance_id, count=gone,
                )

    async def _reap(self, instance_id):
        """Every connection of C{instance_id} leaves every room, once, with a QUIT."""
        heartbeat = self._keys.heartbeat(instance_id)
        rooms = await self._command("HKEYS", self._keys.instance_rooms(instance_id))
        gone = 0
        for room in rooms:
            if not messages.is_room_name(room):
                continue
            keys = self._keys.room_keys(room, instance_id) + [heartbeat]
            gone += await self._script(
                "reap", scripts.REAP_ROOM, keys,
                [room, instance_id + ":", self._keys.channel(room), scripts.IDLE_ROOM_MS],
            )
        await self._script(
            "forget instance", scripts.FORGET_INSTANCE,
            [heartbeat, self._keys.instance_rooms(instance_id), self._keys.instances],
            [instance_id],
        )
        return gone
