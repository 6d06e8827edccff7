"""What the server sends back: replies, error replies and refusals, in the server thread.

A reply's bytes stay charged to its tenant until ZeroMQ has let them go (the outbound
books track big replies with a ``MessageTracker``; small ones ride with the next tracked
one), so a client that does not read its replies runs into its tenant's limits instead of
the server's memory. Completions go out round-robin over tenants: a tenant with many at
once does not hold another's reply back behind all of its own. An open's completion gives
the new handle its id on the connection before it is answered.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

import pykka
import zmq

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api.remote import wire
from pyvirtiofs.api.remote.admission import OPEN_OPS, Admission
from pyvirtiofs.api.remote.connections import Connection, Connections
from pyvirtiofs.api.remote.dispatch import Completion, Dispatcher, Pending
from pyvirtiofs.api.remote.outbound import Outbound
from pyvirtiofs.api.remote.tenancy import Tenant

__all__ = ["Replies", "wire_error"]

log = logging.getLogger(__name__)


def wire_error(exc: BaseException) -> wire.WireError:
    """The error reply for an exception (an unexpected one is logged and is EIO)."""
    if isinstance(exc, OSError) and exc.errno:
        f1 = os.fsencode(exc.filename) if isinstance(exc.filename, (str, bytes)) else None
        f2 = os.fsencode(exc.filename2) if isinstance(exc.filename2, (str, bytes)) else None
        return wire.WireError(exc.errno, exc.strerror or os.strerror(exc.errno), f1, f2)
    if isinstance(exc, wire.WireFormatError):
        return wire.WireError(exc.errno, str(exc))
    if isinstance(exc, pykka.ActorDeadError):
        return wire.WireError(errno.EBADF, "handle is gone")
    log.error("internal error while serving a request: %r", exc)
    return wire.WireError(errno.EIO, f"internal error: {type(exc).__name__}")


class Replies:
    """The sending side of the server (see the module's doc). ``event(event, tenant,
    message, **fields)`` reports each error reply (with an empty message: it is for the
    event hook, not a log line of its own)."""

    def __init__(self, connections: Connections, admission: Admission,
                 outbound: Outbound[Pending], dispatcher: Dispatcher, *,
                 event: Callable[..., None]) -> None:
        self.connections = connections
        self.admission = admission
        self.outbound = outbound
        self.dispatcher = dispatcher
        self.event = event

    def send(self, sock: zmq.Socket[Any], identity: bytes, request_id: int,
             value: Any = None, *, error: wire.WireError | None = None, data: Any = None,
             tenant: Tenant | None = None) -> None:
        """Send one reply (``data``: a bulk frame after the header), charging it to the
        tenant of the connection until it has left."""
        header = wire.encode_reply(request_id, value, error)
        size = len(header) + (len(data) if data is not None else 0)
        if tenant is None:
            client = self.connections.get(identity)
            tenant = client.tenant if client is not None else None
        try:
            if tenant is None or not self.outbound.must_track(identity, size):
                frames: list[Any] = [identity, header] if data is None else [identity, header,
                                                                             data]
                sock.send_multipart(frames, copy=True)
                self.outbound.sent_untracked(identity, tenant, size)
                return
            last = zmq.Frame(data if data is not None else header, copy=False, track=True)
            sock.send(identity, zmq.SNDMORE)
            if data is not None:
                sock.send(header, zmq.SNDMORE)
            tracker = sock.send(last, copy=False, track=True)
        except zmq.ZMQError as exc:
            log.debug("reply to %s dropped: %s", identity.hex()[:8], exc)
            return
        self._hold_unsent(tenant, self.outbound.sent_tracked(identity, tenant, tracker, size))

    def error(self, sock: zmq.Socket[Any], client: Connection, request_id: int, op: Any,
              exc: BaseException) -> None:
        """Answer a request with the error ``exc`` (counted against its tenant)."""
        error = wire_error(exc)
        tenant = client.tenant
        tenant.stats.errors += 1
        self.event("error", tenant, "", client=client.identity.hex()[:8],
                   op=type(op).__name__ if op is not None else None,
                   errno=errno.errorcode.get(error.errno, str(error.errno)),
                   detail=error.strerror)
        self.send(sock, client.identity, request_id, error=error)

    def send_completed(self, sock: zmq.Socket[Any]) -> None:
        """Answer every request the dispatcher has completed, round-robin over tenants."""
        done = self.dispatcher.done
        if not done:
            return
        by_tenant: dict[int, collections.deque[Completion]] = {}
        while done:
            completion = done.popleft()
            by_tenant.setdefault(id(completion.client.tenant),
                                 collections.deque()).append(completion)
        queues = list(by_tenant.values())
        while queues:
            for queue in queues:
                self._send_one(sock, queue.popleft())
            queues = [q for q in queues if q]

    def reap(self) -> None:
        """Uncharge the replies ZeroMQ has finished with (sent, or dropped)."""
        for tenant, nbytes in self.outbound.reap(self.connections):
            self._hold_unsent(tenant, -nbytes)

    def _send_one(self, sock: zmq.Socket[Any], completion: Completion) -> None:
        assert completion.future is not None
        self.dispatcher.finish(completion)
        client, op = completion.client, completion.op
        value, exc = completion.future.result_or_error()
        if exc is not None:
            self.error(sock, client, completion.request_id, op, exc)
            return
        data: Any = None
        if isinstance(op, m.Read):
            value, data = None, value
        elif isinstance(op, OPEN_OPS):
            try:
                value = self._register(client, op, value, completion.generation)
            except OSError as exc:
                self.error(sock, client, completion.request_id, op, exc)
                return
            if value is None:
                return  # the client has left
        self.send(sock, client.identity, completion.request_id, value, data=data,
                  tenant=client.tenant)

    def _register(self, client: Connection, op: Any, opened: Any,
                  generation: int) -> wire.RemoteHandle | None:
        """Give a newly opened handle actor an id on the client's connection: the reply
        (None: the client has left)."""
        is_dir = isinstance(op, m.OpenDir)
        handle = self.connections.register(client, opened.actor, is_dir=is_dir,
                                           generation=generation)
        if not handle:
            return None
        if is_dir:
            return wire.RemoteHandle(handle, opened.nodeid)
        return wire.RemoteHandle(handle, opened.nodeid, opened.flags, opened.attr)

    def _hold_unsent(self, tenant: Tenant, nbytes: int) -> None:
        tenant.stats.unsent_bytes += nbytes
        self.admission.charge(tenant, nbytes)
