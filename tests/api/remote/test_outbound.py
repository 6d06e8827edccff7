"""The outbound books, with no socket: a reply's bytes stay charged until its tracker says
ZeroMQ is done with it, small replies ride with the next tracked one, and a connection
over its unsent limit has its requests deferred until its replies leave."""

from __future__ import annotations

from dataclasses import dataclass

from pyvirtiofs.api.remote.outbound import TRACK_BYTES, UNTRACKED_BYTES, Outbound

A, B = b"conn-a", b"conn-b"
TENANT = "tenant"


@dataclass
class FakeTracker:
    done: bool = False


def test_a_big_reply_is_tracked_a_small_one_is_not() -> None:
    out: Outbound[str] = Outbound()
    assert out.must_track(A, TRACK_BYTES)
    assert not out.must_track(A, TRACK_BYTES - 1)


def test_bytes_stay_charged_until_the_tracker_is_done() -> None:
    out: Outbound[str] = Outbound(copies=2)
    first, second = FakeTracker(), FakeTracker()
    assert out.sent_tracked(A, TENANT, first, 100_000) == 200_000  # (and ZeroMQ's copy)
    assert out.sent_tracked(A, TENANT, second, 50_000) == 100_000
    assert out.tracked == 2 and out.unsent(A) == 300_000
    assert out.reap({A}) == []
    second.done = True  # the later one: it waits for the first (a connection's order)
    assert out.reap({A}) == []
    first.done = True
    assert out.reap({A}) == [(TENANT, 200_000), (TENANT, 100_000)]
    assert out.tracked == 0 and out.unsent(A) == 0
    assert out.reap({A}) == []


def test_small_replies_are_charged_with_the_next_tracked_one() -> None:
    out: Outbound[str] = Outbound()
    out.sent_untracked(A, TENANT, 1000)
    out.sent_untracked(A, TENANT, 2000)
    assert out.sent_tracked(A, TENANT, FakeTracker(), TRACK_BYTES) == TRACK_BYTES + 3000


def test_too_many_small_replies_in_a_row_get_tracked() -> None:
    out: Outbound[str] = Outbound()
    out.sent_untracked(A, TENANT, UNTRACKED_BYTES - 100)
    assert out.must_track(A, 101)
    assert not out.must_track(B, 101)


def test_replies_to_no_tenant_are_not_booked() -> None:
    out: Outbound[str] = Outbound()
    out.sent_untracked(A, None, UNTRACKED_BYTES)
    assert not out.must_track(A, 100)


def test_a_connection_over_its_unsent_limit_is_deferred() -> None:
    out: Outbound[str] = Outbound(unsent_limit=1000)
    tracker = FakeTracker()
    out.sent_tracked(A, TENANT, tracker, 1001)
    assert out.backed_up(A) and out.must_wait(A)
    assert not out.must_wait(B)
    out.defer(A, "r1")
    out.defer(A, "r2")
    assert out.deferred(A) == 2 and out.any_deferred()
    assert out.undefer() == []  # its replies have not left
    tracker.done = True
    out.reap({A})
    assert not out.backed_up(A)
    assert out.undefer() == ["r1", "r2"]
    assert out.deferred(A) == 0 and not out.any_deferred()


def test_a_connection_with_deferred_requests_defers_the_next_too() -> None:
    """Its requests keep their order: a new one waits behind those deferred, even once
    its replies have left (until they are let out)."""
    out: Outbound[str] = Outbound(unsent_limit=1000)
    tracker = FakeTracker()
    out.sent_tracked(A, TENANT, tracker, 1001)
    out.defer(A, "r1")
    tracker.done = True
    out.reap({A})
    assert out.must_wait(A)


def test_a_gone_connection_drops_its_deferred_requests_but_not_its_charge() -> None:
    out: Outbound[str] = Outbound(unsent_limit=1000)
    tracker = FakeTracker()
    out.sent_tracked(A, TENANT, tracker, 1001)
    out.defer(A, "r1")
    assert out.drop(A) == ["r1"]
    assert out.undefer() == [] and not out.any_deferred()
    assert out.unsent(A) == 1001  # still charged: ZeroMQ still holds it
    tracker.done = True
    assert out.reap(set()) == [(TENANT, 1001)]


def test_idle_connections_are_forgotten() -> None:
    out: Outbound[str] = Outbound()
    out.sent_untracked(A, TENANT, UNTRACKED_BYTES - 10)
    tracker = FakeTracker()
    out.sent_tracked(B, TENANT, tracker, TRACK_BYTES)
    out.forget_idle()
    assert not out.must_track(A, 100)  # A's small replies forgotten: it starts afresh
    assert out.unsent(B) == TRACK_BYTES  # B still has a reply on its way
