# -*- test-case-name: tests.test_rooms -*-
"""
A room's state on one instance: presence, bounded history and the replay
rule.  Pure (the caller passes the time in), so the embedded broker is a thin
shell around it and its rules get fast tests.
"""

import collections
import itertools

from chatd import messages
from chatd.broker.interfaces import DEDUP_MAX, DEDUP_WINDOW
from chatd.messages import RoomEvent, event_id_key

DEFAULT_MAX_BYTES = 1024 * 1024  # [history] max_bytes
DEFAULT_TTL = 24 * 3600.0  # [history] ttl


def text_bytes(text):
    """What a TALK costs the history's byte budget: its text, UTF-8."""
    return len(text.encode("utf-8"))


class Room:
    """
    One room.  Ids come from a counter shared by all rooms of a broker and
    are prefixed with the broker's epoch, so they increase within a room
    even when the room is forgotten and made again, and across restarts.

    History is bounded twice: at most C{history_size} TALKs and at most
    C{max_bytes} of their text, the oldest dropped first.  It keeps each
    event as a plain tuple (C{tuple(event)}, made a L{RoomEvent} again when
    read): CPython stops tracking a tuple of strings and numbers at the
    first garbage collection it survives, while every L{RoomEvent} kept
    made each full collection longer and brought the next one sooner (the
    latency tail in docs/performance.md).  Deduplication
    keeps only the id and time of each (sub, cid), for L{DEDUP_WINDOW}, at
    most L{DEDUP_MAX} per user.
    """

    def __init__(self, name, epoch, counter, history_size, max_bytes=DEFAULT_MAX_BYTES):
        self.name = name
        self._epoch = epoch
        self._counter = counter
        self.members = {}  # connection_id -> Member
        self._history = collections.deque()  # tuple(event) of each TALK kept
        self._sizes = collections.deque()  # text_bytes of each history event
        self.history_bytes = 0
        self._history_size = history_size
        self._max_bytes = max_bytes
        self._max_dropped = None  # key of the newest TALK dropped from history
        self._born = None  # key of this room's first event: older ids are another room's
        self.last_event_at = None
        self._cids = {}  # sub -> {cid: (accepted_at, event id)}, in acceptance order

    @property
    def history(self):
        """The TALK events kept, oldest first."""
        return tuple(self._kept())

    @property
    def users(self):
        return len(self.members)

    @property
    def forgettable(self):
        """Nothing worth keeping: no members, no history, nothing dropped."""
        return not self.members and not self._history and self._max_dropped is None

    def expired(self, now, ttl):
        """No members and no event for C{ttl} seconds: forget it, history and all."""
        return not self.members and self.last_event_at is not None and now - self.last_event_at >= ttl

    def _event(self, kind, member, text, now, system=False):
        event = RoomEvent(
            type=kind,
            id=f"{self._epoch}-{next(self._counter)}",
            room=self.name,
            sender=member.name,
            message=text,
            user_count=len(self.members),
            ts=int(now * 1000),
            system=system,
        )
        if self._born is None:
            self._born = event_id_key(event.id)
        self.last_event_at = now
        return event

    def enter(self, member, since, now):
        """@return: (ENTER event, replay events, complete)."""
        self.members[member.connection_id] = member
        event = self._event(messages.ENTER, member, messages.entered_text(member.name), now)
        if since is None:
            return event, (), True
        return (event,) + self.replay_since(since)

    def replay_since(self, since):
        """The TALK events after C{since} still in history, and whether that is all."""
        since_key = event_id_key(since)
        replay = tuple(e for e in self._kept() if event_id_key(e.id) > since_key)
        if since_key[0] != self._epoch:
            # An id from another life of this broker: what happened between
            # then and now is gone with that process.
            return replay, False
        if self._born is not None and since_key < self._born:
            # From before this room was made (again): an expired room's
            # history went with it.
            return replay, False
        if self._max_dropped is not None and since_key < self._max_dropped:
            return replay, False
        return replay, True

    def talk(self, member, text, cid, now, system=False):
        """
        @return: (event, duplicate).  For a duplicate the event is the
            original when history still has it; otherwise it carries the
            original's id and time with this resend's text.
        """
        if cid is not None:
            seen = self._cids_of(member.sub, now).get(cid)
            if seen is not None:
                return self._original(member, text, *seen, system=system), True
        event = self._event(messages.TALK, member, text, now, system)
        self._keep(event)
        if cid is not None:
            cids = self._cids.setdefault(member.sub, {})
            cids[cid] = (now, event.id)
            if len(cids) > DEDUP_MAX:
                del cids[next(iter(cids))]  # the oldest
        return event, False

    def _keep(self, event):
        size = text_bytes(event.message)
        if self._history_size == 0 or size > self._max_bytes:
            self._max_dropped = event_id_key(event.id)
            return
        self._history.append(tuple(event))
        self._sizes.append(size)
        self.history_bytes += size
        while len(self._history) > self._history_size or self.history_bytes > self._max_bytes:
            dropped = RoomEvent._make(self._history.popleft())
            self.history_bytes -= self._sizes.popleft()
            self._max_dropped = event_id_key(dropped.id)

    def _kept(self, newest_first=False):
        """The history as L{RoomEvent}s, oldest first (or newest first)."""
        return map(RoomEvent._make, reversed(self._history) if newest_first else self._history)

    def _original(self, member, text, accepted_at, event_id, system=False):
        key = event_id_key(event_id)
        for event in self._kept(newest_first=True):
            if event.id == event_id:
                return event
            if event_id_key(event.id) < key:
                break
        return RoomEvent(
            type=messages.TALK, id=event_id, room=self.name, sender=member.name,
            message=text, user_count=len(self.members), ts=int(accepted_at * 1000), system=system,
        )

    def history_page(self, since, limit):
        """
        Kept TALK events for the server API, oldest first, and whether they
        are complete: after C{since} the first C{limit} (as L{replay_since});
        without it the newest C{limit}, complete when nothing was ever dropped
        and nothing is left out.
        """
        if since is not None:
            events, complete = self.replay_since(since)
            return events[:limit], complete
        kept = tuple(self._kept())
        return kept[-limit:], self._max_dropped is None and len(kept) <= limit

    def quit(self, member, now):
        self.members.pop(member.connection_id, None)
        return self._event(messages.QUIT, member, messages.left_text(member.name), now)

    def _cids_of(self, sub, now):
        cids = self._cids.get(sub, {})
        # Insertion order is acceptance order, so the stale ones lead.
        while cids:
            accepted_at, _ = cids[next(iter(cids))]
            if now - accepted_at < DEDUP_WINDOW:
                break
            del cids[next(iter(cids))]
        if not cids:
            self._cids.pop(sub, None)
        return cids

    def expire_cids(self, now):
        """Forget every (sub, cid) older than L{DEDUP_WINDOW} (the broker's timer calls this)."""
        for sub in list(self._cids):
            self._cids_of(sub, now)

    @property
    def cids(self):
        """How many (sub, cid) pairs are remembered."""
        return sum(len(c) for c in self._cids.values())


def id_counter():
    return itertools.count(1)
