# -*- test-case-name: tests.test_broker_redis,tests.test_scaleout -*-
"""
Instance presence in Redis: which connections of this instance are in which
room, kept true over time by a timer.

A connection is in a room's C{members} hash in Redis; an instance that
dies cannot take its connections out, so every instance keeps a heartbeat
key with a TTL and sweeps for instances whose heartbeat ran out, reaping
their connections with one QUIT each (docs/delivery.md, "the presence
bound").  A QUIT that failed (Redis unavailable) may or may not have
happened: it is retried here until Redis answers, so a room never counts a
ghost.  None of this is on the path of a user's call; it is a timer
service of its own so that the broker's calls and the link stay simple.
"""

import re

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.logger import Logger

from chatd import messages
from chatd.broker import redis_scripts as scripts
from chatd.errors import BrokerUnavailable
from chatd.logs import printable

log = Logger()

_INSTANCE_ID = re.compile(r"[0-9a-f]{1,64}\Z")


class Presence(TimerService):
    """
    The heartbeat, the retried QUITs and the sweep for dead instances, every
    C{presence_ttl / 3} seconds, and this instance's local view of who is
    where (C{local}), which is what the heartbeat puts back when Redis lost
    it.
    """

    def __init__(self, clock, commands, keys, instance_id, presence_ttl, room_ttl_ms, quit, on_event=None):
        """
        @param commands: the L{chatd.broker.redis_link.RedisLink} for commands.
        @param keys: the L{chatd.broker.redis_scripts.Keys}.
        @param room_ttl_ms: [history] ttl, for rooms a reap leaves empty.
        @param quit: C{quit(room, member)} runs the QUIT script only if the
            member is still present, firing with the event or L{None}.
        @param on_event: C{on_event(event, sub)} for each event this timer
            made happen (reaped QUITs, ENTERs put back, late QUITs): this
            instance accepted them (for the webhook).
        """
        TimerService.__init__(self, presence_ttl / 3.0, self.tick)
        self.clock = clock
        self._commands = commands
        self._keys = keys
        self._instance_id = instance_id
        self._presence_ttl = presence_ttl
        self._room_ttl_ms = room_ttl_ms
        self._quit = quit
        self._on_event = on_event
        self.local = {}  # room -> {connection id: Member}: what this instance has in presence
        self._unsure = {}  # (room, connection id) -> Member: QUITs to (re)try, only if present
        self._reassert = set()  # rooms whose local members must be put back (they were reaped)
        self._judge_after = None  # no sweeping before this time (see _heartbeat)
        self._ticking = False
        self._stopping = False

    # --- what the broker reports ---------------------------------------------

    def seated(self, room, member):
        """C{member} is entering C{room} (before the script runs: it may be reasserted)."""
        self.local.setdefault(room, {})[member.connection_id] = member
        self._unsure.pop((room, member.connection_id), None)

    def left(self, room, member):
        """C{member} left C{room}, or never got in."""
        members = self.local.get(room)
        if members is not None:
            members.pop(member.connection_id, None)
            if not members:
                del self.local[room]

    def unsure(self, room, member):
        """
        C{member} left C{room} here, but Redis may not know: its QUIT (or
        an ENTER that was undone) failed.  Retried until Redis answers.
        """
        self.left(room, member)
        self._unsure[(room, member.connection_id)] = member

    @property
    def stopping(self):
        """Whether this instance is stopping (its goodbye reaps its own connections)."""
        return self._stopping

    def is_local(self, room, connection_id):
        """Whether C{connection_id} is in C{room} as far as this instance is concerned."""
        return connection_id in self.local.get(room, ())

    def reassert_soon(self, room):
        """
        Put this instance's members of C{room} back into Redis now (and on
        every tick until it succeeds), each missing one with an ENTER; not
        while stopping: the goodbye took them out on purpose.
        """
        if self._stopping:
            return
        self._reassert.add(room)
        d = defer.ensureDeferred(self._reassert_pending())
        d.addErrback(lambda f: f.trap(BrokerUnavailable))
        d.addErrback(lambda f: log.failure("putting members back failed", f))

    async def _reassert_pending(self):
        for room in sorted(self._reassert):
            if room in self._reassert:
                self._reassert.discard(room)
                try:
                    await self._reassert_room(room)
                except BaseException:
                    self._reassert.add(room)
                    raise

    def connected(self):
        """The command link is usable: register this instance at once, not a period later."""
        self.clock.callLater(0, self.tick)

    # --- the timer -------------------------------------------------------------

    def startService(self):
        """Service API"""
        self._stopping = False
        TimerService.startService(self)

    def stopService(self):
        """Service API: no new tick starts; fires when the one running is done."""
        self._stopping = True
        return TimerService.stopService(self)

    def tick(self):
        """One round of upkeep: heartbeat, retried QUITs, the dead-instance sweep."""
        if self._ticking or self._stopping:
            return defer.succeed(None)
        self._ticking = True
        d = defer.ensureDeferred(self._upkeep())
        d.addErrback(lambda f: log.failure("presence upkeep failed", f))

        def done(_):
            self._ticking = False

        return d.addBoth(done)

    async def _upkeep(self):
        if self._commands.protocol is None or self._stopping:
            return
        try:
            await self._heartbeat()
            await self._reassert_pending()
            await self._retry_unsure()
            await self._sweep()
        except BrokerUnavailable:
            pass  # logged by the link; next time

    def _script(self, name, source, keys, args):
        return self._commands.call(name, lambda p: p.eval(source, keys, args))

    async def _heartbeat(self):
        existed = await self._script(
            "heartbeat", scripts.HEARTBEAT,
            [self._keys.heartbeat(self._instance_id), self._keys.instances],
            [self._instance_id, int(self._presence_ttl * 1000)],
        )
        if existed == 1:
            return
        # New, or our heartbeat ran out (Redis lost its data, or was out of
        # reach for longer than the TTL).  Then every instance's heartbeat
        # may have run out with ours: judge nobody dead until they all had
        # a full TTL to come back, or live users would be reaped.
        self._judge_after = self.clock.seconds() + self._presence_ttl
        self._reassert.update(self.local)

    async def _reassert_room(self, room):
        members = self.local.get(room)
        if not members:
            return
        args = [room, self._keys.channel(room)]
        for connection_id, member in list(members.items()):
            args += [connection_id, scripts.member_envelope(room, member),
                     scripts.enter_envelope(room, member)]
        published = await self._script(
            "reassert", scripts.REASSERT,
            self._keys.room_keys(room, self._instance_id), args,
        )
        self._made(published)
        if published:
            log.info("put {count} connections back into {room}", count=len(published), room=printable(room))

    async def _retry_unsure(self):
        for (room, connection_id), member in list(self._unsure.items()):
            if connection_id in self.local.get(room, {}):
                del self._unsure[(room, connection_id)]  # entered again meanwhile
                continue
            event = await self._quit(room, member)
            self._unsure.pop((room, connection_id), None)
            if event is not None:
                self._report(event, member.sub)
                log.info("recorded the late QUIT of {user} from {room}",
                         user=printable(member.name), room=printable(room))

    async def _sweep(self):
        if self._judge_after is None or self.clock.seconds() < self._judge_after:
            return
        others = [i for i in await self._commands.command("SMEMBERS", self._keys.instances)
                  if i != self._instance_id and _INSTANCE_ID.match(i)]
        if not others:
            return
        beats = await self._commands.command("MGET", *[self._keys.heartbeat(i) for i in others])
        for instance_id, beat in zip(others, beats):
            if beat is None:
                gone = await self._reap(instance_id)
                log.info(
                    "instance {instance} stopped sending heartbeats: {count} of its connections left",
                    instance=instance_id, count=gone,
                )

    async def goodbye(self):
        """
        This instance stops: drop the heartbeat and take every connection
        it still has in presence out of its rooms, with their QUITs.

        @return: how many connections left.
        @raise BrokerUnavailable: when Redis cannot be reached.
        """
        await self._commands.command("DEL", self._keys.heartbeat(self._instance_id))
        return await self._reap(self._instance_id)

    async def _reap(self, instance_id):
        """Every connection of C{instance_id} leaves every room, once, with a QUIT."""
        heartbeat = self._keys.heartbeat(instance_id)
        rooms = await self._commands.command("HKEYS", self._keys.instance_rooms(instance_id))
        gone = 0
        for room in rooms:
            if not messages.is_room_name(room):
                continue
            keys = self._keys.room_keys(room, instance_id) + [heartbeat]
            published = await self._script(
                "reap", scripts.REAP_ROOM, keys,
                [room, instance_id + ":", self._keys.channel(room), scripts.IDLE_ROOM_MS,
                 self._room_ttl_ms],
            )
            self._made(published)
            gone += len(published or ())
        await self._script(
            "forget instance", scripts.FORGET_INSTANCE,
            [heartbeat, self._keys.instance_rooms(instance_id), self._keys.instances],
            [instance_id],
        )
        return gone

    def _made(self, published_messages):
        """Report the events a script published for this timer."""
        for message in published_messages or ():
            try:
                published = scripts.decode_message(message)
            except (ValueError, KeyError, TypeError):
                continue
            self._report(published.delivery.event, published.sub or "")

    def _report(self, event, sub):
        if self._on_event is None:
            return
        try:
            self._on_event(event, sub)
        except Exception:
            log.failure("reporting {type} in {room} failed", type=event.type, room=printable(event.room))
