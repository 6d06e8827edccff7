"""The dispatcher with no socket: a request is charged, queued, handed to its actor and
completed; its charge is released once it is answered; a dead share is restarted while
its tenant's requests wait, and they fail with ENOTCONN if the restart fails."""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from typing import Any

import pytest

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.runtime import Future
from pyvirtiofs.api.remote.admission import Admission
from pyvirtiofs.api.remote.connections import Connections
from pyvirtiofs.api.remote.dispatch import Completion, Dispatcher, Pending
from pyvirtiofs.api.remote.outbound import Outbound
from pyvirtiofs.api.remote.scheduler import Scheduler
from pyvirtiofs.api.remote.tenancy import Tenant

STAT = m.Stat(path=b"f")


class FakeActor:
    """Completes nothing by itself: the test completes the futures it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[Any, Future[Any]]] = []
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive

    def ask(self, op: Any, block: bool = True) -> Future[Any]:
        future: Future[Any] = Future()
        self.asked.append((op, future))
        return future


class FakeShare:
    def __init__(self) -> None:
        self.session = FakeActor()
        self.daemon_pid = 1234


class RestartableTenant(Tenant):
    """A tenant whose share can be marked dead, and whose restart gives ``next_share``
    (or raises it, if it is an exception)."""

    dead = False
    next_share: Any = None

    def alive(self) -> bool:
        return not self.dead

    def restart(self) -> Any:
        if isinstance(self.next_share, BaseException):
            raise self.next_share
        self.dead = False
        return self.next_share


class Rig:
    def __init__(self) -> None:
        self.connections = Connections()
        self.admission = Admission(0.0)
        self.scheduler: Scheduler[Pending] = Scheduler(0.0, pipeline_window=None,
                                                       contended_bulk_rate=None)
        self.outbound: Outbound[Pending] = Outbound()
        self.calls: list[Callable[[], None]] = []
        self.called = threading.Event()
        self.events: list[str] = []
        self.refused: list[tuple[Pending, BaseException]] = []
        self.dispatcher = Dispatcher(self.connections, self.admission, self.scheduler,
                                     self.outbound, call_soon=self._call_soon,
                                     poke=lambda: None, event=self._event)

    def _call_soon(self, fn: Callable[[], None]) -> None:
        self.calls.append(fn)
        self.called.set()

    def _event(self, event: str, *args: Any, **fields: Any) -> None:
        self.events.append(event)

    def pump(self) -> None:
        self.dispatcher.pump(lambda p, exc: self.refused.append((p, exc)))

    def run_calls(self) -> None:
        assert self.called.wait(10), "the restart never reported back"
        self.called.clear()
        while self.calls:
            self.calls.pop(0)()


def _tenant(cls: type[Tenant] = Tenant) -> Tenant:
    return cls("alice", fs=FakeShare())  # type: ignore[arg-type]


def test_a_request_is_charged_dispatched_completed_and_released() -> None:
    rig, tenant = Rig(), _tenant()
    conn = rig.connections.add(b"a", tenant, 0.0)
    rig.dispatcher.admit(conn, 7, STAT, 0, 100)
    assert tenant.stats.queued == 1 and tenant.stats.bytes_in_flight == 100
    assert not rig.dispatcher.idle()
    rig.pump()
    session = tenant.fs.session
    assert [op for op, _ in session.asked] == [STAT]
    assert tenant.stats.queued == 0 and tenant.stats.requests_in_flight == 1
    assert not rig.dispatcher.done  # not until the actor completes it
    session.asked[0][1].set("attrs")
    (completion,) = rig.dispatcher.done
    assert (completion.request_id, completion.future.result_or_error()) == (7, ("attrs", None))
    rig.dispatcher.done.clear()
    rig.dispatcher.finish(completion)
    assert tenant.stats.requests_in_flight == 0 and tenant.stats.bytes_in_flight == 0
    assert rig.dispatcher.idle()


def test_a_request_on_an_unknown_handle_is_refused_before_it_is_charged() -> None:
    rig, tenant = Rig(), _tenant()
    conn = rig.connections.add(b"a", tenant, 0.0)
    with pytest.raises(OSError) as info:
        rig.dispatcher.admit(conn, 1, m.Read(size=10, offset=0), 99, 10)
    assert info.value.errno == errno.EBADF and tenant.stats.bytes_in_flight == 0


def test_a_request_whose_connection_left_is_refused_and_uncharged() -> None:
    rig, tenant = Rig(), _tenant()
    conn = rig.connections.add(b"a", tenant, 0.0)
    rig.dispatcher.admit(conn, 1, STAT, 0, 50)
    rig.connections.remove(conn)
    rig.pump()
    ((pending, exc),) = rig.refused
    assert pending.request_id == 1 and isinstance(exc, OSError) and exc.errno == errno.ENOTCONN
    assert tenant.stats.bytes_in_flight == 0 and not tenant.fs.session.asked


def test_the_close_of_a_stale_handle_completes_without_an_actor() -> None:
    rig, tenant = Rig(), _tenant()
    conn = rig.connections.add(b"a", tenant, 0.0)
    handle = rig.connections.register(conn, FakeActor(), is_dir=False, generation=0)
    tenant.stats.generation += 1  # the share was restarted
    rig.dispatcher.admit(conn, 3, m.Close(), handle, 0)
    rig.pump()
    (completion,) = rig.dispatcher.done
    assert completion.future.result_or_error() == (None, None)
    assert tenant.stats.requests_in_flight == 1  # until it is answered


def test_a_dead_share_is_restarted_while_its_requests_wait() -> None:
    rig, tenant = Rig(), _tenant(RestartableTenant)
    assert isinstance(tenant, RestartableTenant)
    conn = rig.connections.add(b"a", tenant, 0.0)
    old = tenant.fs
    tenant.dead, tenant.next_share = True, FakeShare()
    rig.dispatcher.admit(conn, 1, STAT, 0, 10)
    rig.pump()
    assert tenant.stats.restarting and tenant.stats.queued == 1  # waiting, not failed
    rig.run_calls()
    assert tenant.fs is tenant.next_share and tenant.fs is not old
    assert (tenant.stats.generation, tenant.stats.restarts) == (1, 1)
    assert rig.events == ["restart", "restarted"]
    rig.pump()  # what waited goes to the new share
    assert [op for op, _ in tenant.fs.session.asked] == [STAT] and not old.session.asked


def test_a_failed_restart_fails_the_waiting_requests_with_enotconn() -> None:
    rig, tenant = Rig(), _tenant(RestartableTenant)
    assert isinstance(tenant, RestartableTenant)
    conn = rig.connections.add(b"a", tenant, 0.0)
    tenant.dead, tenant.next_share = True, OSError(errno.EIO, "no daemon")
    for request_id in (1, 2):
        rig.dispatcher.admit(conn, request_id, STAT, 0, 10)
    rig.pump()
    rig.run_calls()
    assert rig.events == ["restart", "restart_failed"] and tenant.stats.generation == 0
    failures: list[Completion] = list(rig.dispatcher.done)
    assert [c.request_id for c in failures] == [1, 2]
    for completion in failures:
        _, exc = completion.future.result_or_error()
        assert isinstance(exc, OSError) and exc.errno == errno.ENOTCONN
        rig.dispatcher.finish(completion)
    assert tenant.stats.bytes_in_flight == 0 and tenant.stats.queued == 0
    rig.dispatcher.admit(conn, 3, STAT, 0, 10)
    rig.pump()  # within the backoff: no second restart at once; the request is tried
    assert rig.events == ["restart", "restart_failed"] and not tenant.stats.restarting
    assert [op for op, _ in tenant.fs.session.asked] == [STAT]
