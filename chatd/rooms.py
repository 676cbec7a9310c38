# -*- test-case-name: tests.test_rooms -*-
"""
A room's state on one instance: presence, bounded history and the replay
rule.  Pure (the caller passes the time in), so the embedded broker is a thin
shell around it and its rules get fast tests.
"""

import collections
import itertools

from chatd import messages
from chatd.messages import RoomEvent, event_id_key

DEDUP_WINDOW = 10 * 60.0  # seconds a (sub, cid) pair is remembered


class Room:
    """
    One room.  Ids come from a counter shared by all rooms of a broker and
    are prefixed with the broker's epoch, so they increase within a room
    even when the room is forgotten and made again, and across restarts.
    """

    def __init__(self, name, epoch, counter, history_size):
        self.name = name
        self._epoch = epoch
        self._counter = counter
        self.members = {}  # connection_id -> Member
        self.history = collections.deque(maxlen=history_size or None)
        self._history_size = history_size
        self._max_dropped = None  # key of the newest TALK evicted from history
        self._by_cid = {}  # (sub, cid) -> (accepted_at, event)

    @property
    def users(self):
        return len(self.members)

    @property
    def forgettable(self):
        """Nothing worth keeping: no members, no history, nothing dropped."""
        return not self.members and not self.history and self._max_dropped is None

    def _event(self, kind, member, text, now):
        return RoomEvent(
            type=kind,
            id=f"{self._epoch}-{next(self._counter)}",
            room=self.name,
            sender=member.name,
            message=text,
            user_count=len(self.members),
            ts=int(now * 1000),
        )

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
        replay = tuple(e for e in self.history if event_id_key(e.id) > since_key)
        if since_key[0] != self._epoch:
            # An id from another life of this broker: what happened between
            # then and now is gone with that process.
            return replay, False
        if self._max_dropped is not None and since_key < self._max_dropped:
            return replay, False
        return replay, True

    def talk(self, member, text, cid, now):
        """@return: (event, duplicate)."""
        self._expire_cids(now)
        if cid is not None:
            seen = self._by_cid.get((member.sub, cid))
            if seen is not None:
                return seen[1], True
        event = self._event(messages.TALK, member, text, now)
        if self._history_size == 0:
            self._max_dropped = event_id_key(event.id)
        else:
            if len(self.history) == self.history.maxlen:
                self._max_dropped = event_id_key(self.history[0].id)
            self.history.append(event)
        if cid is not None:
            self._by_cid[(member.sub, cid)] = (now, event)
        return event, False

    def quit(self, member, now):
        self.members.pop(member.connection_id, None)
        return self._event(messages.QUIT, member, messages.left_text(member.name), now)

    def _expire_cids(self, now):
        # Insertion order is acceptance order, so the stale ones lead.
        while self._by_cid:
            key, (accepted_at, _) = next(iter(self._by_cid.items()))
            if now - accepted_at < DEDUP_WINDOW:
                break
            del self._by_cid[key]


def id_counter():
    return itertools.count(1)
