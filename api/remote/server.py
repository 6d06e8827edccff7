"""The ZeroMQ share server: remote clients reach a share's actors through one ROUTER socket.

One thread owns the socket (ZeroMQ sockets are not thread-safe). It never blocks on an
actor: each request is asked of the target actor without blocking (``ask(block=False)``),
and when the actor completes its future, a callback queues the reply and rings a doorbell
the server thread polls beside the socket. So one slow request never holds up another, and many
requests per client can be outstanding, matched by id.

Open handles are server-side actors owned by the client connection (the ROUTER routing
id): handle ids are random 62-bit numbers, checked against the connection, and released
when the client says Bye, stops heart-beating, or the server stops.

Which share serves a connection, and with which credentials, is the :class:`Tenant`'s
business: a plain server has one tenant; the multi-tenant agent maps each authenticated
client to its own. Per tenant the server keeps counters (:class:`TenantStats`) and
enforces :class:`TenantLimits`: open handles (``EMFILE``), bytes in flight and requests
per second (``EAGAIN``), and a cap on requests in flight — beyond it requests wait in the
tenant's own queue, and the queues are served round-robin, so a tenant that floods the
server cannot crowd out another's requests. A tenant whose share died (:meth:`Tenant.alive`)
is restarted in a worker thread (:meth:`Tenant.restart`) while its requests wait; handles
of the dead share then answer ``ESTALE``.

Other threads talk to the server thread only through :meth:`ShareServer.call_soon`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import errno
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pykka
import zmq

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.doorbell import Doorbell
from pyvirtiofs.actors.runtime import Future, done, failed
from pyvirtiofs.api.local import VirtioFS
from pyvirtiofs.api.remote import wire

log = logging.getLogger(__name__)

__all__ = ["ShareServer", "Tenant", "TenantLimits", "TenantStats"]

DEFAULT_HEARTBEAT_TIMEOUT = 10.0
RESTART_BACKOFF = 1.0  # seconds between attempts to restart a tenant's dead share
DRAIN_LINGER_MS = 2000  # how long the last replies of a drain may take to leave
_DIR_OPS = (m.ReadDir, m.Rewind, m.FSyncDir)
_OPEN_OPS = (m.Open, m.OpenDir)


@dataclass
class TenantLimits:
    """Per-tenant limits; None is unlimited.

    ``open_handles``: files and directories open at once over all the tenant's
    connections (``EMFILE`` beyond). ``bytes_in_flight``: Read sizes and Write payloads
    of requests not yet answered (``EAGAIN`` beyond; one request alone is always admitted,
    so the bound is the larger of the limit and one request). ``requests_per_second``: a
    token bucket holding one second's worth (``EAGAIN`` when empty).
    ``requests_in_flight``: requests handed to the tenant's actors at once; the rest wait
    in the tenant's queue (at most ``max_queued``, ``EAGAIN`` beyond) and the queues of
    all tenants are served round-robin. ``Close`` is never refused (that would leak).
    """

    open_handles: int | None = None
    bytes_in_flight: int | None = None
    requests_per_second: float | None = None
    requests_in_flight: int | None = None
    max_queued: int = 4096


@dataclass
class TenantStats:
    """Counters the server thread keeps for a tenant (others read them as a snapshot)."""

    clients: int = 0
    open_handles: int = 0
    pending_opens: int = 0
    bytes_in_flight: int = 0
    requests_in_flight: int = 0
    queued: int = 0
    requests: int = 0
    errors: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # errno name -> count
    request_rate: float = 0.0  # requests per second over the last second or so
    generation: int = 0  # bumped each time the share is restarted
    restarts: int = 0
    restarting: bool = False
    _tokens: float = 0.0
    _tokens_at: float = 0.0
    _rate_count: int = 0
    _rate_since: float = field(default_factory=time.monotonic)
    _retry_at: float = 0.0

    def snapshot(self) -> dict[str, Any]:
        """The public counters as a plain dict."""
        return {k: (dict(v) if isinstance(v, dict) else v)
                for k, v in self.__dict__.items() if not k.startswith("_")}


@dataclass
class Tenant:
    """Who is served and how: the share, and whether clients' credentials are believed.

    ``credentials``: None trusts what each client sends (a single-user tool); a tuple
    forces those credentials on every request (what an agent does for its tenants).
    ``limits``: see :class:`TenantLimits`; ``stats`` is kept by the server."""

    name: str
    fs: VirtioFS
    trust_client_credentials: bool = True
    credentials: m.Credentials | None = None
    limits: TenantLimits = field(default_factory=TenantLimits)
    stats: TenantStats = field(default_factory=TenantStats, compare=False, repr=False)

    def admit(self, op: Any) -> Any:
        """The message as it will be executed for this tenant (credentials applied).

        Raises OSError to refuse it."""
        if self.trust_client_credentials:
            return op
        return msgspec.structs.replace(op, ctx=self.credentials, groups=None)

    def alive(self) -> bool:
        """Whether the share can take requests. False makes the server call
        :meth:`restart` (in a worker thread) before the tenant's next request."""
        return True

    def restart(self) -> VirtioFS:
        """A fresh share replacing a dead one (blocking; called in a worker thread)."""
        raise OSError(errno.ENOTCONN, "this share cannot be restarted")


@dataclass
class _Client:
    identity: bytes
    tenant: Tenant
    last_seen: float
    handles: dict[int, tuple[Any, bool, int]] = field(default_factory=dict)
    # handle id -> (actor ref, is_dir, tenant generation it was opened in)


@dataclass
class _Pending:
    """A request admitted but waiting in its tenant's queue."""

    client: _Client
    request_id: int
    op: Any
    handle: int
    cost: int


@dataclass(slots=True)
class _Reply:
    """A request handed to an actor; ``future`` is what the actor will complete."""

    client: _Client
    request_id: int
    op: Any
    handle: int
    cost: int = 0
    generation: int = 0
    future: Future[Any] | None = None


def _wire_error(exc: BaseException) -> wire.WireError:
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


def _cost(op: Any, body: list[Any]) -> int:
    """Bytes a request holds while in flight (what ``bytes_in_flight`` limits)."""
    if isinstance(op, m.Read):
        return op.size
    if isinstance(op, m.Write):
        return len(body[1]) if len(body) > 1 else 0
    return 0


class ShareServer:
    """Serve tenants' shares on ZeroMQ endpoints (``tcp://`` and ``ipc://``).

    ``tenant_of(identity, frame)`` picks the tenant of a new connection (None refuses);
    the default serves everyone the single ``tenant``. ``configure_socket`` may set
    socket options before binding (CURVE keys, ZAP domain). ``strict_tenants``: ask
    ``tenant_of`` again for every message and refuse it (``EACCES``) unless it names the
    connection's tenant — so a routing id reused by another peer, or a key that a reload
    revoked, never reaches a tenant's handles. ``on_event(event, tenant, **fields)`` is
    called in the server thread for connection events and errors (default: log lines).
    """

    def __init__(self, bind: str | list[str], *, tenant: Tenant | None = None,
                 tenant_of: Any = None, heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
                 context: zmq.Context[Any] | None = None, configure_socket: Any = None,
                 strict_tenants: bool = False,
                 on_event: Callable[..., None] | None = None) -> None:
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
        self.endpoints: list[str] = []
        self._clients: dict[bytes, _Client] = {}
        self._done: collections.deque[_Reply] = collections.deque()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._queues: dict[int, tuple[Tenant, collections.deque[_Pending]]] = {}
        self._round_robin: collections.deque[int] = collections.deque()
        self._wake = Doorbell()
        self._stop = threading.Event()
        self._drain_until: float | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.requests_served = 0
        self.malformed = 0
        self._refused: collections.OrderedDict[bytes, None] = collections.OrderedDict()

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

    def stats(self) -> dict[str, Any]:
        """Clients, open handles per tenant (read without locking: a snapshot for status)."""
        per_tenant: dict[str, dict[str, int]] = {}
        for client in list(self._clients.values()):
            t = per_tenant.setdefault(client.tenant.name, {"clients": 0, "handles": 0})
            t["clients"] += 1
            t["handles"] += sum(1 for h in list(client.handles.values())
                                if h[2] == client.tenant.stats.generation)
        return {"tenants": per_tenant, "requests": self.requests_served,
                "malformed": self.malformed}

    def tenant_snapshot(self, tenants: list[Tenant]) -> dict[str, dict[str, Any]]:
        """The counters of ``tenants`` (call in the server thread, or via run_in_server)."""
        return {t.name: t.stats.snapshot() for t in tenants}

    def drop_tenant(self, tenant: Tenant, why: str) -> int:
        """Disconnect every client of ``tenant`` (server thread only). Returns how many."""
        clients = [c for c in self._clients.values() if c.tenant is tenant]
        for client in clients:
            self._drop(client, why)
        return len(clients)

    # -- the server thread ------------------------------------------------------------------

    def _run(self) -> None:
        sock: zmq.Socket[Any] | None = None
        try:
            sock = self.context.socket(zmq.ROUTER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # drop replies to vanished clients
            # Guard memory: a frame this big is refused by ZeroMQ itself (the peer is
            # disconnected); below it, oversize is answered with an error reply.
            sock.setsockopt(zmq.MAXMSGSIZE, 4 * wire.MAX_DATA_BYTES)
            if self.configure_socket is not None:
                self.configure_socket(sock)
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
        next_sweep = time.monotonic() + 1.0
        try:
            while not self._stop.is_set():
                timeout = max(0.0, next_sweep - time.monotonic())
                if self._drain_until is not None:
                    timeout = min(timeout, 0.05)
                events = dict(poller.poll(timeout * 1000))
                if events.get(self._wake.fileno()):
                    self._wake.drain()
                self._run_calls()
                self._send_completed(sock)
                if events.get(sock):
                    self._receive(sock)
                self._pump(sock)
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + 1.0
                if self._drain_until is not None and (now >= self._drain_until
                                                      or self._idle()):
                    left = sum(t.stats.requests_in_flight + t.stats.queued
                               for t in {id(c.tenant): c.tenant
                                         for c in self._clients.values()}.values())
                    self._event("drained", None, "drain over; %d requests unanswered", left,
                                unanswered=left, timed_out=now >= self._drain_until)
                    break
        finally:
            self._run_calls()
            for client in list(self._clients.values()):
                self._drop(client, "server stopping")
            self._send_completed(sock)
            # After a drain, give the last replies a moment to leave (linger 0 would drop
            # whatever ZeroMQ has not written to the network yet).
            sock.close(DRAIN_LINGER_MS if self._drain_until is not None else 0)
            if self._own_context:
                self.context.term()
            self._wake.close()

    def _idle(self) -> bool:
        """Nothing in flight or queued for any tenant (the drain is over)."""
        if self._done or any(q for _, q in self._queues.values()):
            return False
        return all(c.tenant.stats.requests_in_flight == 0 for c in self._clients.values())

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
        else:
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
        if client is None:
            client = self._clients[identity] = _Client(identity, tenant, time.monotonic())
            tenant.stats.clients += 1
            self._event("connect", tenant, "client %s connected (tenant %s)",
                        identity.hex()[:8], tenant.name, client=identity.hex()[:8])
        client.last_seen = time.monotonic()
        body = [f.buffer for f in frames[1:]]
        try:
            header = wire.decode_request(body)
        except wire.WireFormatError as exc:
            self.malformed += 1
            request_id = _peek_id(body)
            self._error_reply(sock, client, request_id, None, exc)
            return
        self.requests_served += 1
        op = header.op
        try:
            if isinstance(op, wire.Ping):
                self._reply(sock, identity, header.id)
            elif isinstance(op, wire.Bye):
                self._drop(client, "said goodbye")
                self._reply(sock, identity, header.id)
            elif self._drain_until is not None:
                raise OSError(errno.ESHUTDOWN, "the server is shutting down")
            else:
                op = client.tenant.admit(op)
                if isinstance(op, m.Write):
                    op = msgspec.structs.replace(op, data=body[1])
                self._admit(client, header.id, op, header.handle, _cost(op, body))
        except Exception as exc:
            self._error_reply(sock, client, header.id, op, exc)

    def _refuse(self, sock: zmq.Socket[Any], identity: bytes, frames: list[zmq.Frame],
                client: _Client | None) -> None:
        tenant = client.tenant if client is not None else None
        if identity not in self._refused:  # one line per peer, not one per message
            self._refused[identity] = None
            if len(self._refused) > 4096:
                self._refused.popitem(last=False)
            self._event("refused", tenant, "refusing a client with no tenant",
                        level=logging.WARNING, client=identity.hex()[:8],
                        reason="no tenant for this peer")
        request_id = _peek_id([f.buffer for f in frames[1:]])
        self._reply(sock, identity, request_id, error=wire.WireError(
            errno.EACCES, "not authorised for this server"))

    def _error_reply(self, sock: zmq.Socket[Any], client: _Client, request_id: int, op: Any,
                     exc: BaseException) -> None:
        error = _wire_error(exc)
        tenant = client.tenant
        tenant.stats.errors += 1
        if self.on_event is not None:
            self._event("error", tenant, "", client=client.identity.hex()[:8],
                        op=type(op).__name__ if op is not None else None,
                        errno=errno.errorcode.get(error.errno, str(error.errno)),
                        detail=error.strerror)
        self._reply(sock, client.identity, request_id, error=error)

    def _reject(self, tenant: Tenant, code: int, what: str) -> OSError:
        name = errno.errorcode.get(code, str(code))
        tenant.stats.rejected[name] = tenant.stats.rejected.get(name, 0) + 1
        return OSError(code, f"tenant limit reached: {what}")

    # -- admission, queues and dispatch -------------------------------------------------------

    def _admit(self, client: _Client, request_id: int, op: Any, handle: int, cost: int) -> None:
        """Check the tenant's limits, charge the request, then dispatch or queue it."""
        tenant = client.tenant
        stats, limits = tenant.stats, tenant.limits
        if isinstance(op, wire.HANDLE_OPS) and handle not in client.handles:
            raise OSError(errno.EBADF, "no such handle on this connection")
        now = time.monotonic()
        closing = isinstance(op, m.Close)  # never refused: a refused Close would leak
        if limits.requests_per_second is not None and not closing:
            rate = limits.requests_per_second
            stats._tokens = min(max(rate, 1.0),
                                stats._tokens + (now - stats._tokens_at) * rate)
            stats._tokens_at = now
            if stats._tokens < 1.0:
                raise self._reject(tenant, errno.EAGAIN, "requests per second")
            stats._tokens -= 1.0
        if (limits.open_handles is not None and isinstance(op, _OPEN_OPS)
                and stats.open_handles + stats.pending_opens >= limits.open_handles):
            raise self._reject(tenant, errno.EMFILE, "open handles")
        if (limits.bytes_in_flight is not None and cost and stats.bytes_in_flight
                and stats.bytes_in_flight + cost > limits.bytes_in_flight):
            raise self._reject(tenant, errno.EAGAIN, "bytes in flight")
        key = id(tenant)
        entry = self._queues.get(key)
        queue = entry[1] if entry is not None else None
        if queue and len(queue) >= limits.max_queued and not closing:
            raise self._reject(tenant, errno.EAGAIN, "requests queued")
        stats.requests += 1
        stats._rate_count += 1
        stats.bytes_in_flight += cost
        if isinstance(op, _OPEN_OPS):
            stats.pending_opens += 1
        pending = _Pending(client, request_id, op, handle, cost)
        if not queue and self._can_dispatch(tenant):
            self._dispatch(pending)
            return
        if entry is None:
            entry = self._queues[key] = (tenant, collections.deque())
        if not entry[1]:
            self._round_robin.append(key)
        entry[1].append(pending)
        stats.queued += 1

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

    def _pump(self, sock: zmq.Socket[Any]) -> None:
        """Dispatch queued requests, one per tenant per round, while tenants have room."""
        progress = True
        while progress and self._round_robin:
            progress = False
            for _ in range(len(self._round_robin)):
                key = self._round_robin.popleft()
                entry = self._queues.get(key)
                if entry is None or not entry[1]:
                    self._queues.pop(key, None)
                    continue
                tenant, queue = entry
                if self._can_dispatch(tenant):
                    pending = queue.popleft()
                    tenant.stats.queued -= 1
                    progress = True
                    try:
                        self._dispatch(pending)
                    except Exception as exc:
                        self._error_reply(sock, pending.client, pending.request_id, pending.op,
                                          exc)
                if queue:
                    self._round_robin.append(key)
                else:
                    self._queues.pop(key, None)

    def _uncharge(self, tenant: Tenant, op: Any, cost: int) -> None:
        tenant.stats.bytes_in_flight -= cost
        if isinstance(op, _OPEN_OPS):
            tenant.stats.pending_opens -= 1

    def _dispatch(self, pending: _Pending) -> None:
        client, op, handle = pending.client, pending.op, pending.handle
        tenant = client.tenant
        try:
            if self._clients.get(client.identity) is not client:
                raise OSError(errno.ENOTCONN, "the connection was closed")
            if isinstance(op, wire.HANDLE_OPS):
                entry = client.handles.get(handle)
                if entry is None:
                    raise OSError(errno.EBADF, "no such handle on this connection")
                ref, is_dir, generation = entry
                stale = generation != tenant.stats.generation
                if isinstance(op, m.Close):
                    del client.handles[handle]
                    if stale:  # its share was restarted: nothing left to release
                        self._reply_later(pending, None)
                        return
                    tenant.stats.open_handles -= 1
                elif stale:
                    raise OSError(errno.ESTALE, "the share was restarted; reopen the file")
                elif is_dir != isinstance(op, _DIR_OPS):
                    raise OSError(errno.EBADF, "wrong kind of handle for this operation")
            else:
                ref = tenant.fs.session
            if not ref.is_alive():
                raise OSError(errno.EBADF if isinstance(op, wire.HANDLE_OPS) else errno.ENOTCONN,
                              "the actor serving this request is gone")
        except BaseException:
            self._uncharge(tenant, op, pending.cost)
            raise
        reply = _Reply(client, pending.request_id, op, handle, pending.cost,
                       tenant.stats.generation)
        tenant.stats.requests_in_flight += 1
        reply.future = ref.ask(op, block=False)
        reply.future.add_done_callback(lambda _, r=reply: self._completed(r))

    def _reply_later(self, pending: _Pending, value: Any) -> None:
        """Answer a request without an actor (it still goes through the completion path)."""
        pending.client.tenant.stats.requests_in_flight += 1
        self._completed(_Reply(pending.client, pending.request_id, pending.op, pending.handle,
                               pending.cost, pending.client.tenant.stats.generation,
                               done(value)))

    # -- restarting a tenant's share ----------------------------------------------------------

    def _start_restart(self, tenant: Tenant) -> None:
        stats = tenant.stats
        if stats.restarting or time.monotonic() < stats._retry_at:
            return
        stats.restarting = True
        self._event("restart", tenant, "restarting the share of tenant %s", tenant.name,
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
            self._event("restart_failed", tenant, "restarting tenant %s failed: %s",
                        tenant.name, fs, level=logging.ERROR, detail=str(fs))
            self._fail_queue(tenant, OSError(errno.ENOTCONN,
                                             f"the share is unavailable: {fs}"))
            return
        tenant.fs = fs
        stats.generation += 1
        stats.restarts += 1
        stats.open_handles = 0  # the old handles are stale (ESTALE), not open
        self._event("restarted", tenant, "tenant %s share restarted", tenant.name,
                    generation=stats.generation, daemon_pid=fs.daemon_pid)
        # _pump (after this call) dispatches what waited.

    def _fail_queue(self, tenant: Tenant, exc: OSError) -> None:
        entry = self._queues.pop(id(tenant), None)
        if entry is None:
            return
        with contextlib.suppress(ValueError):
            self._round_robin.remove(id(tenant))
        for pending in entry[1]:
            tenant.stats.queued -= 1
            tenant.stats.requests_in_flight += 1
            self._completed(_Reply(pending.client, pending.request_id, pending.op,
                                   pending.handle, pending.cost, future=failed(exc)))

    # -- completions (any thread → server thread) --------------------------------------------

    def _completed(self, reply: _Reply) -> None:
        self._done.append(reply)
        self._poke()

    def _send_completed(self, sock: zmq.Socket[Any]) -> None:
        while self._done:
            future = self._done.popleft()
            assert future.future is not None
            client = future.client
            tenant = client.tenant
            tenant.stats.requests_in_flight -= 1
            op = future.op
            self._uncharge(tenant, op, future.cost)
            try:
                value = future.future.get(timeout=0)
            except Exception as exc:
                self._error_reply(sock, client, future.request_id, op, exc)
                continue
            data: Any = None
            if isinstance(op, m.Read):
                value, data = None, value
            elif isinstance(op, _OPEN_OPS):
                value = self._register(client, op, value, future.generation)
                if value is None:
                    continue
                if isinstance(value, OSError):
                    self._error_reply(sock, client, future.request_id, op, value)
                    continue
            self._reply(sock, client.identity, future.request_id, value, data=data)

    def _register(self, client: _Client, op: Any, opened: Any,
                  generation: int) -> wire.RemoteHandle | OSError | None:
        """Give a newly opened handle actor an id on the client's connection."""
        ref = opened.actor
        tenant = client.tenant
        if self._clients.get(client.identity) is not client:
            with contextlib.suppress(Exception):
                ref.stop(block=False)  # the client left while its open was in flight
            return None
        if generation != tenant.stats.generation:
            with contextlib.suppress(Exception):
                ref.stop(block=False)  # opened on a share that has been restarted since
            return OSError(errno.ESTALE, "the share was restarted while opening")
        handle = secrets.randbits(62) | 1
        while handle in client.handles:
            handle = secrets.randbits(62) | 1
        is_dir = isinstance(op, m.OpenDir)
        client.handles[handle] = (ref, is_dir, generation)
        tenant.stats.open_handles += 1
        if is_dir:
            return wire.RemoteHandle(handle, opened.nodeid)
        return wire.RemoteHandle(handle, opened.nodeid, opened.flags, opened.attr)

    def _reply(self, sock: zmq.Socket[Any], identity: bytes, request_id: int, value: Any = None,
               *, error: wire.WireError | None = None, data: Any = None) -> None:
        header = wire.encode_reply(request_id, value, error)
        frames: list[Any] = [identity, header] if data is None else [identity, header, data]
        try:
            sock.send_multipart(frames, copy=data is None or len(data) < 65536)
        except zmq.ZMQError as exc:
            log.debug("reply to %s dropped: %s", identity.hex()[:8], exc)

    # -- client life cycle -------------------------------------------------------------------

    def _sweep(self, now: float) -> None:
        for client in list(self._clients.values()):
            if now - client.last_seen > self.heartbeat_timeout:
                self._drop(client, "stopped heart-beating")
        seen: set[int] = set()
        for client in self._clients.values():
            stats = client.tenant.stats
            if id(stats) not in seen:
                seen.add(id(stats))
                _update_rate(stats, now)
        for tenant, _ in self._queues.values():
            if id(tenant.stats) not in seen:
                seen.add(id(tenant.stats))
                _update_rate(tenant.stats, now)

    def _drop(self, client: _Client, why: str) -> None:
        """Forget a connection and release its handles (the actors send RELEASE)."""
        if self._clients.pop(client.identity, None) is None:
            return
        tenant = client.tenant
        tenant.stats.clients -= 1
        live = 0
        for ref, _, generation in client.handles.values():
            if generation == tenant.stats.generation:
                live += 1
            with contextlib.suppress(Exception):
                ref.stop(block=False)
        tenant.stats.open_handles -= live
        if tenant.stats.clients == 0:
            tenant.stats.request_rate = 0.0
        self._event("disconnect", tenant,
                    "client %s %s; released %d handles (tenant %s)", client.identity.hex()[:8],
                    why, live, tenant.name, client=client.identity.hex()[:8], reason=why,
                    released=live)
        client.handles.clear()


def _update_rate(stats: TenantStats, now: float) -> None:
    elapsed = now - stats._rate_since
    if elapsed >= 1.0:
        stats.request_rate = stats._rate_count / elapsed
        stats._rate_count = 0
        stats._rate_since = now


def _peek_id(frames: list[Any]) -> int:
    """The request id of a malformed request, if its header still has one (else 0)."""
    if not frames:
        return 0
    try:
        head = msgspec.msgpack.decode(frames[0])
    except Exception:  # any garbage: msgspec raises several kinds
        return 0
    if isinstance(head, list) and head and type(head[0]) is int:  # a bool is no id
        return head[0] if 0 <= head[0] < 1 << 63 else 0
    return 0
