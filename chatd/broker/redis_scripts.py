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


def encode_envelope(kind, room, member, text, ref=None, system=False):
    """
    The part of an event chatd knows before Redis numbers it.  ASCII-only
    JSON: chat text can hold lone surrogates, which UTF-8 cannot carry.
    C{sub} lets a QUIT envelope kept in presence name its member's user
    (the server API's presence listing); clients never see it.
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
    return json.dumps(fields, ensure_ascii=True, separators=(",", ":"))


def quit_envelope(room, member, ref=None):
    """The QUIT a member's departure publishes (also kept in presence for reaping)."""
    return encode_envelope(messages.QUIT, room, member, messages.left_text(member.name), ref)


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
        system=fields.get("system") is True,
    )
    return Delivery(event, fields.get("origin"), fields.get("ref"))


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


class Keys:
    """
    The names of everything chatd keeps in one Redis database.

    Pub/sub channels are not per database in Redis, so the channel names
    carry the database number: two deployments on two databases of one
    Redis do not hear each other.
    """

    def __init__(self, db=0):
        self.db = db
        self.registry = PREFIX + "rooms"  # SET of room names (GET /rooms)
        self.instances = PREFIX + "instances"  # SET of instance ids that may hold presence
        self.channel_prefix = f"{PREFIX}{db}:events:"

    def meta(self, room):
        """HASH: epoch, seq (the last id's parts) and dropped (newest TALK seq evicted)."""
        return f"{PREFIX}room:{room}"

    def members(self, room):
        """HASH: connection id -> the QUIT envelope to publish when it goes."""
        return f"{PREFIX}room:{room}:members"

    def history(self, room):
        """STREAM of the room's TALKs, entry id 0-<seq>, capped at [history] size."""
        return f"{PREFIX}room:{room}:history"

    def accepted(self, room, sub, cid):
        """STRING: the event a (sub, cid) TALK produced, for ten minutes."""
        digest = hashlib.sha256(
            sub.encode("utf-8", "surrogatepass") + b"\0" + cid.encode("utf-8", "surrogatepass")
        ).hexdigest()
        return f"{PREFIX}room:{room}:cid:{digest}"

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
        """KEYS[1..5] of the room scripts."""
        return [
            self.meta(room),
            self.members(room),
            self.history(room),
            self.registry,
            self.instance_rooms(instance_id),
        ]


# --- the scripts ---------------------------------------------------------------------

# Shared by the room scripts.  An event travels as one string,
# "<id> <userCount> <ts> <envelope JSON>": the script fills in what only it
# knows (id, count, time) and chatd wrote the rest (type, room, sender,
# message, origin, ref; see encode_envelope), so no JSON is built in Lua.
_ROOM_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
end

-- The room's next id.  A room without an epoch (new, forgotten, or lost
-- with Redis's data) starts a new life whose epoch is the current time in
-- microseconds (16 digits: exact as a Lua number), so its ids are above
-- those of any earlier life, even one lost within the same millisecond;
-- history of an earlier life cannot be addressed with the new ids and goes.
local function stamp(meta, history)
  local epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    local t = redis.call('TIME')
    epoch = t[1] .. string.format('%06d', tonumber(t[2]))
    redis.call('DEL', history)
    redis.call('HDEL', meta, 'dropped')
    redis.call('HSET', meta, 'epoch', epoch, 'seq', '0')
  end
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  return epoch, seq, now_ms()
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

-- A TALK into the room's capped history stream; what falls out (or, with
-- no history, the TALK itself) is remembered as 'dropped' for `complete`.
local function keep(meta, history, size, seq, message)
  if size == 0 then
    redis.call('HSET', meta, 'dropped', string.format('%d', seq))
  else
    local excess = redis.call('XLEN', history) - size + 1
    if excess > 0 then
      local evicted = redis.call('XRANGE', history, '-', '+', 'COUNT', excess)
      if #evicted > 0 then
        redis.call('HSET', meta, 'dropped', string.sub(evicted[#evicted][1], 3))
      end
    end
    redis.call('XADD', history, 'MAXLEN', size, '0-' .. string.format('%d', seq), 'm', message)
  end
end

-- Like the embedded broker: a room with nobody in it, no history and
-- nothing dropped is forgotten (its id counter lingers, see IDLE_ROOM_MS).
local function forget_if_idle(meta, members, history, registry, room, idle_ms)
  if redis.call('HLEN', members) == 0 and redis.call('EXISTS', history) == 0
      and redis.call('HEXISTS', meta, 'dropped') == 0 then
    redis.call('SREM', registry, room)
    redis.call('PEXPIRE', meta, idle_ms)
  end
end
"""

ROOM_LIMIT_REACHED = "room-limit"

# KEYS: meta, members, history, registry, instance rooms
# ARGV: room, connection id, QUIT envelope, ENTER envelope, channel,
#       since epoch ('' for no replay), since seq, max rooms
# -> {ENTER event, dropped seq or '', TALK events after since...},
#    or {ROOM_LIMIT_REACHED} when the room is new and the registry is full
ENTER = _ROOM_PRELUDE + """
local room, connection = ARGV[1], ARGV[2]
if redis.call('SISMEMBER', KEYS[4], room) == 0
    and redis.call('SCARD', KEYS[4]) >= tonumber(ARGV[8]) then
  return {'""" + ROOM_LIMIT_REACHED + """'}
end
local epoch, seq, ts = stamp(KEYS[1], KEYS[3])
seat(KEYS[2], KEYS[5], room, connection, ARGV[3], true)
redis.call('SADD', KEYS[4], room)
redis.call('PERSIST', KEYS[1])
local message = event(epoch, seq, redis.call('HLEN', KEYS[2]), ts, ARGV[4])
redis.call('PUBLISH', ARGV[5], message)
local result = {message, redis.call('HGET', KEYS[1], 'dropped') or ''}
if ARGV[6] ~= '' then
  local since_epoch, after = tonumber(ARGV[6]), nil
  if since_epoch < tonumber(epoch) then
    after = 0
  elseif since_epoch == tonumber(epoch) then
    after = math.min(tonumber(ARGV[7]), seq)
  end
  if after ~= nil and after + 1 < seq then
    local entries = redis.call('XRANGE', KEYS[3], '0-' .. string.format('%d', after + 1),
                               '0-' .. string.format('%d', seq - 1))
    for _, entry in ipairs(entries) do
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'm' then
          table.insert(result, fields[i + 1])
        end
      end
    end
  end
end
return result
"""

# KEYS: meta, members, history, registry, instance rooms, accepted-cid key
# ARGV: room, connection id, QUIT envelope, TALK envelope, channel,
#       history size, cid window ms, '1' when the TALK has a cid
# -> {0, new event} or {1, the event the same (sub, cid) produced before}
TALK = _ROOM_PRELUDE + """
local room, connection = ARGV[1], ARGV[2]
if ARGV[8] == '1' then
  local seen = redis.call('GET', KEYS[6])
  if seen then
    return {1, seen}
  end
end
local epoch, seq, ts = stamp(KEYS[1], KEYS[3])
-- A talker is a member: this heals presence lost with Redis's data.
seat(KEYS[2], KEYS[5], room, connection, ARGV[3], false)
redis.call('SADD', KEYS[4], room)
redis.call('PERSIST', KEYS[1])
local message = event(epoch, seq, redis.call('HLEN', KEYS[2]), ts, ARGV[4])
keep(KEYS[1], KEYS[3], tonumber(ARGV[6]), seq, message)
redis.call('PUBLISH', ARGV[5], message)
if ARGV[8] == '1' then
  redis.call('SET', KEYS[6], message, 'PX', ARGV[7])
end
return {0, message}
"""

# KEYS: meta, members, history, registry, instance rooms
# ARGV: room, connection id, QUIT envelope, channel, '1' to do nothing
#       unless the connection is still present (a retried QUIT), idle ms
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
forget_if_idle(KEYS[1], KEYS[2], KEYS[3], KEYS[4], room, ARGV[6])
return message
"""

# The connections of a dead (or departing) instance leave one room: one
# QUIT each, emitted by whichever instance runs this first; a second run
# finds nobody left.
# KEYS: meta, members, history, registry, the instance's rooms, its heartbeat
# ARGV: room, connection id prefix ("<instance id>:"), channel, idle ms
# -> how many left (0 when the heartbeat is back: the instance lives)
REAP_ROOM = _ROOM_PRELUDE + """
local room, prefix = ARGV[1], ARGV[2]
if redis.call('EXISTS', KEYS[6]) == 1 then
  return 0
end
local members = redis.call('HGETALL', KEYS[2])
local gone = 0
for i = 1, #members, 2 do
  local connection = members[i]
  if string.sub(connection, 1, #prefix) == prefix then
    redis.call('HDEL', KEYS[2], connection)
    local epoch, seq, ts = stamp(KEYS[1], KEYS[3])
    redis.call('PUBLISH', ARGV[3],
               event(epoch, seq, redis.call('HLEN', KEYS[2]), ts, members[i + 1]))
    gone = gone + 1
  end
end
redis.call('HDEL', KEYS[5], room)
if gone > 0 then
  forget_if_idle(KEYS[1], KEYS[2], KEYS[3], KEYS[4], room, ARGV[4])
end
return gone
"""

# Put this instance's live connections back into a room's presence (after
# Redis lost its data, or after this instance was taken for dead); silent.
# KEYS: meta, members, registry, instance rooms
# ARGV: room, then connection id / QUIT envelope pairs -> how many were missing
REASSERT = _ROOM_PRELUDE + """
local room, added = ARGV[1], 0
for i = 2, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    added = added + 1
  end
end
if added > 0 then
  redis.call('HINCRBY', KEYS[4], room, added)
end
redis.call('SADD', KEYS[3], room)
redis.call('PERSIST', KEYS[1])
return added
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
#       again when there is no cid)
# ARGV: room, TALK envelope, channel, history size, cid window ms,
#       '1' when there is a cid, max rooms
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
if redis.call('SISMEMBER', KEYS[4], room) == 0
    and redis.call('SCARD', KEYS[4]) >= tonumber(ARGV[7]) then
  return {'""" + ROOM_LIMIT_REACHED + """'}
end
local epoch, seq, ts = stamp(KEYS[1], KEYS[3])
redis.call('SADD', KEYS[4], room)
redis.call('PERSIST', KEYS[1])
local message = event(epoch, seq, redis.call('HLEN', KEYS[2]), ts, ARGV[2])
keep(KEYS[1], KEYS[3], tonumber(ARGV[4]), seq, message)
redis.call('PUBLISH', ARGV[3], message)
if ARGV[6] == '1' then
  redis.call('SET', KEYS[5], message, 'PX', ARGV[5])
end
return {0, message}
"""

# KEYS: members, registry; ARGV: room
# -> false when the registry does not hold the room, else {connection, envelope, ...}
MEMBERS = """
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then
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
if redis.call('SISMEMBER', KEYS[3], ARGV[1]) == 0 then
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
# hears of the disconnect before the tickets are void.
# KEYS: the user's ticket index, then the ticket keys it listed
# ARGV: control channel, control command -> how many tickets were void
DISCONNECT = """
local void = 0
for i = 2, #KEYS do
  void = void + redis.call('DEL', KEYS[i])
  redis.call('SREM', KEYS[1], KEYS[i])
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return void
"""
