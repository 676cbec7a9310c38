# -*- test-case-name: tests.test_broker_redis,tests.test_broker_contract,tests.test_scaleout -*-
"""
The Redis broker: many chatd instances behave as one chat.

Redis holds what instances share (tickets, presence, history, the room
registry) and carries room events between them over pub/sub; the
guarantees are in docs/delivery.md.  This module wires three parts and
implements L{IBroker} with them:

  - L{chatd.broker.redis_link}: the connections.  Two, as in Synapse's
    bridge: commands and scripts on one, SUBSCRIBE on the other (a
    subscribed connection can do nothing else).
  - L{chatd.broker.redis_scripts}: the key layout, the Lua scripts and the
    event codec, the wire format every instance shares.
  - L{chatd.broker.redis_presence}: the heartbeat, the sweep for dead
    instances and retried QUITs, a timer service.

The subscriber does not re-subscribe by itself after a reconnect
(txredisapi's does not either): after every handshake this module
subscribes again to each room a local member is in, and only then reports
the link available.
"""

import itertools
import json
import random
from collections import OrderedDict
from urllib.parse import unquote, urlsplit

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from chatd import messages
from chatd.auth import Principal
from chatd.broker import redis_scripts as scripts
from chatd.broker.interfaces import (
    DISCONNECT, KICK, Control, Delivery, Entered, IBroker, Member, Talked,
)
from chatd.broker.redis_link import CommandProtocol, RedisLink, SubscriberProtocol
from chatd.broker.redis_presence import Presence
from chatd.broker.redis_scripts import (
    decode_control, decode_event, decode_member, decode_message, encode_control, encode_envelope,
    enter_envelope, member_envelope, quit_envelope,
)
from chatd.errors import BrokerUnavailable, RoomLimitReached, TooManyNewRooms
from chatd.logs import printable
from chatd.messages import RoomEvent, event_id_key
from chatd.broker.interfaces import DEDUP_MAX, DEDUP_WINDOW
from chatd.rooms import DEFAULT_MAX_BYTES, DEFAULT_TTL

log = Logger()

MAX_LUA_INTEGER = 2**53  # larger `since` parts are clamped: Lua numbers are doubles
KEEPALIVE = 0.5  # seconds between PINGs on an idle link: /healthz is 503 within timeout + this
FAILED_TALKS_KEPT = 10000  # TALK calls answered `unavailable` remembered (see _settle_talk)
DISCONNECT_ATTEMPTS = 5  # listings of a user's tickets while more are being issued (see _disconnect)

__all__ = ["RedisBroker", "decode_event", "encode_envelope"]


def _new_instance_id():
    return "%012x" % random.SystemRandom().getrandbits(48)


@implementer(IBroker)
class RedisBroker(MultiService):
    """
    L{IBroker} on Redis.  A C{MultiService}: its children are the two
    connections and the presence timer, all started by C{startService} and
    no earlier.
    """

    def __init__(self, clock, host, port, db=0, password=None, username=None,
                 timeout=5.0, presence_ttl=15.0, history_size=500, instance_id=None,
                 max_rooms=10000, max_talk_chars=4000, max_bytes=DEFAULT_MAX_BYTES,
                 ttl=DEFAULT_TTL, max_new_rooms_per_user=100):
        super().__init__()
        self.instance_id = instance_id or _new_instance_id()
        self._clock = clock
        self._timeout = timeout
        self._presence_ttl = presence_ttl
        self._history_size = history_size
        self._max_rooms = max_rooms
        self._max_bytes = max_bytes
        self._ttl_ms = int(ttl * 1000)
        self._max_new_rooms_per_user = max_new_rooms_per_user
        self._history_page = scripts.history_page_entries(max_talk_chars)
        self._keys = scripts.Keys(db)
        self._deliver = None
        self._deliver_burst = None
        self._control = None
        self._own_events = None
        self._wanted = set()  # rooms the hub subscribed to
        self._live = set()  # ...whose SUBSCRIBE Redis confirmed on this subscriber connection
        self._in_flight = set()
        self._calls = itertools.count(1)
        self._talks = {}  # call id -> the Deferred answering a TALK not answered yet
        self._failed_talks = OrderedDict()  # call id -> when it was answered `unavailable`
        self._redeeming = []  # per redeem in flight: the users a DISCONNECT came for meanwhile

        def endpoint():
            return HostnameEndpoint(clock, host, port, timeout=timeout)

        common = dict(clock=clock, timeout=timeout, password=password, username=username,
                      keepalive=min(KEEPALIVE, presence_ttl / 3.0))
        self._commands = RedisLink(
            "commands", CommandProtocol, endpoint(), db=db,
            on_ready=self._commands_ready, **common,
        )
        self._subscriber = RedisLink(
            "subscriber", SubscriberProtocol, endpoint(),
            on_ready=self._subscriber_ready, on_message=self._messages, **common,
        )
        self._presence = Presence(
            clock, self._commands, self._keys, self.instance_id, presence_ttl, self._ttl_ms,
            quit=lambda room, member: self._quit(room, member, None, only_if_present=True),
            on_event=self._own_event,
        )
        self._commands.service.setServiceParent(self)
        self._subscriber.service.setServiceParent(self)
        self._presence.setServiceParent(self)

    @classmethod
    def from_settings(cls, settings, reactor):
        """The broker [redis], [history] and [limits] describe."""
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
            max_talk_chars=settings.limits.max_talk_chars,
            max_bytes=settings.history.max_bytes,
            ttl=settings.history.ttl,
            max_new_rooms_per_user=settings.limits.max_new_rooms_per_user,
        )

    # --- lifecycle ----------------------------------------------------------------

    def startService(self):
        """Service API: connect (the links) and start the presence timer."""
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
        d = defer.ensureDeferred(self._goodbye())
        d.addErrback(lambda f: log.failure("redis broker goodbye failed", f))
        d.addCallback(lambda _: MultiService.stopService(self))
        return d

    async def _goodbye(self):
        await self._presence.stopService()
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
            gone = await self._presence.goodbye()
        except BrokerUnavailable as e:
            log.warn("redis broker goodbye incomplete: {why}", why=str(e))
            return
        log.info("redis broker: {count} connections left their rooms on shutdown", count=gone)

    def when_available(self):
        """A Deferred that fires once both connections are usable (for tests and tools)."""
        return defer.gatherResults([self._commands.when_ready(), self._subscriber.when_ready()])

    def is_available(self):
        """IBroker API: both connections usable (each PINGed while idle, see RedisLink)."""
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
        return self._commands.command(*args)

    def _script(self, name, source, keys, args):
        return self._commands.call(name, lambda p: p.eval(source, keys, args))

    # --- the feed -----------------------------------------------------------------

    def set_feed(self, deliver, deliver_burst=None):
        """IBroker API: a read's messages go to C{deliver_burst} together."""
        self._deliver = deliver
        self._deliver_burst = deliver_burst

    def subscribe(self, room):
        """IBroker API"""
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
        """IBroker API"""
        self._wanted.discard(room)
        self._live.discard(room)
        if self._subscriber.protocol is None:
            return defer.succeed(None)  # nothing to undo; a reconnect subscribes only to _wanted
        d = self._subscriber.call("UNSUBSCRIBE", lambda p: p.unsubscribe(self._keys.channel(room)))
        d.addCallback(lambda _: None)
        return d

    async def _subscriber_ready(self, link, protocol):
        """
        Subscribe to the control channel and again to every wanted room:
        Redis forgot them with the old connection.
        """
        self._live.clear()
        await link.call("SUBSCRIBE", lambda p: p.subscribe(self._keys.control), protocol)
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

    def _messages(self, messages):
        """
        Pub/sub messages read together, in order: their deliveries go to
        the feed as one burst, but a control command is carried out in its
        place (after the deliveries before it).
        """
        burst = []
        for channel, message in messages:
            channel = channel if isinstance(channel, str) else channel.decode()
            if channel == self._keys.control:
                self._feed_burst(burst)
                burst = []
                self._command_received(message)
                continue
            delivery = self._delivery(channel, message)
            if delivery is not None:
                burst.append(delivery)
        self._feed_burst(burst)

    def _delivery(self, channel, message):
        """The delivery a room's message brings, or L{None}."""
        room = self._keys.room_of_channel(channel)
        if room not in self._wanted or self._deliver is None:
            return None
        try:
            published = decode_message(message)
        except (ValueError, KeyError, TypeError):
            log.error("dropping an undecodable event from {room}", room=printable(room))
            return None
        delivery, reaped, call = published.delivery, published.reaped, published.call
        if reaped and self._presence.is_local(room, delivery.origin):
            if self._presence.stopping:
                # Our own goodbye's QUIT: the connection goes with this
                # instance, it is not to be put back.
                return None
            # Another instance took this one for dead (it was stalled, or
            # cut off from Redis) and reaped a connection that never left.
            # Its members must not hear a QUIT they would act on while the
            # connection stays: keep it, and put it back into the room
            # with an ENTER instead (docs/delivery.md, "stalls").
            log.info("{user} was reaped from {room} while connected; putting it back",
                     user=printable(delivery.event.sender), room=printable(room))
            self._presence.reassert_soon(room)
            return None
        if call is not None:
            delivery = self._talk_published(call, delivery)
        return delivery

    def _feed(self, delivery):
        try:
            self._deliver(delivery)
        except Exception:
            log.failure("delivering an event of {room} failed", room=printable(delivery.event.room))

    def _feed_burst(self, burst):
        if len(burst) == 1 or (burst and self._deliver_burst is None):
            for delivery in burst:
                self._feed(delivery)
        elif burst:
            try:
                self._deliver_burst(burst)
            except Exception:
                log.failure("delivering a burst of {count} events failed", count=len(burst))

    # --- tickets ------------------------------------------------------------------

    def issue_ticket(self, ticket, grant, ttl):
        """IBroker API"""
        grant_json = json.dumps(grant.to_json(), ensure_ascii=True)
        d = self._script(
            "issue", scripts.ISSUE_TICKET,
            [self._keys.ticket(ticket), self._keys.user_tickets(grant.sub)],
            [grant_json, max(1, int(ttl * 1000))],
        )
        d.addCallback(lambda _: None)
        return d

    def redeem_ticket(self, ticket):
        """IBroker API"""
        return defer.ensureDeferred(self._redeem(ticket))

    async def _redeem(self, ticket):
        """
        The grant, unless a disconnect of its user voided it.  A disconnect
        voids the tickets not yet redeemed, and every instance closes the
        connections it has of the user when its control command comes.  A
        connection whose ticket Redis redeemed just before the disconnect
        is neither: if the command reaches this instance before the
        redeem's reply (they come on two connections), there was nothing
        to close yet.  So when a DISCONNECT of the grant's user came while
        this redeem was in flight, the ticket counts as void if the
        disconnect took it out of the user's index (it was issued before
        the disconnect); one still listed was issued after, and is good.
        """
        key = self._keys.ticket(ticket)
        heard = set()
        self._redeeming.append(heard)
        try:
            stored = await self._script("redeem", scripts.REDEEM_TICKET, [key], [])
        finally:
            self._redeeming.remove(heard)
        grant = self._grant(stored)
        if grant is not None and grant.sub in heard:
            if not int(await self._command("SISMEMBER", self._keys.user_tickets(grant.sub), key)):
                log.info("a ticket of {sub} redeemed as it was disconnected counts as void",
                         sub=printable(grant.sub))
                return None
        return grant

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
        """IBroker API"""
        return self._track(defer.ensureDeferred(self._enter(room, member, since, ref)))

    async def _enter(self, room, member, since, ref):
        self._presence.seated(room, member)
        try:
            reply = await self._script(
                "enter", scripts.ENTER,
                self._keys.room_keys(room, self.instance_id),
                [room, member.connection_id, member_envelope(room, member),
                 enter_envelope(room, member, ref), self._keys.channel(room), str(self._max_rooms),
                 scripts.digest(member.sub), str(self._max_new_rooms_per_user)],
            )
        except BrokerUnavailable:
            # It may have happened anyway (a timeout): make sure it is undone.
            self._presence.unsure(room, member)
            raise
        if reply[0] == scripts.ROOM_LIMIT_REACHED:
            self._presence.left(room, member)
            raise RoomLimitReached(room)
        if reply[0] == scripts.TOO_MANY_NEW_ROOMS:
            self._presence.left(room, member)
            raise TooManyNewRooms(self._max_new_rooms_per_user)
        event = decode_event(reply[0]).event
        if since is None:
            return Entered(event)
        replay, complete = await self._replay(room, event_id_key(since), event_id_key(event.id))
        return Entered(event, replay, complete)

    async def _replay(self, room, since_key, own_key):
        """
        The room's TALKs with C{since < id < own}, read in pages after the
        ENTER, and whether they are all there were.  TALKs evicted while
        the pages are read are simply missing, and C{dropped} (read last,
        it only grows) then says the replay is not complete.
        """
        epoch, own_seq = own_key[0], own_key[1]
        since_seq = since_key[1] if len(since_key) > 1 else 0
        if since_key[0] < epoch:
            after = 0
        elif since_key[0] == epoch:
            after = min(since_seq, own_seq)
        else:
            return (), False
        replay = []
        start, page = after + 1, self._history_page
        while start < own_seq:  # bounded: every round moves start past a stored seq
            entries = await self._command(
                "XRANGE", self._keys.history(room), f"0-{start}", f"0-{own_seq - 1}", "COUNT", page)
            for entry_id, fields in entries:
                message = dict(zip(fields[::2], fields[1::2])).get("m")
                if message is not None:
                    replay.append(decode_event(message).event)
            if len(entries) < page:
                break
            start = int(entries[-1][0].split("-")[1]) + 1
        now_epoch, dropped = await self._command("HMGET", self._keys.meta(room), "epoch", "dropped")
        replay = tuple(e for e in replay if since_key < event_id_key(e.id) < own_key)
        complete = (
            since_key[0] == epoch
            and now_epoch == str(epoch)
            and (not dropped or since_key >= (epoch, int(dropped)))
        )
        return replay, complete

    def talk(self, room, member, text, cid=None, ref=None):
        """IBroker API"""
        return self._track(defer.ensureDeferred(self._talk(room, member, text, cid, ref)))

    async def _talk(self, room, member, text, cid, ref):
        call = f"{self.instance_id}:{next(self._calls)}"
        keys = self._keys.room_keys(room, self.instance_id)
        keys += [self._keys.cids(room, member.sub), self._keys.cid_times(room, member.sub)]
        answer = self._talks[call] = defer.Deferred()
        d = self._script(
            "talk", scripts.TALK, keys,
            [room, member.connection_id,
             encode_envelope(messages.TALK, room, member, text, ref, call=call),
             self._keys.channel(room), self._history_size, self._max_bytes,
             scripts.digest(cid) if cid is not None else "", int(DEDUP_WINDOW * 1000),
             DEDUP_MAX, self._ttl_ms],
        )
        d.addCallback(self._talked, room, member, text)
        d.addBoth(self._settle_talk, call)
        return await answer

    def _talked(self, reply, room, member, text):
        if reply[0] == 2:
            # A duplicate whose original left history: only its id and time
            # were kept.
            return Talked(RoomEvent(
                type=messages.TALK, id=reply[1], room=room, sender=member.name, message=text,
                user_count=int(reply[3]), ts=int(reply[2]),
            ), True)
        duplicate, delivery = reply[0] == 1, decode_event(reply[1])
        if not duplicate and reply[2] == 0 and self._presence.is_local(room, member.connection_id):
            self._presence.reassert_soon(room)  # Redis lost it, or it was reaped: put it back
        if not duplicate and room in self._wanted and (
            room not in self._live or self._subscriber.protocol is None
        ):
            # Our subscription to the room is down (Redis reconnecting):
            # the event is stored and published, but the feed will not
            # bring it back here, so the sender's acknowledgement comes
            # this way instead.
            self._feed(delivery)
        return Talked(delivery.event, duplicate)

    def _settle_talk(self, result, call):
        """
        Each TALK gets one answer, whichever comes first: the script's
        reply, the feed bringing the event it published (then a timeout
        that follows is moot), or a failure.  A TALK answered `unavailable`
        may still have run (Redis runs what is in its socket buffer when it
        resumes); should its event come later, it goes out as a room event
        without the sender's ref, not as a second answer (L{_talk_published}).
        """
        answer = self._talks.pop(call, None)
        if answer is None or answer.called:
            if isinstance(result, Failure):
                result.trap(BrokerUnavailable)
            return None
        if isinstance(result, Failure):
            self._failed_talks[call] = self._clock.seconds()
            while len(self._failed_talks) > FAILED_TALKS_KEPT or (
                self._failed_talks
                and next(iter(self._failed_talks.values())) < self._clock.seconds() - DEDUP_WINDOW
            ):
                self._failed_talks.popitem(last=False)
        if isinstance(result, Failure):
            answer.errback(result)
        else:
            answer.callback(result)
        return None

    def _talk_published(self, call, delivery):
        answer = self._talks.pop(call, None)
        if answer is not None and not answer.called:
            answer.callback(Talked(delivery.event, False))  # the feed was faster than the reply
        elif call in self._failed_talks:
            del self._failed_talks[call]
            log.info("a TALK answered `unavailable` ran after all: {room} {id}",
                     room=printable(delivery.event.room), id=delivery.event.id)
            return Delivery(delivery.event, delivery.origin, None)
        return delivery

    def quit(self, room, member, ref=None):
        """IBroker API"""
        self._presence.left(room, member)
        d = defer.ensureDeferred(self._quit(room, member, ref, only_if_present=False))
        d.addErrback(self._quit_failed, room, member)
        return self._track(d)

    def _quit_failed(self, failure, room, member):
        failure.trap(BrokerUnavailable)
        # Retried by the upkeep timer, so the room does not count a ghost.
        self._presence.unsure(room, member)
        return failure

    async def _quit(self, room, member, ref, only_if_present):
        reply = await self._script(
            "quit", scripts.QUIT,
            self._keys.room_keys(room, self.instance_id),
            [room, member.connection_id,
             quit_envelope(room, member, ref),
             self._keys.channel(room), "1" if only_if_present else "0", scripts.IDLE_ROOM_MS,
             self._ttl_ms],
        )
        return decode_event(reply).event if reply is not None else None

    def list_rooms(self):
        """IBroker API"""
        return self._track(defer.ensureDeferred(self._list_rooms()))

    async def _list_rooms(self):
        names = await self._script(
            "list rooms", scripts.LIST_ROOMS,
            [self._keys.registry, self._keys.creators, self._keys.made], [])
        names = [n for n in names if messages.is_room_name(n)]
        counts = await defer.gatherResults(
            [self._command("HLEN", self._keys.members(name)) for name in names],
            consumeErrors=True,
        ).addErrback(lambda f: f.value.subFailure)
        return sorted(zip(names, (int(c) for c in counts)))

    # --- presence ----------------------------------------------------------------

    def _commands_ready(self, link, protocol):
        self._presence.connected()
        return defer.succeed(None)

    # --- the server API ---------------------------------------------------------------

    def publish(self, room, sender, text, cid=None):
        """IBroker API"""
        return self._track(defer.ensureDeferred(self._publish(room, sender, text, cid)))

    async def _publish(self, room, sender, text, cid):
        member = Member(f"{self.instance_id}:api", "", sender)  # "": no token's sub
        keys = self._keys.room_keys(room, self.instance_id)
        keys = keys[:4] + [self._keys.api_accepted(room, cid) if cid is not None else keys[0]] + keys[5:]
        reply = await self._script(
            "publish", scripts.PUBLISH, keys,
            [room, encode_envelope(messages.TALK, room, member, text, system=True),
             self._keys.channel(room), self._history_size, int(DEDUP_WINDOW * 1000),
             "1" if cid is not None else "0", str(self._max_rooms), self._max_bytes,
             scripts.IDLE_ROOM_MS, self._ttl_ms],
        )
        if reply[0] == scripts.ROOM_LIMIT_REACHED:
            raise RoomLimitReached(room)
        return Talked(decode_event(reply[1]).event, reply[0] == 1)

    def members(self, room):
        """IBroker API"""
        d = self._script(
            "members", scripts.MEMBERS, [self._keys.members(room), self._keys.registry], [room]
        )
        return d.addCallback(self._members)

    @staticmethod
    def _members(reply):
        if not reply:
            return None
        found = []
        for i in range(1, len(reply) - 1, 2):
            try:
                found.append(decode_member(reply[i], reply[i + 1]))
            except (ValueError, KeyError, TypeError):
                log.error("skipping an unreadable presence entry")
        return tuple(sorted(found, key=lambda m: m.connection_id))

    def history(self, room, since=None, limit=100):
        """IBroker API"""
        return self._track(defer.ensureDeferred(self._history(room, since, limit)))

    async def _history(self, room, since, limit):
        since_epoch, since_seq = "", "0"
        if since is not None:
            since_key = event_id_key(since)
            since_epoch = str(min(since_key[0], MAX_LUA_INTEGER))
            since_seq = str(min(since_key[1], MAX_LUA_INTEGER) if len(since_key) > 1 else 0)
        reply = await self._script(
            "history", scripts.HISTORY,
            [self._keys.meta(room), self._keys.history(room), self._keys.registry],
            [room, since_epoch, since_seq, int(limit)],
        )
        if not reply:
            return None
        epoch, dropped, kept = reply[0], reply[1], int(reply[2])
        events = tuple(decode_event(m).event for m in reply[3:])
        if since is None:
            return events, not dropped and kept <= limit
        complete = bool(epoch) and since_key[0] == int(epoch) and (
            not dropped or since_key >= (int(epoch), int(dropped))
        )
        return events, complete

    def set_control(self, handler):
        """IBroker API"""
        self._control = handler

    def disconnect(self, sub, reason=""):
        """IBroker API"""
        return self._track(defer.ensureDeferred(self._disconnect(sub, reason)))

    async def _disconnect(self, sub, reason):
        index = self._keys.user_tickets(sub)
        control = encode_control(Control(DISCONNECT, sub, reason=reason))
        for attempt in range(1, DISCONNECT_ATTEMPTS + 1):  # bounded: the last one publishes anyway
            tickets = await self._command("SMEMBERS", index)
            last = "1" if attempt == DISCONNECT_ATTEMPTS else "0"
            void = await self._script(
                "disconnect", scripts.DISCONNECT, [index] + sorted(tickets),
                [self._keys.control, control, last],
            )
            if int(void) >= 0:
                break
        if attempt == DISCONNECT_ATTEMPTS and int(await self._command("SCARD", index)) > 0:
            log.warn("disconnect of {sub}: tickets issued while it ran are still good",
                     sub=printable(sub))

    def kick(self, room, sub):
        """IBroker API"""
        d = self._command("PUBLISH", self._keys.control, encode_control(Control(KICK, sub, room=room)))
        return self._track(d.addCallback(lambda _: None))

    def _command_received(self, message):
        try:
            control = decode_control(message)
        except (ValueError, TypeError):
            log.error("dropping an undecodable control command")
            return
        if control.op == DISCONNECT:
            for heard in self._redeeming:
                heard.add(control.sub)
        if self._control is None:
            return
        try:
            self._control(control)
        except Exception:
            log.failure("carrying out {op} failed", op=printable(control.op))

    def set_own_events(self, handler):
        """IBroker API"""
        self._own_events = handler

    def _own_event(self, event, sub):
        if self._own_events is not None:
            self._own_events(event, sub)
