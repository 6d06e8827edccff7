"""A request's way from admission to its completion, in the server thread.

An admitted request (:class:`Pending`) is charged to its tenant (the admission), then
either waits behind its connection's unsent replies (the outbound books) or joins the
scheduler's queues. When the scheduler lets it go, it is handed to its actor — the
tenant's session, or the handle's file or directory actor — without blocking, and the
actor's future completes it (:class:`Completion`, queued for the server thread from
whatever thread completed it). A tenant whose share died is restarted in a worker thread
meanwhile; its queue waits, and fails with ``ENOTCONN`` if the restart fails.

The :class:`Dispatcher` owns none of the books it works with: the server shares them with
its intake and its replies. It is called by the server thread only, except
:meth:`Dispatcher.completed`.
"""

from __future__ import annotations

import collections
import errno
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.runtime import Future, done, failed
from pyvirtiofs.api.local import VirtioFS
from pyvirtiofs.api.remote import wire
from pyvirtiofs.api.remote.admission import Admission
from pyvirtiofs.api.remote.connections import Connection, Connections
from pyvirtiofs.api.remote.outbound import Outbound
from pyvirtiofs.api.remote.scheduler import Scheduler
from pyvirtiofs.api.remote.tenancy import Tenant

__all__ = ["RESTART_BACKOFF", "Completion", "Dispatcher", "Pending"]

log = logging.getLogger(__name__)

RESTART_BACKOFF = 1.0  # seconds between attempts to restart a tenant's dead share


@dataclass(slots=True)
class Pending:
    """A request admitted but not started: waiting for its turn, or for its connection's
    replies to leave."""

    client: Connection
    request_id: int
    op: Any
    handle: int
    cost: int  # bytes charged to bytes_in_flight
    seq: int = 0  # arrival order

    @property
    def tenant(self) -> Tenant:
        return self.client.tenant


@dataclass(slots=True)
class Completion:
    """A request handed to an actor; ``future`` is what the actor will complete."""

    client: Connection
    request_id: int
    op: Any
    handle: int
    cost: int = 0
    generation: int = 0
    future: Future[Any] | None = None
    bulk: int = 0  # bytes it holds in the pipeline window while it executes


class Dispatcher:
    """Queues, dispatch, restarts and completions (see the module's doc).

    ``call_soon(fn)`` runs ``fn`` in the server thread; ``poke()`` wakes it;
    ``event(event, tenant, message, *args, level=…, **fields)`` reports what happened."""

    def __init__(self, connections: Connections, admission: Admission,
                 scheduler: Scheduler[Pending], outbound: Outbound[Pending], *,
                 call_soon: Callable[[Callable[[], None]], None], poke: Callable[[], None],
                 event: Callable[..., None]) -> None:
        self.connections = connections
        self.admission = admission
        self.scheduler = scheduler
        self.outbound = outbound
        self.call_soon = call_soon
        self.poke = poke
        self.event = event
        self.done: collections.deque[Completion] = collections.deque()

    # -- from admission to the queues ----------------------------------------------------------

    def admit(self, client: Connection, request_id: int, op: Any, handle: int,
              nbytes: int) -> None:
        """Check the tenant's limits, charge the request, then queue it (or let it wait
        behind its connection's unsent replies). Raises OSError to refuse it."""
        if isinstance(op, wire.HANDLE_OPS) and handle not in client.handles:
            raise OSError(errno.EBADF, "no such handle on this connection")
        identity = client.identity
        self.admission.request(client.tenant, op, nbytes,
                               deferred=self.outbound.deferred(identity))
        pending = Pending(client, request_id, op, handle, nbytes)
        self.scheduler.arrived(pending, time.monotonic(), activity=not isinstance(op, m.Close))
        if self.outbound.must_wait(identity):
            self._defer(pending)  # its replies are not leaving: wait for them
            return
        self._enqueue(pending)

    def undefer(self) -> None:
        """Connections whose replies have left (or were dropped) are served again."""
        for pending in self.outbound.undefer():
            pending.tenant.stats.deferred -= 1
            self._enqueue(pending)

    def forget(self, identity: bytes) -> None:
        """A connection is gone: uncharge the requests it had waiting for its replies."""
        for pending in self.outbound.drop(identity):
            pending.tenant.stats.deferred -= 1
            self.admission.release(pending.tenant, pending.op, pending.cost)

    def _defer(self, pending: Pending) -> None:
        self.outbound.defer(pending.client.identity, pending)
        pending.tenant.stats.deferred += 1

    def _enqueue(self, pending: Pending) -> None:
        self.scheduler.push(pending)
        pending.tenant.stats.queued += 1

    # -- from the queues to the actors -------------------------------------------------------

    def pump(self, refuse: Callable[[Pending, BaseException], None]) -> None:
        """Start the waiting requests the scheduler lets go; ``refuse`` answers one that
        cannot start (its charge already released)."""

        def start(pending: Pending) -> bool:  # (False: it waits for its replies to leave)
            pending.tenant.stats.queued -= 1
            if self.outbound.backed_up(pending.client.identity):
                self._defer(pending)
                return False
            try:
                self._dispatch(pending)
            except Exception as exc:
                refuse(pending, exc)
            return True

        self.scheduler.pump(time.monotonic(), self._can_dispatch, start)

    def _can_dispatch(self, tenant: Tenant) -> bool:
        stats = tenant.stats
        if stats.restarting:
            return False
        cap = tenant.limits.requests_in_flight
        if cap is not None and stats.requests_in_flight >= cap:
            return False
        try:
            alive = tenant.alive()
        except Exception:
            log.exception("checking the share of tenant %s failed", tenant.name)
            alive = False
        if alive:
            return True
        self._start_restart(tenant)
        return not stats.restarting

    def _dispatch(self, pending: Pending) -> None:
        client, op, handle = pending.client, pending.op, pending.handle
        tenant = client.tenant
        try:
            if not self.connections.is_current(client):
                raise OSError(errno.ENOTCONN, "the connection was closed")
            if isinstance(op, wire.HANDLE_OPS):
                ref = self.connections.actor_for(client, handle, op)
                if ref is None:  # the Close of a stale handle: nothing left to release
                    self._complete_now(pending, done(None))
                    return
            else:
                ref = tenant.fs.session
            if not ref.is_alive():
                raise OSError(errno.EBADF if isinstance(op, wire.HANDLE_OPS) else errno.ENOTCONN,
                              "the actor serving this request is gone")
        except BaseException:
            self.admission.release(tenant, op, pending.cost)
            raise
        completion = Completion(client, pending.request_id, op, handle, pending.cost,
                                tenant.stats.generation, bulk=self.scheduler.begin(pending))
        tenant.stats.requests_in_flight += 1
        try:
            completion.future = tenant.execute(ref, op)
        except Exception as exc:
            completion.future = failed(exc)
        completion.future.add_done_callback(lambda _, c=completion: self.completed(c))

    def _complete_now(self, pending: Pending, future: Future[Any]) -> None:
        """Answer a request without an actor (it still goes through the completion path,
        so its charge is released where every other one is)."""
        pending.tenant.stats.requests_in_flight += 1
        self.completed(Completion(pending.client, pending.request_id, pending.op,
                                  pending.handle, pending.cost,
                                  pending.tenant.stats.generation, future))

    # -- completions (any thread → server thread) --------------------------------------------

    def completed(self, completion: Completion) -> None:
        self.done.append(completion)
        self.poke()

    def finish(self, completion: Completion) -> None:
        """A completion is being answered: it no longer counts as in flight."""
        tenant = completion.client.tenant
        tenant.stats.requests_in_flight -= 1
        self.admission.release(tenant, completion.op, completion.cost)
        self.scheduler.end(completion.bulk)

    def idle(self) -> bool:
        """Nothing in flight, queued, deferred or unanswered for any connected tenant."""
        if self.done or self.scheduler or self.outbound.any_deferred():
            return False
        return all(t.stats.requests_in_flight == 0 for t in self.connections.tenants())

    # -- restarting a tenant's share ----------------------------------------------------------

    def _start_restart(self, tenant: Tenant) -> None:
        stats = tenant.stats
        if stats.restarting or time.monotonic() < stats._retry_at:
            return
        stats.restarting = True
        self.event("restart", tenant, "restarting the share of tenant %s", tenant.name,
                   level=logging.WARNING, generation=stats.generation + 1)

        def work() -> None:
            try:
                fs: VirtioFS | BaseException = tenant.restart()
            except BaseException as exc:
                fs = exc
            self.call_soon(lambda: self._restarted(tenant, fs))

        threading.Thread(target=work, name=f"restart-{tenant.name}", daemon=True).start()

    def _restarted(self, tenant: Tenant, fs: VirtioFS | BaseException) -> None:
        stats = tenant.stats
        stats.restarting = False
        if isinstance(fs, BaseException):
            stats._retry_at = time.monotonic() + RESTART_BACKOFF
            self.event("restart_failed", tenant, "restarting tenant %s failed: %s",
                       tenant.name, fs, level=logging.ERROR, detail=str(fs))
            unavailable = OSError(errno.ENOTCONN, f"the share is unavailable: {fs}")
            for pending in self.scheduler.remove(tenant):
                stats.queued -= 1
                self._complete_now(pending, failed(unavailable))
            return
        tenant.fs = fs
        stats.generation += 1
        stats.restarts += 1
        stats.open_handles = 0  # the old handles are stale (ESTALE), not open
        self.event("restarted", tenant, "tenant %s share restarted", tenant.name,
                   generation=stats.generation, daemon_pid=fs.daemon_pid)
        # the next pump (after this call) dispatches what waited
