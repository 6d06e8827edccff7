"""The connection records, with no socket: clients and open handles counted per tenant,
handles checked against their connection, their kind and their share's generation, and
every handle's actor stopped exactly when its connection goes."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api.remote.connections import Connections
from pyvirtiofs.api.remote.tenancy import Tenant

A, B = b"conn-a", b"conn-b"


class FakeActor:
    def __init__(self) -> None:
        self.stops = 0

    def stop(self, block: bool = True) -> None:
        self.stops += 1


def _tenant(name: str = "alice") -> Tenant:
    return Tenant(name, fs=None)  # type: ignore[arg-type]  # (the books never touch it)


def _open(conns: Connections, conn: Any, *, is_dir: bool = False) -> tuple[int, FakeActor]:
    actor = FakeActor()
    return conns.register(conn, actor, is_dir=is_dir,
                          generation=conn.tenant.stats.generation), actor


def test_connections_and_handles_are_counted_per_tenant() -> None:
    conns, alice, bob = Connections(), _tenant("alice"), _tenant("bob")
    a, b = conns.add(A, alice, 0.0), conns.add(B, bob, 0.0)
    _open(conns, a)
    _open(conns, a, is_dir=True)
    assert len(conns) == 2 and A in conns and conns.get(B) is b
    assert alice.stats.clients == 1 and alice.stats.open_handles == 2
    assert conns.per_tenant() == {"alice": {"clients": 1, "handles": 2},
                                  "bob": {"clients": 1, "handles": 0}}
    assert conns.of_tenant(bob) == [b] and {t.name for t in conns.tenants()} == {"alice", "bob"}


def test_removing_a_connection_stops_every_handle_once() -> None:
    conns, alice = Connections(), _tenant()
    a = conns.add(A, alice, 0.0)
    (_, first), (_, second) = _open(conns, a), _open(conns, a)
    alice.stats.generation += 1  # a restart: the two are stale now
    alice.stats.open_handles = 0  # (what the server does on a restart)
    _, third = _open(conns, a)
    assert conns.remove(a) == 1  # one live handle released; the stale ones are stopped too
    assert (first.stops, second.stops, third.stops) == (1, 1, 1)
    assert alice.stats.clients == 0 and alice.stats.open_handles == 0
    assert conns.remove(a) is None and third.stops == 1  # not twice
    assert A not in conns and a.handles == {}


def test_an_open_finishing_after_its_client_left_is_stopped() -> None:
    conns, alice = Connections(), _tenant()
    a = conns.add(A, alice, 0.0)
    conns.remove(a)
    handle, actor = _open(conns, a)
    assert handle == 0 and actor.stops == 1 and alice.stats.open_handles == 0


def test_an_open_finishing_after_a_restart_is_stale() -> None:
    conns, alice = Connections(), _tenant()
    a = conns.add(A, alice, 0.0)
    actor = FakeActor()
    alice.stats.generation = 1
    with pytest.raises(OSError) as info:
        conns.register(a, actor, is_dir=False, generation=0)
    assert info.value.errno == errno.ESTALE and actor.stops == 1 and a.handles == {}


def test_handles_are_checked_against_their_connection_and_kind() -> None:
    conns, alice = Connections(), _tenant()
    a, b = conns.add(A, alice, 0.0), conns.add(B, alice, 0.0)
    file_handle, file_actor = _open(conns, a)
    dir_handle, dir_actor = _open(conns, a, is_dir=True)
    assert file_handle & 1 and file_handle != dir_handle  # (never 0: 0 means "no handle")
    assert conns.actor_for(a, file_handle, m.Read(size=1, offset=0)) is file_actor
    assert conns.actor_for(a, dir_handle, m.ReadDir()) is dir_actor
    for conn, handle, op in ((b, file_handle, m.Read(size=1, offset=0)),  # not b's
                             (a, file_handle, m.ReadDir()),  # a file is no directory
                             (a, dir_handle, m.Read(size=1, offset=0)),
                             (a, 12345, m.Close())):
        with pytest.raises(OSError) as info:
            conns.actor_for(conn, handle, op)
        assert info.value.errno == errno.EBADF


def test_a_stale_handle_answers_estale_and_closes_with_nothing_to_release() -> None:
    conns, alice = Connections(), _tenant()
    a = conns.add(A, alice, 0.0)
    handle, actor = _open(conns, a)
    live, live_actor = _open(conns, a)
    alice.stats.generation += 1
    alice.stats.open_handles = 0  # (what the server does on a restart)
    with pytest.raises(OSError) as info:
        conns.actor_for(a, handle, m.Read(size=1, offset=0))
    assert info.value.errno == errno.ESTALE
    assert conns.actor_for(a, handle, m.Close()) is None and handle not in a.handles
    assert alice.stats.open_handles == 0 and actor.stops == 0
    alice.stats.generation -= 1  # (pretend the other is current, to close it for real)
    alice.stats.open_handles = 1
    assert conns.actor_for(a, live, m.Close()) is live_actor and alice.stats.open_handles == 0


def test_silent_connections_are_found_by_their_last_message() -> None:
    conns, alice = Connections(), _tenant()
    a, b = conns.add(A, alice, 0.0), conns.add(B, alice, 5.0)
    assert conns.silent_since(1.0) == [a]
    a.last_seen = 6.0
    assert conns.silent_since(5.5) == [b]
