# -*- test-case-name: tests.test_broker_contract -*-
"""
The broker contract: the one seam between an instance and the state it
shares with other instances (tickets, presence, history, ordered fan-out).

Every method that may touch the network returns a L{Deferred}; a broker
that cannot do its job fails it with L{chatd.errors.BrokerUnavailable} and
never hangs (each call has a timeout).  The local fan-out to connections is
not the broker's: L{chatd.hub.Hub} owns it and subscribes to rooms here.
"""

import dataclasses
from typing import Any, Optional, Tuple

from zope.interface import Attribute, Interface

from chatd.messages import RoomEvent

# Deduplication of TALKs by (member.sub, cid), per room, in every broker:
# a cid is remembered this long, and at most this many per user and room
# (the oldest forgotten first), as its event's id and time only.
DEDUP_WINDOW = 10 * 60.0
DEDUP_MAX = 1000


@dataclasses.dataclass(frozen=True)
class Member:
    """One connection in a room, as the broker knows it."""

    connection_id: str  # unique across instances: "<instance id>:<n>"
    sub: str
    name: str


@dataclasses.dataclass(frozen=True)
class Delivery:
    """
    An event coming off a room's feed.  C{origin} is the connection id of
    the actor and C{ref} the C{ref} of the message that caused it, so that
    the actor's own copy can echo it.
    """

    event: RoomEvent
    origin: Optional[str] = None
    ref: Any = None


@dataclasses.dataclass(frozen=True)
class Entered:
    """
    What an ENTER produced: the ENTER event itself and, when C{since} was
    given, the room's TALK events with C{since < id < event.id} in order and
    whether those are all there were (C{complete}).
    """

    event: RoomEvent
    replay: Tuple[RoomEvent, ...] = ()
    complete: bool = True


@dataclasses.dataclass(frozen=True)
class Talked:
    """
    What a TALK produced.  C{duplicate} is true when the (sub, cid) pair was
    already accepted in this room: nothing was stored or published again,
    and C{event} stands for the original.  Its C{id} and C{ts} are always
    the original's; while the original is still in history, C{event} is the
    original itself, otherwise (brokers keep only the id and time of each
    cid, not the event) its text is this resend's and its count the room's
    now.
    """

    event: RoomEvent
    duplicate: bool = False


# Control commands every instance carries out (IBroker.disconnect, .kick).
DISCONNECT = "disconnect"
KICK = "kick"


@dataclasses.dataclass(frozen=True)
class Control:
    """
    A command from the server API for every instance: close all of C{sub}'s
    connections (L{DISCONNECT}, with C{reason}), or take them out of C{room}
    (L{KICK}).
    """

    op: str
    sub: str
    room: Optional[str] = None
    reason: str = ""


class IBroker(Interface):
    """Tickets, presence, history and the ordered per-room event feed."""

    instance_id = Attribute("This instance's id; connection ids start with it.")

    def set_feed(deliver, deliver_burst=None):
        """
        Name the one callable that receives a L{Delivery} for every event of
        every subscribed room, in the room's order (ids increasing).

        @param deliver_burst: takes a list of deliveries instead, in the
            same order; a broker that reads events in bursts (Redis) may hand
            a burst to it rather than each event to C{deliver}.
        """

    def subscribe(room):
        """
        Start feeding C{room}'s events.  The hub calls this when the first
        local member enters.  The Deferred fires once every event published
        afterwards is sure to reach the feed.  Calls for one room may
        interleave with L{unsubscribe}; the last call wins.
        """

    def unsubscribe(room):
        """Stop feeding C{room}; the hub calls this when the last local member left."""

    def issue_ticket(ticket, grant, ttl):
        """File C{grant} (a L{chatd.auth.Principal}) under C{ticket} for C{ttl} seconds."""

    def redeem_ticket(ticket):
        """
        Take the ticket's grant, once: fires with the L{chatd.auth.Principal},
        or L{None} for an unknown, used or expired ticket.
        """

    def enter(room, member, since=None, ref=None):
        """
        Add C{member} to the room's presence, store and publish its ENTER
        event (C{userCount} counting it), and fire with L{Entered}.

        A room is new when the registry does not hold it: never made, or
        forgotten (no members and no event for C{[history] ttl} seconds; its
        history goes with it, so a C{since} from before is incomplete).
        Making a new room fails, changing nothing, with
        L{chatd.errors.RoomLimitReached} when the registry holds
        C{[limits] max_rooms}, and with L{chatd.errors.TooManyNewRooms} when
        C{member.sub} made C{[limits] max_new_rooms_per_user} of the rooms
        the registry still holds.
        """

    def talk(room, member, text, cid=None, ref=None):
        """
        Store the TALK in the room's history and publish it, in one atomic
        step; fire with L{Talked}.  History keeps at most C{[history] size}
        TALKs and C{[history] max_bytes} of them as this broker stores them
        (at least each text's UTF-8 bytes: the embedded broker counts those,
        Redis the stored event), dropping the oldest first; a TALK that
        alone is over C{max_bytes} is published but not kept.  A (member.sub, cid) accepted in this room within
        L{DEDUP_WINDOW} (and among the user's last L{DEDUP_MAX} there) is a
        duplicate: fire with L{Talked} C{duplicate=True}, publish nothing.
        """

    def quit(room, member, ref=None):
        """Remove C{member} from presence, publish QUIT, fire with the event."""

    def list_rooms():
        """Fire with a list of C{(name, users)} for the rooms the registry knows."""

    def is_available():
        """Whether the broker can serve right now (for /healthz); synchronous."""

    # --- the server API (docs/api.md) ----------------------------------------

    def publish(room, sender, text, cid=None):
        """
        A TALK from the application's backend: stored and published like
        L{talk}, its event carrying C{system=True} and C{sender} as its
        sender.  A C{cid} already published (by the API, in this room) within
        L{DEDUP_WINDOW} is a duplicate, as for L{talk}.  A room the registry
        does not hold is made (failing with
        L{chatd.errors.RoomLimitReached} at C{[limits] max_rooms}; API rooms
        count against no user).  Fire with L{Talked}.
        """

    def members(room):
        """
        Fire with the room's members on every instance, a tuple of L{Member}
        sorted by connection id; or L{None} when the registry does not hold
        the room (nobody in it, no history).
        """

    def history(room, since=None, limit=100):
        """
        Fire with C{(events, complete)}: the kept TALK events oldest first.
        With C{since}, the first C{limit} after it, and C{complete} as for an
        ENTER's replay; without, the newest C{limit}, and C{complete} when
        nothing was dropped or left out.  L{None} when the registry does not
        hold the room.
        """

    def set_control(handler):
        """
        Name the one callable that receives every L{Control} sent by any
        instance (this one's included).
        """

    def set_own_events(handler):
        """
        Name the callable C{handler(event, sub)} that receives each event
        the broker makes happen on its own, not as the answer to a call:
        the QUITs of a dead instance's connections when this instance reaps
        them, the ENTERs of this instance's connections put back after Redis
        lost them, a QUIT recorded late.  This instance accepted those (it
        hands them to the webhook); no other instance reports them.
        """

    def disconnect(sub, reason=""):
        """
        Void the tickets issued for C{sub} and not yet redeemed, then send
        L{Control} L{DISCONNECT} to every instance.  Fires once both are done.
        """

    def kick(room, sub):
        """Send L{Control} L{KICK} for C{sub} in C{room} to every instance."""
