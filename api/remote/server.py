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
enforces :class:`TenantLimits`:

* **Every message counts** against the request rate (pings, malformed and refused
  messages too). Beyond the rate a message is answered ``EAGAIN`` (a cheap answer: it is
  not decoded), up to ten times the rate (at least 100 a second); beyond that it is dropped
  unanswered, so a flood costs the server one receive per message and nothing more.
* **Memory.** ``bytes_in_flight`` counts what a tenant's requests hold: Read sizes and
  Write payloads until answered, then the reply's bytes *until they have left the
  process* — a reply is handed to ZeroMQ without a copy and tracked (``MessageTracker``),
  so a client that does not read its replies keeps them charged to its tenant. Beyond the
  tenant's limit, or the server's total (``max_bytes_in_flight``), requests that carry data
  get ``EAGAIN``. A connection whose unsent replies exceed :data:`CONNECTION_UNSENT_LIMIT`
  is not served further (its requests wait, charged, until its replies have left), and the
  socket's per-connection high-water marks bound what ZeroMQ queues besides.
* **Fairness by cost.** Each request costs a fixed amount plus its bytes; tenants' queues
  are served by deficit round robin over that cost. Requests that move data (reads and
  writes of :data:`BULK_BYTES` or more) share a window of bytes executing at once, and
  while another tenant's small requests are being served (any in the last
  :data:`CONTENTION_WINDOW`), bulk bytes are paced to ``contended_bulk_rate`` per second
  in all: a tenant streaming large reads as fast as it can would otherwise take every CPU
  of the machine (copying, encrypting, sending) and the other tenant's requests would
  wait for one. Alone, a tenant streams as fast as it can. Small requests never wait for
  the window or the pacing; a handle's requests stay in order. Replies go out round-robin
  over tenants.
* Open handles (``EMFILE``), requests in flight (beyond it requests wait in the tenant's
  queue) and connections (``EUSERS``).

A tenant whose share died (:meth:`Tenant.alive`) is restarted in a worker thread
(:meth:`Tenant.restart`) while its requests wait; handles of the dead share then answer
``ESTALE``.

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
HANDSHAKE_TIMEOUT = 5.0  # seconds a peer may take to complete ZeroMQ's handshake
SNDHWM = 1024  # replies ZeroMQ queues per connection (a client that does not read loses more)
RCVHWM = 64  # requests ZeroMQ queues per connection before it stops reading the peer
CONNECTION_UNSENT_LIMIT = 16 << 20  # a connection's unsent reply bytes before it waits
TRACK_BYTES = 16 << 10  # replies this big are tracked until they have left
UNTRACKED_BYTES = 64 << 10  # small replies between two tracked ones, per connection
BULK_BYTES = 64 << 10  # requests moving this much data share the pipeline window
PIPELINE_WINDOW = 16 << 20  # bulk bytes executing at once, over all tenants
CONTENDED_BULK_RATE = 64 << 20  # bulk bytes per second while others' small requests run
CONTENTION_WINDOW = 0.25  # seconds a tenant's small request counts as activity
BASE_COST = 4 << 10  # what any request costs the scheduler, besides its bytes
QUANTUM = 1 << 20  # cost a tenant may spend per deficit-round-robin round
MAX_DEFERRED = 1024  # requests a connection may have waiting for its replies to leave
REFUSALS_PER_RATE = 10  # EAGAIN answers a tenant over its rate gets per second: 10x the rate
MIN_REFUSALS = 100.0  # (and at least this many)
SWEEP_INTERVAL = 1.0
_DIR_OPS = (m.ReadDir, m.Rewind, m.FSyncDir)
_OPEN_OPS = (m.Open, m.OpenDir)


@dataclass
class TenantLimits:
    """Per-tenant limits; None is unlimited.

    ``open_handles``: files and directories open at once over all the tenant's
    connections (``EMFILE`` beyond). ``bytes_in_flight``: Read sizes and Write payloads
    of requests not yet answered, and replies not yet sent (``EAGAIN`` beyond; one request
    alone is always admitted, so the bound is the larger of the limit and one request).
    ``requests_per_second``: a token bucket holding one second's worth, which every
    message draws from (``EAGAIN`` when empty; beyond eleven times the rate, or the rate
    plus 100, messages are dropped unanswered). ``requests_in_flight``: requests handed
    to the tenant's actors at once; the rest wait in the tenant's queue (at most
    ``max_queued``, ``EAGAIN`` beyond).
    ``connections``: clients at once (``EUSERS`` beyond). ``Close`` is never refused
    (that would leak), though it counts.
    """

    open_handles: int | None = None
    bytes_in_flight: int | None = None
    requests_per_second: float | None = None
    requests_in_flight: int | None = None
    max_queued: int = 4096
    connections: int | None = None


@dataclass
class TenantStats:
    """Counters the server thread keeps for a tenant (others read them as a snapshot)."""

    clients: int = 0
    open_handles: int = 0
    pending_opens: int = 0
    bytes_in_flight: int = 0  # requests' data, and replies not yet sent
    unsent_bytes: int = 0  # of which: replies handed to ZeroMQ that have not left yet
    requests_in_flight: int = 0
    queued: int = 0
    deferred: int = 0  # waiting for their connection's replies to leave
    requests: int = 0
    errors: int = 0
    dropped: int = 0  # messages beyond what refusals may cost: not answered
    rejected: dict[str, int] = field(default_factory=dict)  # errno name -> count
    request_rate: float = 0.0  # messages per second over the last second or so
    generation: int = 0  # bumped each time the share is restarted
    restarts: int = 0
    restarting: bool = False
    _tokens: float = -1.0  # (-1: not started yet, the bucket starts full)
    _tokens_at: float = 0.0
    _refusals: float = 0.0
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

    def execute(self, ref: Any, op: Any) -> Future[Any]:
        """Hand an admitted request to the actor ``ref`` (its session, or a handle's
        actor); returns the future of its result. Server thread; must not block. A
        tenant may wrap it (the agent's byte quota does)."""
        return ref.ask(op, block=False)  # type: ignore[no-any-return]

    def alive(self) -> bool:
        """Whether the share can take requests. False makes the server call
        :meth:`restart` (in a worker thread) before the tenant's next request."""
        return True

    def restart(self) -> VirtioFS:
        """A fresh share replacing a dead one (blocking; called in a worker thread)."""
        raise OSError(errno.ENOTCONN, "this share cannot be restarted")


@dataclass(eq=False)
class _Client:
    identity: bytes
    tenant: Tenant
    last_seen: float
    handles: dict[int, tuple[Any, bool, int]] = field(default_factory=dict)
    # handle id -> (actor ref, is_dir, tenant generation it was opened in)
    deferred: collections.deque[_Pending] = field(default_factory=collections.deque)


@dataclass(slots=True)
class _Pending:
    """A request admitted but waiting in its tenant's queue."""

    client: _Client
    request_id: int
    op: Any
    handle: int
    cost: int  # bytes charged to bytes_in_flight
    sched: int = 0  # what the scheduler charges: BASE_COST + bytes
    bulk: bool = False
    seq: int = 0  # arrival order


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
    bulk: int = 0  # bytes it holds in the pipeline window while it executes


@dataclass(eq=False)
class _Outbound:
    """Replies to one connection that ZeroMQ still holds: (tracker, bytes) in send order.
    Small replies go untracked and are charged with the next tracked one (ZeroMQ writes
    a connection's messages in order), at most UNTRACKED_BYTES of them at a time."""

    tenant: Tenant
    entries: collections.deque[tuple[Any, int]] = field(
        default_factory=collections.deque)  # (tracker, bytes)
    untracked: int = 0
    total: int = 0


@dataclass(eq=False)
class _Lanes:
    """A tenant's waiting requests: small ones and bulk ones (reads and writes of
    BULK_BYTES or more), and its deficit for the round robin. A handle op waits in the
    bulk lane while a bulk request of the same handle is queued (its order is kept)."""

    tenant: Tenant
    small: collections.deque[_Pending] = field(default_factory=collections.deque)
    bulk: collections.deque[_Pending] = field(default_factory=collections.deque)
    bulk_handles: collections.Counter[int] = field(default_factory=collections.Counter)
    deficit: int = 0

    def __len__(self) -> int:
        return len(self.small) + len(self.bulk)


class _Bucket:
    """A token bucket (for refusals that are not tied to a tenant)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = time.monotonic()

    def take(self, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


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
    """Bytes a request holds while in flight (what ``bytes_in_flight`` limits): a Write
    its payload; a Read twice its size (its pieces and the whole they are joined into)."""
    if isinstance(op, m.Read):
        return 2 * op.size
    if isinstance(op, m.Write):
        return len(body[1]) if len(body) > 1 else 0
    return 0


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
        self.max_bytes_in_flight = max_bytes_in_flight
        self.max_clients = max_clients
        self.pipeline_window = pipeline_window
        self.contended_bulk_rate = contended_bulk_rate
        self._small_at: dict[int, float] = {}  # id(tenant) -> its last small request
        self._pace_tokens = 0.0
        self._pace_at = time.monotonic()
        self._paced_until = 0.0  # when the pacing next lets a bulk request go
        self.handshake_timeout = handshake_timeout
        self.endpoints: list[str] = []
        self._clients: dict[bytes, _Client] = {}
        self._done: collections.deque[_Reply] = collections.deque()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._lanes: dict[int, _Lanes] = {}  # id(tenant) -> its waiting requests
        self._round_robin: collections.deque[int] = collections.deque()
        self._outbound: dict[bytes, _Outbound] = {}
        self._tracking: set[bytes] = set()  # connections with tracked replies not yet gone
        self._waiting: set[bytes] = set()  # connections with deferred requests
        self._released: collections.deque[_Client] = collections.deque()
        self._wake = Doorbell()
        self._stop = threading.Event()
        self._drain_until: float | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.requests_served = 0
        self.malformed = 0
        self.bytes_in_flight = 0  # over all tenants
        self.pipeline_bytes = 0  # bulk bytes executing
        self._tracked = 0  # replies tracked until they have left
        self._copies = 1  # copies of a reply in memory until it has left (2 with CURVE)
        self._seq = 0
        self._refused: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._refusals = _Bucket(200.0)  # answers to peers with no tenant, per second

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
                "malformed": self.malformed, "bytes_in_flight": self.bytes_in_flight,
                "pipeline_bytes": self.pipeline_bytes}

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

    def _configure(self, sock: zmq.Socket[Any]) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # drop replies to vanished clients
        # Guard memory: a frame bigger than a request can be is refused by ZeroMQ itself
        # (the peer is disconnected); below it, oversize is answered with an error reply.
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        sock.setsockopt(zmq.SNDHWM, SNDHWM)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        # A peer that connects and never completes the greeting and handshake is dropped.
        sock.setsockopt(zmq.HANDSHAKE_IVL, max(1, int(self.handshake_timeout * 1000)))
        # ZMTP heartbeats: a peer that stops answering (killed host, stopped process) is
        # disconnected by ZeroMQ, which frees its connection.
        ivl = max(100, int(min(self.heartbeat_timeout / 3, 2.0) * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(ivl, int(self.heartbeat_timeout * 1000)))
        if self.configure_socket is not None:
            self.configure_socket(sock)

    def _run(self) -> None:
        sock: zmq.Socket[Any] | None = None
        try:
            sock = self.context.socket(zmq.ROUTER)
            self._configure(sock)
            self._copies = 2 if sock.getsockopt(zmq.CURVE_SERVER) else 1
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
                if self._tracked:  # trackers complete without waking us: look again soon
                    timeout = min(timeout, 0.01)
                if self._paced_until:
                    timeout = min(timeout, max(0.0, self._paced_until - time.monotonic()))
                events = dict(poller.poll(timeout * 1000))
                if events.get(self._wake.fileno()):
                    self._wake.drain()
                self._run_calls()
                self._reap()
                self._send_completed(sock)
                if events.get(sock):
                    self._receive(sock)
                self._undefer(sock)
                self._pump(sock)
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + SWEEP_INTERVAL
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
        if self._done or any(self._lanes.values()):
            return False
        return all(c.tenant.stats.requests_in_flight == 0 and not c.deferred
                   for c in self._clients.values())

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

    def _take_token(self, tenant: Tenant, now: float, closing: bool = False) -> int:
        """Charge one message to the tenant's rate: 1 admitted, 0 refused (answer EAGAIN),
        -1 beyond what refusals may cost (drop it unanswered), 2 over the rate but looks
        like a Close (admitted if it is one)."""
        rate = tenant.limits.requests_per_second
        stats = tenant.stats
        stats._rate_count += 1
        if rate is None:
            return 1
        burst = max(rate, 1.0)
        refusals = max(REFUSALS_PER_RATE * rate, MIN_REFUSALS)
        if stats._tokens < 0 and stats._tokens_at == 0.0:
            stats._tokens, stats._refusals = burst, refusals
        elapsed = now - stats._tokens_at
        stats._tokens_at = now
        stats._tokens = min(burst, stats._tokens + elapsed * rate)
        stats._refusals = min(refusals, stats._refusals + elapsed * refusals)
        if stats._tokens >= 1.0:
            stats._tokens -= 1.0
            return 1
        if closing:
            stats._tokens = max(stats._tokens - 1.0, -burst)
            return 2
        if stats._refusals >= 1.0:
            stats._refusals -= 1.0
            return 0
        return -1

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
            refusal = self._over_connections(tenant)
            if refusal is not None:
                if self._take_token(tenant, now) >= 0 and self._refusals.take(now):
                    self._reply(sock, identity, _peek_id([f.buffer for f in frames[1:]]),
                                error=wire.WireError(errno.EUSERS, refusal))
                else:
                    tenant.stats.dropped += 1
                return
            client = self._clients[identity] = _Client(identity, tenant, now)
            tenant.stats.clients += 1
            self._event("connect", tenant, "client %s connected (tenant %s)",
                        identity.hex()[:8], tenant.name, client=identity.hex()[:8])
        client.last_seen = now
        tenant = client.tenant
        body = [f.buffer for f in frames[1:]]
        verdict = self._take_token(tenant, now, closing=_is_close(body))
        if verdict < 0:
            tenant.stats.dropped += 1
            return
        if verdict == 0:
            self._note_rejection(tenant, errno.EAGAIN)
            self._reply(sock, identity, _peek_id(body), error=wire.WireError(
                errno.EAGAIN, "tenant limit reached: requests per second"))
            return
        try:
            header = wire.decode_request(body)
        except wire.WireFormatError as exc:
            self.malformed += 1
            request_id = _peek_id(body)
            self._error_reply(sock, client, request_id, None, exc)
            return
        op = header.op
        if verdict == 2 and not isinstance(op, m.Close):
            self._note_rejection(tenant, errno.EAGAIN)
            self._reply(sock, identity, header.id, error=wire.WireError(
                errno.EAGAIN, "tenant limit reached: requests per second"))
            return
        self.requests_served += 1
        try:
            if isinstance(op, wire.Ping):
                self._reply(sock, identity, header.id)
            elif isinstance(op, wire.Bye):
                self._drop(client, "said goodbye")
                self._reply(sock, identity, header.id)
            elif self._drain_until is not None:
                raise OSError(errno.ESHUTDOWN, "the server is shutting down")
            else:
                op = tenant.admit(op)
                if isinstance(op, m.Write):
                    op = msgspec.structs.replace(op, data=body[1])
                self._admit(client, header.id, op, header.handle, _cost(op, body))
        except Exception as exc:
            self._error_reply(sock, client, header.id, op, exc)

    def _over_connections(self, tenant: Tenant) -> str | None:
        cap = tenant.limits.connections
        if cap is not None and tenant.stats.clients >= cap:
            self._note_rejection(tenant, errno.EUSERS)
            return f"tenant limit reached: {cap} connections"
        if self.max_clients is not None and len(self._clients) >= self.max_clients:
            self._note_rejection(tenant, errno.EUSERS)
            return "the server has too many connections"
        return None

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
        if tenant is not None:
            tenant.stats._rate_count += 1
        if not self._refusals.take(time.monotonic()):
            return  # a flood of refused messages is not worth an answer each
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

    def _note_rejection(self, tenant: Tenant, code: int) -> None:
        name = errno.errorcode.get(code, str(code))
        tenant.stats.rejected[name] = tenant.stats.rejected.get(name, 0) + 1

    def _reject(self, tenant: Tenant, code: int, what: str) -> OSError:
        self._note_rejection(tenant, code)
        return OSError(code, f"tenant limit reached: {what}")

    # -- admission, queues and dispatch -------------------------------------------------------

    def _admit(self, client: _Client, request_id: int, op: Any, handle: int, cost: int) -> None:
        """Check the tenant's limits, charge the request, then queue it (or let it wait
        behind its connection's unsent replies)."""
        tenant = client.tenant
        stats, limits = tenant.stats, tenant.limits
        if isinstance(op, wire.HANDLE_OPS) and handle not in client.handles:
            raise OSError(errno.EBADF, "no such handle on this connection")
        closing = isinstance(op, m.Close)  # never refused: a refused Close would leak
        if (limits.open_handles is not None and isinstance(op, _OPEN_OPS)
                and stats.open_handles + stats.pending_opens >= limits.open_handles):
            raise self._reject(tenant, errno.EMFILE, "open handles")
        if cost and not closing:
            if (limits.bytes_in_flight is not None and stats.bytes_in_flight
                    and stats.bytes_in_flight + cost > limits.bytes_in_flight):
                raise self._reject(tenant, errno.EAGAIN, "bytes in flight")
            if (self.max_bytes_in_flight is not None and self.bytes_in_flight
                    and self.bytes_in_flight + cost > self.max_bytes_in_flight):
                raise self._reject(tenant, errno.EAGAIN, "the server's bytes in flight")
        lanes = self._lanes.get(id(tenant))
        if (lanes is not None and len(lanes) + stats.deferred >= limits.max_queued
                and not closing):
            raise self._reject(tenant, errno.EAGAIN, "requests queued")
        if len(client.deferred) >= MAX_DEFERRED and not closing:
            raise self._reject(tenant, errno.EAGAIN, "replies are not being read")
        stats.requests += 1
        self._charge(tenant, cost)
        if isinstance(op, _OPEN_OPS):
            stats.pending_opens += 1
        bulk = cost >= BULK_BYTES
        if not bulk and not closing:
            self._small_at[id(tenant)] = time.monotonic()
        self._seq += 1
        pending = _Pending(client, request_id, op, handle, cost, BASE_COST + cost, bulk,
                           self._seq)
        if client.deferred or self._backed_up(client):
            self._defer(pending)  # its replies are not leaving: wait for them
            return
        self._enqueue(pending)

    def _defer(self, pending: _Pending) -> None:
        pending.client.deferred.append(pending)
        pending.client.tenant.stats.deferred += 1
        self._waiting.add(pending.client.identity)

    def _backed_up(self, client: _Client) -> bool:
        """Whether a connection's replies are piling up unsent (it is not reading)."""
        out = self._outbound.get(client.identity)
        return out is not None and out.total > CONNECTION_UNSENT_LIMIT

    def _charge(self, tenant: Tenant, nbytes: int) -> None:
        tenant.stats.bytes_in_flight += nbytes
        self.bytes_in_flight += nbytes

    def _enqueue(self, pending: _Pending) -> None:
        tenant = pending.client.tenant
        key = id(tenant)
        lanes = self._lanes.get(key)
        if lanes is None:
            lanes = self._lanes[key] = _Lanes(tenant)
        if not lanes:
            self._round_robin.append(key)
        if pending.bulk or (pending.handle and pending.handle in lanes.bulk_handles):
            _insert(lanes.bulk, pending)
            if pending.handle:
                lanes.bulk_handles[pending.handle] += 1
        else:
            _insert(lanes.small, pending)
        tenant.stats.queued += 1

    def _undefer(self, sock: zmq.Socket[Any]) -> None:
        """Connections whose replies have left (or were dropped) are served again."""
        for identity in list(self._waiting):
            client = self._clients.get(identity)
            if client is None or not client.deferred:
                self._waiting.discard(identity)
                continue
            if self._backed_up(client):
                continue
            self._waiting.discard(identity)
            while client.deferred:
                pending = client.deferred.popleft()
                client.tenant.stats.deferred -= 1
                self._enqueue(pending)

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

    def _window_allows(self, pending: _Pending) -> bool:
        window = self.pipeline_window
        if not (window is None or not self.pipeline_bytes
                or self.pipeline_bytes + pending.cost <= window):
            return False
        return self._paced(pending)

    def _paced(self, pending: _Pending) -> bool:
        """Whether the pacing of bulk bytes lets ``pending`` go now (it does when no
        other tenant's small requests are being served)."""
        rate = self.contended_bulk_rate
        if rate is None:
            return True
        now = time.monotonic()
        burst = float(max(rate // 8, BULK_BYTES))
        self._pace_tokens = min(burst, self._pace_tokens + (now - self._pace_at) * rate)
        self._pace_at = now
        if not self._contended(pending, now):
            self._paced_until = 0.0
            return True
        if self._pace_tokens <= 0:
            self._paced_until = now - self._pace_tokens / rate + 0.001
            return False
        self._paced_until = 0.0
        return True

    def _contended(self, pending: _Pending, now: float) -> bool:
        """Whether another tenant's small requests are being served."""
        me = id(pending.client.tenant)
        return any(t != me and now - at < CONTENTION_WINDOW for t, at in self._small_at.items())

    def _spend_pacing(self, pending: _Pending) -> None:
        rate = self.contended_bulk_rate
        if rate is not None and self._contended(pending, time.monotonic()):
            # (a debt of at most one second: one huge request does not stop the rest long)
            self._pace_tokens = max(self._pace_tokens - pending.cost, -float(rate))

    def _next(self, lanes: _Lanes) -> collections.deque[_Pending] | None:
        """The lane whose head goes next: the older head, except that a bulk head waits
        while the pipeline window is full (small requests then pass it)."""
        small, bulk = lanes.small, lanes.bulk
        if bulk and self._window_allows(bulk[0]):
            if not small or bulk[0].seq < small[0].seq:
                return bulk
        return small if small else None

    def _pump(self, sock: zmq.Socket[Any]) -> None:
        """Dispatch waiting requests: deficit round robin over the tenants by cost (a
        request costs BASE_COST plus its bytes; a tenant earns QUANTUM per round while its
        next request costs more than it has)."""
        again = True
        while again and self._round_robin:
            again = False
            for _ in range(len(self._round_robin)):
                key = self._round_robin.popleft()
                lanes = self._lanes.get(key)
                if lanes is None or not lanes:
                    self._lanes.pop(key, None)
                    continue
                tenant = lanes.tenant
                while lanes and self._can_dispatch(tenant):
                    lane = self._next(lanes)
                    if lane is None:
                        break
                    pending = lane[0]
                    if pending.sched > lanes.deficit:
                        lanes.deficit += QUANTUM  # one quantum per round it waits
                        again = True
                        break
                    lane.popleft()
                    if lane is lanes.bulk and pending.handle:
                        lanes.bulk_handles[pending.handle] -= 1
                        if lanes.bulk_handles[pending.handle] <= 0:
                            del lanes.bulk_handles[pending.handle]
                    tenant.stats.queued -= 1
                    again = True
                    if self._backed_up(pending.client):
                        self._defer(pending)  # its replies must leave first
                        continue
                    if lane is lanes.bulk:
                        self._spend_pacing(pending)
                    lanes.deficit -= pending.sched
                    try:
                        self._dispatch(pending)
                    except Exception as exc:
                        self._error_reply(sock, pending.client, pending.request_id,
                                          pending.op, exc)
                if lanes:
                    self._round_robin.append(key)
                else:
                    lanes.deficit = 0
                    self._lanes.pop(key, None)

    def _uncharge(self, tenant: Tenant, op: Any, cost: int) -> None:
        self._charge(tenant, -cost)
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
        bulk = pending.cost if pending.bulk else 0
        reply = _Reply(client, pending.request_id, op, handle, pending.cost,
                       tenant.stats.generation, bulk=bulk)
        self.pipeline_bytes += bulk
        tenant.stats.requests_in_flight += 1
        try:
            reply.future = tenant.execute(ref, op)
        except Exception as exc:
            reply.future = failed(exc)
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
        lanes = self._lanes.pop(id(tenant), None)
        if lanes is None:
            return
        with contextlib.suppress(ValueError):
            self._round_robin.remove(id(tenant))
        for pending in (*lanes.small, *lanes.bulk):
            tenant.stats.queued -= 1
            tenant.stats.requests_in_flight += 1
            self._completed(_Reply(pending.client, pending.request_id, pending.op,
                                   pending.handle, pending.cost, future=failed(exc)))

    # -- completions (any thread → server thread) --------------------------------------------

    def _completed(self, reply: _Reply) -> None:
        self._done.append(reply)
        self._poke()

    def _send_completed(self, sock: zmq.Socket[Any]) -> None:
        if not self._done:
            return
        # Replies go out round-robin over tenants: a tenant with many completions at once
        # does not hold another's reply back behind all of its own.
        by_tenant: dict[int, collections.deque[_Reply]] = {}
        while self._done:
            reply = self._done.popleft()
            by_tenant.setdefault(id(reply.client.tenant), collections.deque()).append(reply)
        queues = list(by_tenant.values())
        while queues:
            for queue in queues:
                self._send_one(sock, queue.popleft())
            queues = [q for q in queues if q]

    def _send_one(self, sock: zmq.Socket[Any], reply: _Reply) -> None:
        assert reply.future is not None
        client = reply.client
        tenant = client.tenant
        tenant.stats.requests_in_flight -= 1
        op = reply.op
        self._uncharge(tenant, op, reply.cost)
        self.pipeline_bytes -= reply.bulk
        value, exc = reply.future.result_or_error()
        if exc is not None:
            self._error_reply(sock, client, reply.request_id, op, exc)
            return
        data: Any = None
        if isinstance(op, m.Read):
            value, data = None, value
        elif isinstance(op, _OPEN_OPS):
            value = self._register(client, op, value, reply.generation)
            if value is None:
                return
            if isinstance(value, OSError):
                self._error_reply(sock, client, reply.request_id, op, value)
                return
        self._reply(sock, client.identity, reply.request_id, value, data=data, tenant=tenant)

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

    # -- replies, and the bytes they hold until they have left ------------------------------

    def _reply(self, sock: zmq.Socket[Any], identity: bytes, request_id: int, value: Any = None,
               *, error: wire.WireError | None = None, data: Any = None,
               tenant: Tenant | None = None) -> None:
        header = wire.encode_reply(request_id, value, error)
        size = len(header) + (len(data) if data is not None else 0)
        if tenant is None:
            client = self._clients.get(identity)
            tenant = client.tenant if client is not None else None
        out = self._outbound.get(identity)
        tracked = tenant is not None and (
            size >= TRACK_BYTES or (out is not None and out.untracked + size > UNTRACKED_BYTES))
        try:
            if not tracked:
                frames: list[Any] = [identity, header] if data is None else [identity, header,
                                                                             data]
                sock.send_multipart(frames, copy=True)
                if out is not None:
                    out.untracked += size
                elif tenant is not None:
                    self._outbound[identity] = _Outbound(tenant, untracked=size)
                return
            assert tenant is not None
            last = zmq.Frame(data if data is not None else header, copy=False, track=True)
            sock.send(identity, zmq.SNDMORE)
            if data is not None:
                sock.send(header, zmq.SNDMORE)
            tracker = sock.send(last, copy=False, track=True)
        except zmq.ZMQError as exc:
            log.debug("reply to %s dropped: %s", identity.hex()[:8], exc)
            return
        if out is None:
            out = self._outbound[identity] = _Outbound(tenant)
        # On an encrypted connection ZeroMQ holds an encrypted copy besides ours.
        charged = size * self._copies + out.untracked  # (small ones before it leave first)
        out.untracked = 0
        out.entries.append((tracker, charged))
        out.total += charged
        self._tracked += 1
        self._tracking.add(identity)
        tenant.stats.unsent_bytes += charged
        self._charge(tenant, charged)

    def _reap(self) -> None:
        """Uncharge the replies ZeroMQ has finished with (sent, or dropped)."""
        for identity in list(self._tracking):
            out = self._outbound.get(identity)
            if out is None:
                self._tracking.discard(identity)
                continue
            entries = out.entries
            while entries and entries[0][0].done:
                _, charged = entries.popleft()
                out.total -= charged
                self._tracked -= 1
                out.tenant.stats.unsent_bytes -= charged
                self._charge(out.tenant, -charged)
            if not entries:
                self._tracking.discard(identity)
                if out.untracked == 0 or identity not in self._clients:
                    del self._outbound[identity]

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
        for lanes in self._lanes.values():
            if id(lanes.tenant.stats) not in seen:
                seen.add(id(lanes.tenant.stats))
                _update_rate(lanes.tenant.stats, now)
        for key, at in list(self._small_at.items()):
            if now - at > CONTENTION_WINDOW:
                del self._small_at[key]
        for identity, out in list(self._outbound.items()):
            if not out.entries:  # an idle connection's small replies have long left
                del self._outbound[identity]

    def _drop(self, client: _Client, why: str) -> None:
        """Forget a connection and release its handles (the actors send RELEASE)."""
        if self._clients.pop(client.identity, None) is None:
            return
        tenant = client.tenant
        tenant.stats.clients -= 1
        while client.deferred:
            pending = client.deferred.popleft()
            tenant.stats.deferred -= 1
            self._uncharge(tenant, pending.op, pending.cost)
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


def _insert(lane: collections.deque[_Pending], pending: _Pending) -> None:
    """Queue ``pending`` in arrival order (requests let out of a connection's wait are
    older than some already queued)."""
    if not lane or lane[-1].seq < pending.seq:
        lane.append(pending)
        return
    i = len(lane)
    while i > 0 and lane[i - 1].seq > pending.seq:
        i -= 1
    lane.insert(i, pending)


def _update_rate(stats: TenantStats, now: float) -> None:
    elapsed = now - stats._rate_since
    if elapsed >= 1.0:
        stats.request_rate = stats._rate_count / elapsed
        stats._rate_count = 0
        stats._rate_since = now


_CLOSE_TAG = b"\xa5Close"  # msgpack of the tag "Close", as a Close request header holds it


def _is_close(body: list[Any]) -> bool:
    """Whether a (not yet decoded) request looks like a Close: it is never refused for
    the rate, so a client over its rate can still release what it holds."""
    return bool(body) and len(body[0]) < 64 and _CLOSE_TAG in bytes(body[0])


def _peek_id(frames: list[Any]) -> int:
    """The request id of a malformed request, if its header still has one (else 0)."""
    if not frames:
        return 0
    try:
        head = msgspec.msgpack.decode(frames[0])
    except Exception:  # any garbage: msgspec raises several kinds (RecursionError too)
        return 0
    if isinstance(head, list) and head and type(head[0]) is int:  # a bool is no id
        return head[0] if 0 <= head[0] < 1 << 63 else 0
    return 0
