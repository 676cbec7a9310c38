# -*- test-case-name: tests.test_tickets -*-
"""
chatd.tickets: single use, expiry exactly at the TTL, sweeping, and tickets
that are unguessable and never stored in the clear.
"""

import base64
import os
import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from chatd import tickets
from chatd.tickets import TicketBook, new_ticket, ticket_digest

GRANT = object()


def book_at(seconds=1000.0):
    clock = Clock()
    clock.advance(seconds)
    return clock, TicketBook(clock)


def test_redeem_once():
    """A ticket gives its grant once; the second redemption gets None."""
    _, book = book_at()
    book.issue("T1", GRANT, 30)
    assert book.redeem("T1") is GRANT
    assert book.redeem("T1") is None
    assert len(book) == 0


def test_unknown_ticket():
    """A ticket never issued gets None and changes nothing."""
    _, book = book_at()
    book.issue("T1", GRANT, 30)
    assert book.redeem("T2") is None
    assert len(book) == 1


def test_valid_until_just_before_ttl():
    """A ticket still works an instant before its TTL runs out."""
    clock, book = book_at()
    book.issue("T1", GRANT, 30)
    clock.advance(29.999)
    assert book.redeem("T1") is GRANT


def test_expires_at_exactly_ttl():
    """At exactly TTL seconds the ticket is expired, and the attempt uses it up."""
    clock, book = book_at()
    book.issue("T1", GRANT, 30)
    clock.advance(30)
    assert book.redeem("T1") is None
    assert len(book) == 0


def test_sweep_forgets_only_expired():
    """sweep() drops expired tickets, counts them, and keeps live ones redeemable."""
    clock, book = book_at()
    book.issue("old", GRANT, 10)
    book.issue("edge", GRANT, 20)
    book.issue("new", GRANT, 60)
    clock.advance(20)
    assert book.sweep() == 2
    assert len(book) == 1
    assert book.redeem("new") is GRANT
    assert book.sweep() == 0


def test_each_ticket_has_its_own_ttl():
    """Tickets issued later expire later."""
    clock, book = book_at()
    book.issue("a", "A", 30)
    clock.advance(20)
    book.issue("b", "B", 30)
    clock.advance(15)
    assert (book.redeem("a"), book.redeem("b")) == (None, "B")


def test_new_ticket_entropy():
    """A ticket is URL-safe text carrying at least 128 random bits."""
    ticket = new_ticket()
    raw = base64.urlsafe_b64decode(ticket + "=" * (-len(ticket) % 4))
    assert len(raw) * 8 >= 128
    assert set(ticket) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@settings(max_examples=300)
@given(random=st.binary(min_size=tickets.TICKET_BYTES, max_size=tickets.TICKET_BYTES))
def test_new_ticket_is_secrets_token_urlsafe(random):
    """
    new_ticket is secrets.token_urlsafe(TICKET_BYTES) (CPython's: the
    base64url text of TICKET_BYTES bytes of os.urandom, its padding
    stripped): those bytes asked of os.urandom, once, and that text made of
    them.
    """
    asked = []

    def urandom(size):
        asked.append(size)
        return random

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "urandom", urandom)
        ticket = new_ticket()
    assert asked == [tickets.TICKET_BYTES]
    assert ticket == base64.urlsafe_b64encode(random).rstrip(b"=").decode("ascii")
    assert len(secrets.token_urlsafe(tickets.TICKET_BYTES)) == len(ticket)


def test_new_tickets_are_unique():
    """Ten thousand tickets are all different."""
    tickets = {new_ticket() for _ in range(10000)}
    assert len(tickets) == 10000


def test_digest_is_not_the_ticket():
    """The store's key is a SHA-256 hex digest, not the ticket, and is stable."""
    ticket = new_ticket()
    digest = ticket_digest(ticket)
    assert digest != ticket and ticket not in digest
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert ticket_digest(ticket) == digest and ticket_digest(new_ticket()) != digest


def test_book_keeps_no_ticket_in_clear():
    """Nothing the book holds contains the ticket itself."""
    _, book = book_at()
    ticket = new_ticket()
    book.issue(ticket, "grant", 30)
    assert ticket not in repr(vars(book))


def test_digest_of_odd_text():
    """Any query-string text, lone surrogates included, digests without error."""
    assert len(ticket_digest("\ud800x")) == 64
    assert ticket_digest("") != ticket_digest(" ")
