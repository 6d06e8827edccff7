"""The ZeroMQ share server: remote clients reach a share's actors through one ROUTER socket.

One thread owns the socket (ZeroMQ sockets are not thread-safe). It never blocks on an
actor: each request is asked of the target actor without blocking (``ask(block=False)``),
and when the actor completes its future, a callback queues the reply and rings a doorbell
the server thread polls beside the socket. So one slow request never holds up another, and many
requests per client can be outstanding, matched by id.

Open handles are server-side actors owned by the client connection (the ROUTER routing
id), kept in its record (:mod:`~pyvirtiofs.api.remote.connections`) and released when the
client says Bye, stops heart-beating, or the server stops.

Which share serves a connection, and with which credentials, is the :class:`Tenant`'s
business (:mod:`~pyvirtiofs.api.remote.tenancy`): a plain server has one tenant; the
multi-tenant agent maps each authenticated client to its own. The server thread is the
socket's loop: it takes messages in (who sends them, whether they get in, decoding). An
admitted request goes to the :class:`~pyvirtiofs.api.remote.dispatch.Dispatcher`, which
queues it, hands it to its actor, restarts a dead share and hands back the completion;
:mod:`~pyvirtiofs.api.remote.replies` sends the answers. They ask plain rules, each a
class of its own:

* :mod:`~pyvirtiofs.api.remote.connections`: the connections and the handles they hold;
* :mod:`~pyvirtiofs.api.remote.admission`: whether a message gets in (every message counts
  against the tenant's rate; bytes in flight, open handles, queued requests, connections);
* :mod:`~pyvirtiofs.api.remote.scheduler`: which waiting request starts next (deficit round
  robin over tenants by cost; bulk requests share a window and are paced while other
  tenants' small requests run; a handle's requests stay in order);
* :mod:`~pyvirtiofs.api.remote.outbound`: the replies ZeroMQ has not sent yet, charged to
  their tenant until they have left, and the requests of a connection that does not read
  them, deferred until it does.

Replies go out round-robin over tenants. The socket's per-connection high-water marks bound
what ZeroMQ queues besides.

A tenant whose share died (:meth:`Tenant.alive`) is restarted in a worker thread
(:meth:`Tenant.restart`) by the dispatcher while its requests wait; handles of the dead
share then answer ``ESTALE``.

Other threads talk to the server thread only through :meth:`ShareServer.call_soon`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.doorbell import Doorbell
from pyvirtiofs.api.remote import wire
from pyvirtiofs.api.remote.admission import (
    Admission,
    Verdict,
    bytes_held,
    note_rejection,
)
from pyvirtiofs.api.remote.connections import Connection, Connections
from pyvirtiofs.api.remote.dispatch import Dispatcher, Pending
from pyvirtiofs.api.remote.outbound import Outbound
from pyvirtiofs.api.remote.replies import Replies
from pyvirtiofs.api.remote.scheduler import CONTENDED_BULK_RATE, PIPELINE_WINDOW, Scheduler
from pyvirtiofs.api.remote.tenancy import Tenant, TenantLimits, TenantStats

log = logging.getLogger(__name__)

__all__ = ["ShareServer", "Tenant", "TenantLimits", "TenantStats"]

DEFAULT_HEARTBEAT_TIMEOUT = 10.0
DRAIN_LINGER_MS = 2000  # how long the last replies of a drain may take to leave
HANDSHAKE_TIMEOUT = 5.0  # seconds a peer may take to complete ZeroMQ's handshake
LISTEN_BACKLOG = 1024
SNDHWM = 1024  # replies ZeroMQ queues per connection (a client that does not read loses more)
RCVHWM = 64  # requests ZeroMQ queues per connection before it stops reading the peer
SWEEP_INTERVAL = 1.0


class ShareServer:
    """Serve tenants' shares on ZeroMQ endpoints (``tcp://`` and ``ipc://``).

    ``tenant_of(identity, frame)`` picks the tenant of a new connection (None refuses);
    the default serves everyone the single ``tenant``. ``configure_socket`` may set
    socket options before binding (CURVE keys, ZAP domain, a monitor). ``strict_tenants``:
    ask ``tenant_of`` again for every message and refuse it (``EACCES``) unless it names
    the connection's tenant — so a routing id reused by another peer, or a key that a
    reload revoked, never reaches a tenant's handles. ``on_event(event, tenant, **fields)``
    is called in the server thread for connection events and errors (default: log lines).
    ``max_bytes_in_flight``: the total over all tenants (None: only tenants' own limits).
    ``max_clients``: connections with a client record at once, over all tenants.
    ``pipeline_window``: bulk bytes executing at once (None: no window).
    ``contended_bulk_rate``: bulk bytes per second while other tenants' small requests are
    served (None: no pacing).
    """

    def __init__(self, bind: str | list[str], *, tenant: Tenant | None = None,
                 tenant_of: Any = None, heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
                 context: zmq.Context[Any] | None = None, configure_socket: Any = None,
                 strict_tenants: bool = False,
                 on_event: Callable[..., None] | None = None,
                 max_bytes_in_flight: int | None = None, max_clients: int | None = None,
                 pipeline_window: int | None = PIPELINE_WINDOW,
                 contended_bulk_rate: int | None = CONTENDED_BULK_RATE,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        if tenant is None and tenant_of is None:
            raise TypeError("ShareServer needs a tenant or a tenant_of function")
        self.endpoints_requested = [bind] if isinstance(bind, str) else list(bind)
        self.default_tenant = tenant
        self.tenant_of = tenant_of or (lambda identity, frame: tenant)
        self.heartbeat_timeout = heartbeat_timeout
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.configure_socket = configure_socket
        self.strict_tenants = strict_tenants
        self.on_event = on_event
        now = time.monotonic()
        self._admission = Admission(now, max_bytes_in_flight=max_bytes_in_flight,
                                    max_clients=max_clients)
        self._scheduler: Scheduler[Pending] = Scheduler(
            now, pipeline_window=pipeline_window, contended_bulk_rate=contended_bulk_rate)
        self._outbound: Outbound[Pending] = Outbound()
        self.handshake_timeout = handshake_timeout
        self.endpoints: list[str] = []
        self._clients = Connections()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._wake = Doorbell()
        self._stop = threading.Event()
        self._drain_until: float | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.requests_served = 0
        self.malformed = 0
        self._refused: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._dispatcher = Dispatcher(self._clients, self._admission, self._scheduler,
                                      self._outbound, call_soon=self.call_soon,
                                      poke=self._poke, event=self._event)
        self._replies = Replies(self._clients, self._admission, self._outbound,
                                self._dispatcher, event=self._event)

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> ShareServer:
        """Bind and serve in a background thread; returns once the endpoints are bound."""
        self._thread = threading.Thread(target=self._run, name="ShareServer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` (from a signal handler, say)."""
        self._run()
        if self._error is not None:
            raise self._error

    def stop(self, drain: float = 0.0) -> None:
        """Release every client's handles, close the socket, stop the thread.

        ``drain``: first answer the requests already taken (for up to that many seconds),
        refusing new ones with ``ESHUTDOWN``."""
        if drain > 0 and self._thread is not None and self._thread.is_alive():
            self._drain_until = time.monotonic() + drain
        else:
            self._stop.set()
        self._poke()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30 + drain)

    def __enter__(self) -> ShareServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the server thread (the only thread that may touch its state)."""
        self._calls.append(fn)
        self._poke()

    def run_in_server(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` in the server thread and return its result (from another thread)."""
        result: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            try:
                result.set_result(fn())
            except BaseException as exc:
                result.set_exception(exc)

        self.call_soon(call)
        return result.result(timeout)

    def _poke(self) -> None:
        self._wake.ring()

    @property
    def bytes_in_flight(self) -> int:
        """Bytes requests and unsent replies hold, over all tenants."""
        return self._admission.bytes_in_flight

    def stats(self) -> dict[str, Any]:
        """Clients, open handles per tenant (read without locking: a snapshot for status)."""
        return {"tenants": self._clients.per_tenant(), "requests": self.requests_served,
                "malformed": self.malformed, "bytes_in_flight": self.bytes_in_flight,
                "pipeline_bytes": self.pipeline_bytes}

    @property
    def pipeline_bytes(self) -> int:
        """Bulk bytes executing."""
        return self._scheduler.executing

    def tenant_snapshot(self, tenants: list[Tenant]) -> dict[str, dict[str, Any]]:
        """The counters of ``tenants`` (call in the server thread, or via run_in_server)."""
        return {t.name: t.stats.snapshot() for t in tenants}

    def drop_tenant(self, tenant: Tenant, why: str) -> int:
        """Disconnect every client of ``tenant`` (server thread only). Returns how many."""
        clients = self._clients.of_tenant(tenant)
        for client in clients:
            self._drop(client, why)
        return len(clients)

    # -- the server thread ------------------------------------------------------------------

    def _configure(self, sock: zmq.Socket[Any]) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # drop replies to vanished clients
        # Guard memory: a frame bigger than a request can be is refused by ZeroMQ itself
        # (the peer is disconnected); below it, oversize is answered with an error reply.
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        # Connections the kernel queues until we accept them: a flood of connections
        # overflows ZeroMQ's default of 100 and a well-behaved client's SYN is dropped
        # (it retries 1, 3, 7, 15 s later).
        sock.setsockopt(zmq.BACKLOG, LISTEN_BACKLOG)
        sock.setsockopt(zmq.SNDHWM, SNDHWM)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        # A peer that connects and never completes the greeting and handshake is dropped.
        sock.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(self.handshake_timeout * 1000)))
        # A peer whose host died is found by TCP keepalives, not by ZMTP heartbeats of our
        # own: libzmq 4.3 aborts the process (out_event asserts !_io_error) when its
        # heartbeat timer fires on a connection whose input was stopped at RCVHWM, which
        # any peer that floods us can arrange. Clients' heartbeat PINGs are still
        # answered (ZeroMQ does that whatever our interval), and a client that stops
        # sending is released by the sweep after heartbeat_timeout.
        idle = max(1, int(self.heartbeat_timeout / 2))
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, idle)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, max(1, idle // 3))
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
        if self.configure_socket is not None:
            self.configure_socket(sock)

    def _run(self) -> None:
        sock: zmq.Socket[Any] | None = None
        try:
            sock = self.context.socket(zmq.ROUTER)
            self._configure(sock)
            self._outbound.copies = 2 if sock.getsockopt(zmq.CURVE_SERVER) else 1
            for endpoint in self.endpoints_requested:
                sock.bind(endpoint)
                self.endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        except BaseException as exc:
            self._error = exc
            if sock is not None:
                sock.close(0)
            self._ready.set()
            return
        self._ready.set()
        log.info("serving on %s", ", ".join(self.endpoints))
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake.fileno(), zmq.POLLIN)
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        try:
            while not self._stop.is_set():
                timeout = max(0.0, next_sweep - time.monotonic())
                if self._drain_until is not None:
                    timeout = min(timeout, 0.05)
                if self._outbound.tracked:  # trackers complete without waking us: look soon
                    timeout = min(timeout, 0.01)
                paced_until = self._scheduler.paced_until
                if paced_until:
                    timeout = min(timeout, max(0.0, paced_until - time.monotonic()))
                events = dict(poller.poll(timeout * 1000))
                if events.get(self._wake.fileno()):
                    self._wake.drain()
                self._run_calls()
                self._replies.reap()
                self._replies.send_completed(sock)
                if events.get(sock):
                    self._receive(sock)
                self._dispatcher.undefer()
                self._dispatcher.pump(functools.partial(self._refuse_pending, sock))
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + SWEEP_INTERVAL
                if self._drain_until is not None and (now >= self._drain_until
                                                      or self._dispatcher.idle()):
                    left = sum(t.stats.requests_in_flight + t.stats.queued
                               for t in self._clients.tenants())
                    self._event("drained", None, "drain over; %d requests unanswered", left,
                                unanswered=left, timed_out=now >= self._drain_until)
                    break
        finally:
            self._run_calls()
            for client in self._clients:
                self._drop(client, "server stopping")
            self._replies.send_completed(sock)
            # After a drain, give the last replies a moment to leave (linger 0 would drop
            # whatever ZeroMQ has not written to the network yet).
            sock.close(DRAIN_LINGER_MS if self._drain_until is not None else 0)
            if self._own_context:
                self.context.term()
            self._wake.close()

    def _run_calls(self) -> None:
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                log.exception("a call_soon function failed")

    def _event(self, event: str, tenant: Tenant | None, message: str, *args: Any,
               level: int = logging.INFO, **fields: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event, tenant.name if tenant is not None else None, **fields)
            except Exception:
                log.exception("on_event failed")
        elif message:  # (an event with no message is for the hook only)
            log.log(level, message, *args)

    def _receive(self, sock: zmq.Socket[Any]) -> None:
        """Take every request waiting on the socket (bounded, so replies go out too)."""
        for _ in range(256):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                self._handle(sock, frames)
            except Exception:  # one bad message must never stop the server
                self.malformed += 1
                log.exception("dropped a message that could not be handled")

    def _handle(self, sock: zmq.Socket[Any], frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        client = self._clients.get(identity)
        if client is None or self.strict_tenants:
            tenant = self.tenant_of(identity, frames[-1])
            if tenant is None or (client is not None and tenant is not client.tenant):
                self._refuse(sock, identity, frames, client)
                return
        now = time.monotonic()
        if client is None:
            refusal = self._admission.connection(tenant, len(self._clients))
            if refusal is not None:
                if (self._admission.message(tenant, now) is not Verdict.DROP
                        and self._admission.peer_refusals.take(now)):
                    self._replies.send(sock, identity,
                                wire.peek_request_id([f.buffer for f in frames[1:]]),
                                error=wire.WireError(errno.EUSERS, refusal))
                else:
                    tenant.stats.dropped += 1
                return
            client = self._clients.add(identity, tenant, now)
            self._event("connect", tenant, "client %s connected (tenant %s)",
                        identity.hex()[:8], tenant.name, client=identity.hex()[:8])
        client.last_seen = now
        tenant = client.tenant
        body = [f.buffer for f in frames[1:]]
        verdict = self._admission.message(tenant, now, closing=wire.looks_like_close(body))
        if verdict is Verdict.DROP:
            tenant.stats.dropped += 1
            return
        if verdict is Verdict.REFUSE:
            self._over_rate(sock, tenant, identity, wire.peek_request_id(body))
            return
        try:
            header = wire.decode_request(body)
        except wire.WireFormatError as exc:
            self.malformed += 1
            self._replies.error(sock, client, wire.peek_request_id(body), None, exc)
            return
        op = header.op
        if verdict is Verdict.ONLY_A_CLOSE and not isinstance(op, m.Close):
            self._over_rate(sock, tenant, identity, header.id)
            return
        self.requests_served += 1
        try:
            if isinstance(op, wire.Ping):
                self._replies.send(sock, identity, header.id)
            elif isinstance(op, wire.Bye):
                self._drop(client, "said goodbye")
                self._replies.send(sock, identity, header.id)
            elif self._drain_until is not None:
                raise OSError(errno.ESHUTDOWN, "the server is shutting down")
            else:
                op = tenant.admit(op)
                if isinstance(op, m.Write):
                    op = msgspec.structs.replace(op, data=body[1])
                self._dispatcher.admit(client, header.id, op, header.handle,
                                       bytes_held(op, body))
        except Exception as exc:
            self._replies.error(sock, client, header.id, op, exc)

    def _over_rate(self, sock: zmq.Socket[Any], tenant: Tenant, identity: bytes,
                   request_id: int) -> None:
        note_rejection(tenant.stats, errno.EAGAIN)
        self._replies.send(sock, identity, request_id, error=wire.WireError(
            errno.EAGAIN, "tenant limit reached: requests per second"))

    def _refuse(self, sock: zmq.Socket[Any], identity: bytes, frames: list[zmq.Frame],
                client: Connection | None) -> None:
        tenant = client.tenant if client is not None else None
        if identity not in self._refused:  # one line per peer, not one per message
            self._refused[identity] = None
            if len(self._refused) > 4096:
                self._refused.popitem(last=False)
            self._event("refused", tenant, "refusing a client with no tenant",
                        level=logging.WARNING, client=identity.hex()[:8],
                        reason="no tenant for this peer")
        if tenant is not None:
            self._admission.count(tenant)
        if not self._admission.peer_refusals.take(time.monotonic()):
            return  # a flood of refused messages is not worth an answer each
        request_id = wire.peek_request_id([f.buffer for f in frames[1:]])
        self._replies.send(sock, identity, request_id, error=wire.WireError(
            errno.EACCES, "not authorised for this server"))

    def _refuse_pending(self, sock: zmq.Socket[Any], pending: Pending,
                        exc: BaseException) -> None:
        self._replies.error(sock, pending.client, pending.request_id, pending.op, exc)

    # -- client life cycle -------------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        for client in self._clients.silent_since(now - self.heartbeat_timeout):
            self._drop(client, "stopped heart-beating")
        tenants = self._clients.tenants() + self._scheduler.tenants()
        for tenant in {id(t.stats): t for t in tenants}.values():
            self._admission.measure_rate(tenant, now)
        self._scheduler.forget_activity(now)
        self._outbound.forget_idle()

    def _drop(self, client: Connection, why: str) -> None:
        """Forget a connection and release its handles (the actors send RELEASE)."""
        live = self._clients.remove(client)
        if live is None:
            return
        self._dispatcher.forget(client.identity)
        tenant = client.tenant
        self._event("disconnect", tenant,
                    "client %s %s; released %d handles (tenant %s)", client.identity.hex()[:8],
                    why, live, tenant.name, client=client.identity.hex()[:8], reason=why,
                    released=live)
