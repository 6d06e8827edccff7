"""The connection gate's books, with no socket: the caps on handshakes and connections,
which descriptor just completed its handshake and whose it is, and which descriptors to
shut down. The bytes each descriptor has sent are made up; time is passed in."""

from __future__ import annotations

from pyvirtiofs.api.agent.gate import (
    ATTRIBUTION_SETTLE,
    ATTRIBUTION_TIMEOUT,
    HANDSHAKE_SLACK,
    ConnectionGate,
    GateStats,
)


class Sent(dict[int, int | None]):
    """What each descriptor has sent (the ``TCP_INFO`` lookup, made up)."""

    def __call__(self, fd: int) -> int | None:
        return self.get(fd, 0)


def test_handshakes_beyond_the_cap_are_shut() -> None:
    gate = ConnectionGate(Sent(), max_handshakes=2)
    for fd in (10, 11, 12):
        gate.accepted(fd, 0.0)
    assert gate.to_shut() == {12: "too many connections in their handshake"}
    assert gate.to_shut() == {}  # taken once
    assert gate.stats().handshaking == 2


def test_connections_beyond_the_total_are_shut() -> None:
    sent = Sent()
    gate = ConnectionGate(sent, max_connections=2)
    gate.accepted(10, 0.0)
    assert gate.approve("a", None, 0.0) is None
    gate.completed()
    gate.accepted(11, 0.0)
    gate.accepted(12, 0.0)
    assert gate.to_shut() == {12: "the agent's connection limit"}


def test_a_descriptor_gone_in_the_same_batch_is_not_shut() -> None:
    """ZeroMQ reports a disconnect before it closes the descriptor: a number whose
    connection is gone may be someone else's by the time the batch is over."""
    gate = ConnectionGate(Sent(), max_handshakes=1)
    gate.accepted(10, 0.0)
    gate.accepted(11, 0.0)
    gate.gone(11)
    assert gate.to_shut() == {}


def test_the_completed_connection_is_the_one_that_sent_most() -> None:
    sent = Sent({10: 100, 11: 900, 12: 300})
    gate = ConnectionGate(sent)
    for fd in (10, 11, 12):
        gate.accepted(fd, 0.0)
    assert gate.approve("alice", None, 0.0) is None
    assert gate.completed() == 11
    assert gate.stats() == GateStats(handshaking=2, connections=1, per_tenant={"alice": 1})


def test_the_oldest_completes_where_sent_bytes_cannot_be_told() -> None:
    gate = ConnectionGate(lambda fd: None)
    for fd in (12, 10, 11):
        gate.accepted(fd, 0.0)
    gate.approve("bob", None, 0.0)
    assert gate.completed() == 12


def test_a_closed_descriptor_is_passed_over_when_others_can_be_told() -> None:
    """A number counted as handshaking whose connection is already closed (its sent bytes
    cannot be told) is not the one that completed: a live one is."""
    sent = Sent({10: None, 11: 300})
    gate = ConnectionGate(sent)
    for fd in (10, 11):
        gate.accepted(fd, 0.0)
    gate.approve("alice", None, 0.0)
    assert gate.completed() == 11


def test_a_tenant_over_its_cap_is_refused() -> None:
    gate = ConnectionGate(Sent(), max_connections=10)
    for fd in (10, 11):
        gate.accepted(fd, 0.0)
        assert gate.approve("alice", 2, 0.0) is None
        gate.completed()
    assert gate.approve("alice", 2, 0.0) == "tenant alice has 2 connections"
    assert gate.approve("bob", 2, 0.0) is None
    gate.gone(10)
    assert gate.approve("alice", 2, 0.0) is None


def test_zap_refuses_at_the_total() -> None:
    gate = ConnectionGate(Sent(), max_connections=1)
    gate.accepted(10, 0.0)
    gate.approve("alice", None, 0.0)
    gate.completed()
    assert gate.approve("bob", None, 0.0) == "the agent's connection limit"


def test_the_next_request_waits_for_the_approved_one_until_a_timeout() -> None:
    gate = ConnectionGate(Sent())
    assert not gate.awaiting(0.0)
    gate.approve("alice", None, 0.0)
    assert gate.awaiting(ATTRIBUTION_TIMEOUT)
    assert not gate.awaiting(ATTRIBUTION_TIMEOUT + 0.01)  # it never completed
    gate.accepted(10, 2.0)
    gate.completed()
    assert gate.stats().per_tenant == {}  # (completed with no approval awaited: no tenant)


def test_an_approved_connection_that_died_is_given_up_on_once_all_events_are_told() -> None:
    gate = ConnectionGate(Sent())
    gate.approve("alice", None, 1.0)
    gate.all_told(1.0 + ATTRIBUTION_SETTLE / 2)  # too soon to tell: ZeroMQ may be finishing
    assert gate.awaiting(1.0 + ATTRIBUTION_SETTLE * 2)
    gate.all_told(1.0 + ATTRIBUTION_SETTLE * 2)  # later, and still no completion: it is gone
    assert not gate.awaiting(1.0 + ATTRIBUTION_SETTLE * 2)
    gate.approve("bob", None, 2.0)  # an empty queue seen before the approval says nothing
    assert gate.awaiting(2.0 + ATTRIBUTION_SETTLE * 2)


def test_a_reused_number_replaces_the_old_connection() -> None:
    gate = ConnectionGate(Sent())
    gate.accepted(10, 0.0)
    gate.approve("alice", None, 0.0)
    gate.completed()
    gate.accepted(10, 1.0)  # the old connection's close went unreported
    assert gate.stats() == GateStats(handshaking=1, connections=0, per_tenant={})


def test_a_connection_reported_gone_before_accepted_stops_counting_after_the_timeout() -> None:
    """ZeroMQ can report a connection gone before it reports it accepted (two I/O threads):
    its handshake slot comes back once ZeroMQ's handshake timeout (and the slack) is over,
    and not before; connections accepted later keep theirs."""
    gate = ConnectionGate(Sent(), max_handshakes=2, handshake_timeout=2.0)
    gate.gone(10)
    gate.accepted(10, 1.0)  # never to be reported again
    gate.accepted(11, 2.5)
    assert gate.stats().handshaking == 2
    gate.expire(1.0 + 2.0 + HANDSHAKE_SLACK)
    assert gate.stats().handshaking == 2  # (not over yet)
    gate.expire(1.0 + 2.0 + HANDSHAKE_SLACK + 0.01)
    assert gate.stats().handshaking == 1
    gate.accepted(12, 4.0)
    assert gate.to_shut() == {}  # the slot is free again
    gate.expire(10.0)
    assert gate.stats().handshaking == 0


def test_without_a_handshake_timeout_nothing_expires() -> None:
    gate = ConnectionGate(Sent())
    gate.accepted(10, 0.0)
    gate.expire(1e9)
    assert gate.stats().handshaking == 1
