# -*- test-case-name: tests.test_tickets -*-
"""
Tickets: the short-lived, single-use secondary tokens a browser puts in the
WebSocket URL, because it cannot send an Authorization header there.

A ticket is 192 random bits.  Stores keep only its SHA-256, so a Redis dump
or a memory snapshot holds nothing a client could redeem.
"""

import binascii
import hashlib
import os

TICKET_BYTES = 24  # 192 bits; the contract asks for at least 128
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def new_ticket():
    """
    A new ticket: exactly C{secrets.token_urlsafe(TICKET_BYTES)} (the same
    C{os.urandom} bytes, base64url without padding, which 24 bytes never
    need), without its three calls through C{base64} (one per connection).
    """
    return binascii.b2a_base64(os.urandom(TICKET_BYTES), newline=False).translate(_URLSAFE).decode("ascii")


def ticket_digest(ticket):
    """The key a store files a ticket under."""
    return hashlib.sha256(ticket.encode("utf-8", "surrogatepass")).hexdigest()


class TicketBook:
    """
    In-memory tickets with an injected clock: single use, expiring after
    their TTL.  The embedded broker's ticket store.
    """

    def __init__(self, clock):
        self._clock = clock
        self._tickets = {}  # digest -> (expires_at, grant)

    def __len__(self):
        return len(self._tickets)

    def issue(self, ticket, grant, ttl):
        self._tickets[ticket_digest(ticket)] = (self._clock.seconds() + ttl, grant)

    def redeem(self, ticket):
        """
        @return: the ticket's grant, or L{None} when it is unknown, used or
            expired; either way the ticket is gone afterwards.
        """
        entry = self._tickets.pop(ticket_digest(ticket), None)
        if entry is None:
            return None
        expires_at, grant = entry
        if self._clock.seconds() >= expires_at:
            return None
        return grant

    def void(self, sub):
        """Forget every ticket issued for C{sub} (server API disconnect); returns how many."""
        void = [d for d, (_, grant) in self._tickets.items() if grant.sub == sub]
        for digest in void:
            del self._tickets[digest]
        return len(void)

    def sweep(self):
        """Forget expired tickets nobody redeemed; returns how many."""
        now = self._clock.seconds()
        expired = [d for d, (expires_at, _) in self._tickets.items() if now >= expires_at]
        for digest in expired:
            del self._tickets[digest]
        return len(expired)
