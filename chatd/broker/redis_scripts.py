# -*- test-case-name: tests.test_broker_redis,tests.test_redis_link -*-
"""
What the Redis broker keeps in Redis: the key layout, the Lua scripts that
change a room in one atomic step, and the codec of the events they store
and publish (the scripts and the codec are two halves of one wire format).

Every room event is made by exactly one script run: it takes the room's
next id, stores the event (TALKs in the room's capped stream), updates
presence and PUBLISHes the event, so the order of the stream, of the ids
and of the pub/sub messages is one and the same order.  Nothing here does
I/O; L{chatd.broker.redis} runs the scripts.

Why names are safe in keys: room names reach the broker only after
L{chatd.messages.is_room_name} (C{[A-Za-z0-9_.-]{1,64}}), so they contain no
C{:} and C{chatd:room:<name>} can never collide with another room's
C{chatd:room:<name>:members}.  Instance ids are hex.  Anything else a user
chooses (C{sub}, C{cid}, tickets) enters a key only as a SHA-256 digest.

Scripts touch only the keys they are given in KEYS: it keeps them honest,
though chatd targets one Redis (or a Sentinel-managed primary), not Redis
Cluster, because one room's script also updates the global registry.
"""

import dataclasses
import hashlib
import json
from typing import NamedTuple, Optional

from chatd import messages
from chatd.broker.interfaces import Control, Delivery, Member
from chatd.messages import RoomEvent, event_id_key
from chatd.tickets import ticket_digest

PREFIX = "chatd:"

# A room that has no members, no history and never dropped any keeps its
# id counter this long after it was forgotten, so a quick comeback carries
# on with the same epoch.
IDLE_ROOM_MS = 24 * 3600 * 1000


# --- the event codec --------------------------------------------------------------
# An event travels as one string, "<id> <userCount> <ts> <envelope JSON>":
# chatd writes the envelope (encode_envelope), a script prepends what only
# it knows (id, count, time; see `event` in _ROOM_PRELUDE), and every
# instance reads it back with decode_event, off pub/sub or the history.


def encode_envelope(kind, room, member, text, ref=None, system=False, **extra):
    """
    The part of an event chatd knows before Redis numbers it.  ASCII-only
    JSON: chat text can hold lone surrogates, which UTF-8 cannot carry.
    C{sub} lets a QUIT envelope kept in presence name its member's user
    (the server API's presence listing); C{extra} fields (C{reaped},
    C{call}) are for instances only.  Clients see none of these.
    """
    fields = {
        "type": kind,
        "room": room,
        "sender": member.name,
        "message": text,
        "origin": member.connection_id,
        "sub": member.sub,
        "ref": ref,
    }
    if system:
        fields["system"] = True
    fields.update(extra)
    return json.dumps(fields, ensure_ascii=True, separators=(",", ":"))


def quit_envelope(room, member, ref=None):
    """The QUIT a member's departure publishes (also kept in presence for reaping)."""
    return encode_envelope(messages.QUIT, room, member, messages.left_text(member.name), ref)


def member_envelope(room, member):
    """
    What a room's C{members} hash keeps for a connection: the QUIT to
    publish if its instance is reaped, marked C{reaped} so that the
    instance, should it be alive after all, knows the QUIT is not its own.
    """
    return encode_envelope(messages.QUIT, room, member, messages.left_text(member.name),
                           reaped=True)


def enter_envelope(room, member, ref=None):
    """The ENTER a member's arrival publishes (also when it is put back)."""
    return encode_envelope(messages.ENTER, room, member, messages.entered_text(member.name), ref)


class Published(NamedTuple):
    """An event as instances see it: the L{Delivery} and what only instances read."""

    delivery: Delivery
    reaped: bool  # a QUIT that reaping published (see member_envelope)
    call: Optional[str]  # the TALK call that made it, "<instance id>:<n>"
    sub: Optional[str] = None  # the actor's user (for the webhook)


def decode_message(message):
    """
    A published or stored event, as L{Published}.

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
        system=fields.get("system") is True,
    )
    call = fields.get("call")
    return Published(
        Delivery(event, fields.get("origin"), fields.get("ref")),
        fields.get("reaped") is True,
        call if isinstance(call, str) else None,
        fields.get("sub") if isinstance(fields.get("sub"), str) else None,
    )


def decode_event(message):
    """
    A L{Delivery} from the string a script published or stored:
    C{"<id> <userCount> <ts> <envelope JSON>"}.

    @raise ValueError: for anything else.
    """
    return decode_message(message).delivery


def decode_member(connection_id, envelope):
    """
    A L{Member} from a room's presence hash: its connection id and the QUIT
    envelope kept for it (envelopes written before C{sub} was added give
    C{""}).

    @raise ValueError: for anything else.
    """
    if isinstance(connection_id, bytes):
        connection_id = connection_id.decode("utf-8")
    if isinstance(envelope, bytes):
        envelope = envelope.decode("utf-8")
    fields = json.loads(envelope)
    return Member(connection_id, fields.get("sub", ""), fields["sender"])


def encode_control(control):
    """A L{Control} as the JSON published on the control channel."""
    return json.dumps(dataclasses.asdict(control), ensure_ascii=True, separators=(",", ":"))


def decode_control(message):
    """
    The inverse of L{encode_control}.

    @raise ValueError: for anything else.
    """
    if isinstance(message, bytes):
        message = message.decode("utf-8")
    fields = json.loads(message)
    if not isinstance(fields, dict):
        raise ValueError("not a control command")
    return Control(**fields)


# --- the key layout ------------------------------------------------------------------


def digest(text):
    """What stands for a user-chosen string (a sub, a cid) in key names and fields."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class Keys:
    """
    The names of everything chatd keeps in one Redis database.

    Pub/sub channels are not per database in Redis, so the channel names
    carry the database number: two deployments on two databases of one
    Redis do not hear each other.
    """

    def __init__(self, db=0):
        self.db = db
        self.registry = PREFIX + "rooms"  # ZSET room -> when it is forgotten (ms; +inf: has members)
        self.creators = PREFIX + "rooms:creators"  # HASH room -> sha256(sub) of who made it
        self.made = PREFIX + "rooms:made"  # HASH sha256(sub) -> how many registry rooms they made
        self.instances = PREFIX + "instances"  # SET of instance ids that may hold presence
        self.channel_prefix = f"{PREFIX}{db}:events:"

    def meta(self, room):
        """HASH: epoch, seq (the last id's parts), dropped (newest TALK seq evicted), bytes (what history holds)."""
        return f"{PREFIX}room:{room}"

    def members(self, room):
        """HASH: connection id -> the QUIT envelope to publish when it goes."""
        return f"{PREFIX}room:{room}:members"

    def history(self, room):
        """
        STREAM of the room's TALKs, entry id 0-<seq>, fields m (the event)
        and b (its length); at most [history] size entries and max_bytes
        of stored events.
        """
        return f"{PREFIX}room:{room}:history"

    def cids(self, room, sub):
        """HASH: sha256(cid) -> "<event id> <ts>" of the user's TALKs with a cid in the room."""
        return f"{PREFIX}room:{room}:cids:{digest(sub)}"

    def cid_times(self, room, sub):
        """ZSET: sha256(cid) -> when it was accepted (ms): which cids to forget first."""
        return f"{PREFIX}room:{room}:cidtimes:{digest(sub)}"

    def channel(self, room):
        return self.channel_prefix + room

    @property
    def control(self):
        """The pub/sub channel of L{Control} commands (server API disconnect, kick)."""
        return f"{PREFIX}{self.db}:control"

    def user_tickets(self, sub):
        """SET of the ticket keys issued for C{sub}, so a disconnect can void them."""
        return f"{PREFIX}tickets:{hashlib.sha256(sub.encode('utf-8', 'surrogatepass')).hexdigest()}"

    def api_accepted(self, room, cid):
        """STRING: the event a server API publish with C{cid} produced, for ten minutes."""
        digest = hashlib.sha256(b"api\0" + cid.encode("utf-8", "surrogatepass")).hexdigest()
        return f"{PREFIX}room:{room}:apicid:{digest}"

    def room_of_channel(self, channel):
        if channel.startswith(self.channel_prefix):
            return channel[len(self.channel_prefix):]
        return None

    def ticket(self, ticket):
        """STRING: the grant (Principal JSON), expiring with the ticket."""
        return f"{PREFIX}ticket:{ticket_digest(ticket)}"

    def heartbeat(self, instance_id):
        """STRING with a TTL of [redis] presence_ttl, refreshed while the instance lives."""
        return f"{PREFIX}instance:{instance_id}"

    def instance_rooms(self, instance_id):
        """HASH: room -> how many of the instance's connections are in it."""
        return f"{PREFIX}instance:{instance_id}:rooms"

    def room_keys(self, room, instance_id):
        """KEYS[1..7] of the room scripts."""
        return [
            self.meta(room),
            self.members(room),
            self.history(room),
            self.registry,
            self.instance_rooms(instance_id),
            self.creators,
            self.made,
        ]


# --- the scripts ---------------------------------------------------------------------

# Shared by the room scripts.  An event travels as one string,
# "<id> <userCount> <ts> <envelope JSON>": the script fills in what only it
# knows (id, count, time) and chatd wrote the rest (type, room, sender,
# message, origin, ref; see encode_envelope), so no JSON is built in Lua.
_ROOM_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The room's next id.  A room without an epoch (new, forgotten, expired,
-- or lost with Redis's data) starts a new life whose epoch is the current
-- time in microseconds (16 digits: exact as a Lua number), so its ids are
-- above those of any earlier life, even one lost within the same
-- millisecond; history of an earlier life cannot be addressed with the new
-- ids and goes.
local function stamp(meta, history)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    local t = redis.call('TIME')
    epoch = t[1] .. string.format('%06d', tonumber(t[2]))
    redis.call('DEL', history)
    redis.call('HDEL', meta, 'dropped', 'bytes')
    redis.call('HSET', meta, 'epoch', epoch, 'seq', '0')
  end
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  return epoch, seq, string.format('%d', now_ms())
end

local function event(epoch, seq, count, ts, envelope)
  return epoch .. '-' .. string.format('%d', seq) .. ' ' .. string.format('%d', count)
    .. ' ' .. ts .. ' ' .. envelope
end

local function seat(members, instance_rooms, room, connection, envelope, overwrite)
  local added
  if overwrite then
    added = redis.call('HSET', members, connection, envelope)
  else
    added = redis.call('HSETNX', members, connection, envelope)
  end
  if added == 1 then
    redis.call('HINCRBY', instance_rooms, room, 1)
  end
  return added == 1
end

local function unseat(members, instance_rooms, room, connection)
  if redis.call('HDEL', members, connection) == 0 then
    return false
  end
  if redis.call('HINCRBY', instance_rooms, room, -1) <= 0 then
    redis.call('HDEL', instance_rooms, room)
  end
  return true
end

-- The registry: a room's score is +inf while it has members, else when it
-- is forgotten.  Who made each room is kept so that one user cannot hold
-- more than [limits] max_new_rooms_per_user of them.
local function unregister(registry, creators, made, room)
  redis.call('ZREM', registry, room)
  local creator = redis.call('HGET', creators, room)
  if creator then
    redis.call('HDEL', creators, room)
    if redis.call('HINCRBY', made, creator, -1) <= 0 then
      redis.call('HDEL', made, creator)
    end
  end
end

-- Rooms whose time is up leave the registry (their keys expired with
-- them); a bounded number per call, the rest are not counted anyway.
local function expire_rooms(registry, creators, made, now)
  local gone = redis.call('ZRANGEBYSCORE', registry, '-inf', now, 'LIMIT', 0, 100)
  for _, room in ipairs(gone) do
    unregister(registry, creators, made, room)
  end
end

-- Keep a TALK in history: at most size entries and max_bytes of what the
-- stream stores, the events themselves (each entry's length in its field
-- b, their sum in meta's bytes; escaped ASCII JSON, so a CJK character
-- costs 6 bytes, not its 3 of UTF-8), the oldest evicted first and
-- recorded as dropped; an event over max_bytes is not kept at all.  One
-- eviction per round, each entry evicted once: O(1) per TALK on average,
-- at most [history] size in one call.  (Entries written before b counted
-- the stored event held their text's UTF-8 length: each frees what it
-- added.)
local function keep(meta, history, size, max_bytes, seq, message)
  local bytes = #message
  if size == 0 or bytes > max_bytes then
    redis.call('HSET', meta, 'dropped', string.format('%d', seq))
    return
  end
  redis.call('XADD', history, '0-' .. string.format('%d', seq), 'm', message, 'b', bytes)
  local count = redis.call('XLEN', history)
  local total = redis.call('HINCRBY', meta, 'bytes', bytes)
  while count > size or total > max_bytes do
    local oldest = redis.call('XRANGE', history, '-', '+', 'COUNT', 1)
    if #oldest == 0 then
      redis.call('HSET', meta, 'bytes', 0)
      return
    end
    local fields, freed = oldest[1][2], 0
    for i = 1, #fields, 2 do
      if fields[i] == 'b' then
        freed = tonumber(fields[i + 1])
      end
    end
    redis.call('XDEL', history, oldest[1][1])
    redis.call('HSET', meta, 'dropped', string.sub(oldest[1][1], 3))
    total = redis.call('HINCRBY', meta, 'bytes', -freed)
    count = count - 1
  end
end

local function occupied(meta, history, registry, room)
  redis.call('ZADD', registry, 'inf', room)
  redis.call('PERSIST', meta)
  redis.call('PERSIST', history)
end

-- The room has nobody left.  With no history and nothing dropped it is
-- forgotten now (its id counter lingers idle_ms, see IDLE_ROOM_MS);
-- otherwise it goes, history and all, ttl_ms after this, its last event.
local function emptied(meta, members, history, registry, creators, made, room, idle_ms, ttl_ms)
  if redis.call('HLEN', members) > 0 then
    return
  end
  if redis.call('EXISTS', history) == 0 and redis.call('HEXISTS', meta, 'dropped') == 0 then
    unregister(registry, creators, made, room)
    redis.call('PEXPIRE', meta, idle_ms)
  else
    redis.call('ZADD', registry, now_ms() + tonumber(ttl_ms), room)
    redis.call('PEXPIRE', meta, ttl_ms)
    redis.call('PEXPIRE', history, ttl_ms)
  end
end

-- A TALK (a user's or the server API's) made an event: numbered, kept in
-- history, and the room's lifetime follows whether anyone is in it (an
-- empty room is registered, to be forgotten ttl_ms from now).
-- K: the room scripts' KEYS (meta, members, history, registry, _, creators, made)
local function talk(K, room, envelope, size, max_bytes, ttl_ms)
  local epoch, seq, ts = stamp(K[1], K[3])
  local message = event(epoch, seq, redis.call('HLEN', K[2]), ts, envelope)
  keep(K[1], K[3], tonumber(size), tonumber(max_bytes), seq, message)
  if redis.call('HLEN', K[2]) > 0 then
    occupied(K[1], K[3], K[4], room)
  else
    redis.call('ZADD', K[4], 'NX', 0, room)
    emptied(K[1], K[2], K[3], K[4], K[6], K[7], room, ttl_ms, ttl_ms)
  end
  return message, epoch, seq, ts
end
"""

ROOM_LIMIT_REACHED = "room-limit"
TOO_MANY_NEW_ROOMS = "user-room-limit"

# One XRANGE of the replay returns at most this many bytes (about): Redis
# serves every client in turn, so no single call may hold it for long.
HISTORY_PAGE_BYTES = 1024 * 1024


def history_page_entries(max_talk_chars):
    """How many history entries fit in a page: the worst case is every character escaped (\\uXXXX x 2)."""
    return max(1, HISTORY_PAGE_BYTES // (max_talk_chars * 12 + 1024))

# The replay is not read here: a script blocks Redis for every client while
# it runs, and a full history is megabytes.  The broker reads it after the
# ENTER, in pages (HISTORY_PAGE_BYTES), and the ENTER's id bounds it.
# KEYS: meta, members, history, registry, instance rooms, creators, made
# ARGV: room, connection id, member envelope, ENTER envelope, channel,
#       max rooms, sha256(sub), max new rooms per user
# -> {ENTER event}, or {ROOM_LIMIT_REACHED} / {TOO_MANY_NEW_ROOMS} when the
#    room is new and the registry, or this user's share of it, is full
ENTER = _ROOM_PRELUDE + """
local room, connection = ARGV[1], ARGV[2]
local now = now_ms()
expire_rooms(KEYS[4], KEYS[6], KEYS[7], now)
if not redis.call('ZSCORE', KEYS[4], room) then
  if redis.call('ZCARD', KEYS[4]) - redis.call('ZCOUNT', KEYS[4], '-inf', now)
      >= tonumber(ARGV[6]) then
    return {'""" + ROOM_LIMIT_REACHED + """'}
  end
  if tonumber(redis.call('HGET', KEYS[7], ARGV[7]) or '0') >= tonumber(ARGV[8]) then
    return {'""" + TOO_MANY_NEW_ROOMS + """'}
  end
  redis.call('HSET', KEYS[6], room, ARGV[7])
  redis.call('HINCRBY', KEYS[7], ARGV[7], 1)
end
local epoch, seq, ts = stamp(KEYS[1], KEYS[3])
seat(KEYS[2], KEYS[5], room, connection, ARGV[3], true)
occupied(KEYS[1], KEYS[3], KEYS[4], room)
local message = event(epoch, seq, redis.call('HLEN', KEYS[2]), ts, ARGV[4])
redis.call('PUBLISH', ARGV[5], message)
return {message}
"""

# KEYS: meta, members, history, registry, instance rooms, creators, made,
#       the user's cids, the user's cid times (the room's for both)
# ARGV: room, connection id, TALK envelope, channel, history size,
#       history max bytes, sha256(cid) or '' for none, cid window ms,
#       cids kept per user, room ttl ms
# -> {0, new event, 1 if the talker is in presence else 0},
#    {1, the original event} for a (sub, cid) seen before, or
#    {2, original id, original ts, userCount} when history no longer has it
TALK = _ROOM_PRELUDE + """
local room, connection, cid = ARGV[1], ARGV[2], ARGV[7]
local now = now_ms()
if cid ~= '' then
  local stale = redis.call('ZRANGEBYSCORE', KEYS[9], '-inf', now - tonumber(ARGV[8]), 'LIMIT', 0, 100)
  if #stale > 0 then
    redis.call('HDEL', KEYS[8], unpack(stale))
    redis.call('ZREM', KEYS[9], unpack(stale))
  end
  local seen = redis.call('HGET', KEYS[8], cid)
  if seen then
    local id, ts = string.match(seen, '^(%S+) (%S+)$')
    local epoch, seq = string.match(id, '^(%d+)-(%d+)$')
    if redis.call('HGET', KEYS[1], 'epoch') == epoch then
      local entry = redis.call('XRANGE', KEYS[3], '0-' .. seq, '0-' .. seq)
      if #entry == 1 then
        local fields = entry[1][2]
        for i = 1, #fields, 2 do
          if fields[i] == 'm' then
            return {1, fields[i + 1]}
          end
        end
      end
    end
    return {2, id, ts, redis.call('HLEN', KEYS[2])}
  end
end
-- A talker missing from presence (Redis lost it, or a reap took it) is
-- not put back here but by its instance, with an ENTER (see REASSERT).
local present = redis.call('HEXISTS', KEYS[2], connection)
local message, epoch, seq, ts = talk(KEYS, room, ARGV[3], ARGV[5], ARGV[6], ARGV[10])
redis.call('PUBLISH', ARGV[4], message)
if cid ~= '' then
  redis.call('HSET', KEYS[8], cid, epoch .. '-' .. string.format('%d', seq) .. ' ' .. ts)
  -- Scores strictly increase, so the oldest is first even within one ms.
  local newest = redis.call('ZREVRANGE', KEYS[9], 0, 0, 'WITHSCORES')
  local score = now
  if #newest == 2 and tonumber(newest[2]) >= now then
    score = tonumber(newest[2]) + 1
  end
  redis.call('ZADD', KEYS[9], score, cid)
  local excess = redis.call('ZCARD', KEYS[9]) - tonumber(ARGV[9])
  if excess > 0 then
    local oldest = redis.call('ZRANGE', KEYS[9], 0, excess - 1)
    redis.call('HDEL', KEYS[8], unpack(oldest))
    redis.call('ZREMRANGEBYRANK', KEYS[9], 0, excess - 1)
  end
  redis.call('PEXPIRE', KEYS[8], ARGV[8])
  redis.call('PEXPIRE', KEYS[9], ARGV[8])
end
return {0, message, present}
"""

# KEYS: meta, members, history, registry, instance rooms, creators, made
# ARGV: room, connection id, QUIT envelope, channel, '1' to do nothing
#       unless the connection is still present (a retried QUIT), idle ms,
#       room ttl ms
# -> the QUIT event, or nil when nothing was done
QUIT = _ROOM_PRELUDE + """
local room, connection = ARGV[1], ARGV[2]
local removed = unseat(KEYS[2], KEYS[5], room, connection)
if not removed and ARGV[5] == '1' then
  return false
end
local epoch, seq, ts = stamp(KEYS[1], KEYS[3])
local message = event(epoch, seq, redis.call('HLEN', KEYS[2]), ts, ARGV[3])
redis.call('PUBLISH', ARGV[4], message)
emptied(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7], room, ARGV[6], ARGV[7])
return message
"""

# The connections of a dead (or departing) instance leave one room: one
# QUIT each, emitted by whichever instance runs this first; a second run
# finds nobody left.
# KEYS: meta, members, history, registry, the instance's rooms, creators,
#       made, its heartbeat
# ARGV: room, connection id prefix ("<instance id>:"), channel, idle ms, room ttl ms
# -> the QUIT events published (none when the heartbeat is back: the instance lives)
REAP_ROOM = _ROOM_PRELUDE + """
local room, prefix = ARGV[1], ARGV[2]
if redis.call('EXISTS', KEYS[8]) == 1 then
  return {}
end
local members = redis.call('HGETALL', KEYS[2])
local published = {}
for i = 1, #members, 2 do
  local connection = members[i]
  if string.sub(connection, 1, #prefix) == prefix then
    redis.call('HDEL', KEYS[2], connection)
    local epoch, seq, ts = stamp(KEYS[1], KEYS[3])
    local message = event(epoch, seq, redis.call('HLEN', KEYS[2]), ts, members[i + 1])
    redis.call('PUBLISH', ARGV[3], message)
    table.insert(published, message)
  end
end
redis.call('HDEL', KEYS[5], room)
if #published > 0 then
  emptied(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6], KEYS[7], room, ARGV[4], ARGV[5])
end
return published
"""

# Put this instance's live connections back into a room's presence (after
# Redis lost its data, or after this instance was taken for dead and
# reaped): each one that was missing gets an ENTER event, so that every
# member hears of it with the right count (docs/delivery.md, "stalls").
# KEYS: meta, members, history, registry, instance rooms, creators, made
# ARGV: room, channel, then (connection id, member envelope, ENTER envelope)
#       triples -> the ENTER events of those that were missing
REASSERT = _ROOM_PRELUDE + """
local room, published = ARGV[1], {}
for i = 3, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    local epoch, seq, ts = stamp(KEYS[1], KEYS[3])
    local message = event(epoch, seq, redis.call('HLEN', KEYS[2]), ts, ARGV[i + 2])
    redis.call('PUBLISH', ARGV[2], message)
    table.insert(published, message)
  end
end
if #published > 0 then
  redis.call('HINCRBY', KEYS[5], room, #published)
end
occupied(KEYS[1], KEYS[3], KEYS[4], room)
return published
"""

# KEYS: registry, creators, made -> the names of the rooms it holds
LIST_ROOMS = _ROOM_PRELUDE + """
local now = now_ms()
expire_rooms(KEYS[1], KEYS[2], KEYS[3], now)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%d', now), 'inf')
"""

# KEYS: heartbeat, instances; ARGV: instance id, ttl ms
# -> 1 if the heartbeat was still there, 0 if it had expired or was lost
HEARTBEAT = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return existed
"""

# KEYS: heartbeat, instance rooms, instances; ARGV: instance id -> 1 if forgotten
FORGET_INSTANCE = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HLEN', KEYS[2]) > 0 then
  return 0
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""

# KEYS: ticket -> the grant, once
REDEEM_TICKET = """
local grant = redis.call('GET', KEYS[1])
if grant then
  redis.call('DEL', KEYS[1])
end
return grant
"""


# --- the server API -------------------------------------------------------------------

# A TALK from the application's backend: like TALK, but nobody is seated,
# and a room the registry does not hold is made only below max rooms.
# KEYS: meta, members, history, registry, accepted-cid key (the meta key
#       again when there is no cid), creators, made
# ARGV: room, TALK envelope, channel, history size, cid window ms,
#       '1' when there is a cid, max rooms, history max bytes, idle ms,
#       room ttl ms
# -> {0, new event}, {1, the event the cid produced before},
#    or {ROOM_LIMIT_REACHED}
PUBLISH = _ROOM_PRELUDE + """
local room = ARGV[1]
if ARGV[6] == '1' then
  local seen = redis.call('GET', KEYS[5])
  if seen then
    return {1, seen}
  end
end
local now = now_ms()
expire_rooms(KEYS[4], KEYS[6], KEYS[7], now)
if not redis.call('ZSCORE', KEYS[4], room)
    and redis.call('ZCARD', KEYS[4]) - redis.call('ZCOUNT', KEYS[4], '-inf', now)
      >= tonumber(ARGV[7]) then
  return {'""" + ROOM_LIMIT_REACHED + """'}
end
local message = talk(KEYS, room, ARGV[2], ARGV[4], ARGV[8], ARGV[10])
redis.call('PUBLISH', ARGV[3], message)
if ARGV[6] == '1' then
  redis.call('SET', KEYS[5], message, 'PX', ARGV[5])
end
return {0, message}
"""

# KEYS: members, registry; ARGV: room
# -> false when the registry does not hold the room, else {connection, envelope, ...}
MEMBERS = """
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return false
end
local found = redis.call('HGETALL', KEYS[1])
table.insert(found, 1, 'room')
return found
"""

# KEYS: meta, history, registry
# ARGV: room, since epoch ('' for the newest), since seq, limit
# -> false when the registry does not hold the room, else
#    {epoch or '', dropped seq or '', kept count, events oldest first...}
HISTORY = """
if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  return false
end
local epoch = redis.call('HGET', KEYS[1], 'epoch') or ''
local result = {epoch, redis.call('HGET', KEYS[1], 'dropped') or '', redis.call('XLEN', KEYS[2])}
local limit = tonumber(ARGV[4])
local entries = {}
if ARGV[2] == '' then
  local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', limit)
  for i = #newest, 1, -1 do
    table.insert(entries, newest[i])
  end
elseif epoch ~= '' then
  local since_epoch, after = tonumber(ARGV[2]), nil
  if since_epoch < tonumber(epoch) then
    after = 0
  elseif since_epoch == tonumber(epoch) then
    after = tonumber(ARGV[3])
  end
  if after ~= nil then
    entries = redis.call('XRANGE', KEYS[2], '0-' .. string.format('%d', after + 1), '+', 'COUNT', limit)
  end
end
for _, entry in ipairs(entries) do
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'm' then
      table.insert(result, fields[i + 1])
    end
  end
end
return result
"""

# KEYS: ticket, the user's ticket index; ARGV: grant, ttl ms
ISSUE_TICKET = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], KEYS[1])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
"""

# Void a user's tickets, then tell every instance: one step, so no instance
# hears of the disconnect before the tickets are void.  Every ticket listed
# leaves the index, redeemed ones too: a ticket still in the index was
# issued after the last disconnect (see RedisBroker._redeem).  A ticket
# issued after the caller listed the index is still in it: then nothing is
# published, and the caller lists again (unless ARGV[3] is '1').
# KEYS: the user's ticket index, then the ticket keys it listed
# ARGV: control channel, control command, '1' to publish even so
# -> how many tickets were void, or -1 when the index must be listed again
DISCONNECT = """
local void = 0
for i = 2, #KEYS do
  void = void + redis.call('DEL', KEYS[i])
  redis.call('SREM', KEYS[1], KEYS[i])
end
if ARGV[3] ~= '1' and redis.call('SCARD', KEYS[1]) > 0 then
  return -1
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return void
"""
