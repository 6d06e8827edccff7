"""The ZeroMQ share server: remote clients reach a share's actors through one ROUTER socket.

One thread owns the socket (ZeroMQ sockets are not thread-safe). It never blocks on an
actor: each request is put in the target actor's inbox with a :class:`_ReplyFuture`, and
when the actor completes it, the future queues itself and pokes an eventfd the server
thread polls beside the socket. So one slow request never holds up another, and many
requests per client can be outstanding, matched by id.

Open handles are server-side actors owned by the client connection (the ROUTER routing
id): handle ids are random 62-bit numbers, checked against the connection, and released
when the client says Bye, stops heart-beating, or the server stops.

Which share serves a connection, and with which credentials, is the :class:`Tenant`'s
business: a plain server has one tenant; the multi-tenant agent maps each authenticated
client to its own.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pykka
import zmq
from pykka._envelope import Envelope

from api.local import VirtioFS
from codec import messages as m
from codec import wire

log = logging.getLogger(__name__)

__all__ = ["ShareServer", "Tenant"]

DEFAULT_HEARTBEAT_TIMEOUT = 10.0
_DIR_OPS = (m.ReadDir, m.Rewind, m.FSyncDir)


@dataclass
class Tenant:
    """Who is served and how: the share, and whether clients' credentials are believed.

    ``credentials``: None trusts what each client sends (a single-user tool); a tuple
    forces those credentials on every request (what an agent does for its tenants)."""

    name: str
    fs: VirtioFS
    trust_client_credentials: bool = True
    credentials: m.Credentials | None = None

    def admit(self, op: Any) -> Any:
        """The message as it will be executed for this tenant (credentials applied).

        Raises OSError to refuse it."""
        if self.trust_client_credentials:
            return op
        return msgspec.structs.replace(op, ctx=self.credentials)


@dataclass
class _Client:
    identity: bytes
    tenant: Tenant
    last_seen: float
    handles: dict[int, tuple[Any, bool]] = field(default_factory=dict)  # id -> (ref, is_dir)


class _ReplyFuture(pykka.ThreadingFuture[Any]):
    """A pykka future that, once completed by an actor, queues itself for the server."""

    def __init__(self, server: ShareServer, client: _Client, request_id: int, op: Any,
                 handle: int) -> None:
        super().__init__()
        self.server = server
        self.client = client
        self.request_id = request_id
        self.op = op
        self.handle = handle

    def set(self, value: Any | None = None) -> None:
        super().set(value)
        self.server._completed(self)

    def set_exception(self, exc_info: Any = None) -> None:
        super().set_exception(exc_info)
        self.server._completed(self)


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


class ShareServer:
    """Serve tenants' shares on ZeroMQ endpoints (``tcp://`` and ``ipc://``).

    ``tenant_of(identity, frame)`` picks the tenant of a new connection (None refuses);
    the default serves everyone the single ``tenant``. ``configure_socket`` may set
    socket options before binding (CURVE keys, ZAP domain).
    """

    def __init__(self, bind: str | list[str], *, tenant: Tenant | None = None,
                 tenant_of: Any = None, heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
                 context: zmq.Context[Any] | None = None, configure_socket: Any = None) -> None:
        if tenant is None and tenant_of is None:
            raise TypeError("ShareServer needs a tenant or a tenant_of function")
        self.endpoints_requested = [bind] if isinstance(bind, str) else list(bind)
        self.default_tenant = tenant
        self.tenant_of = tenant_of or (lambda identity, frame: tenant)
        self.heartbeat_timeout = heartbeat_timeout
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.configure_socket = configure_socket
        self.endpoints: list[str] = []
        self._clients: dict[bytes, _Client] = {}
        self._done: collections.deque[_ReplyFuture] = collections.deque()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.requests_served = 0
        self.malformed = 0

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

    def stop(self) -> None:
        """Release every client's handles, close the socket, stop the thread."""
        self._stop.set()
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def __enter__(self) -> ShareServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Clients, open handles per tenant (read without locking: a snapshot for status)."""
        per_tenant: dict[str, dict[str, int]] = {}
        for client in list(self._clients.values()):
            t = per_tenant.setdefault(client.tenant.name, {"clients": 0, "handles": 0})
            t["clients"] += 1
            t["handles"] += len(client.handles)
        return {"tenants": per_tenant, "requests": self.requests_served,
                "malformed": self.malformed}

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
        poller.register(self._wake, zmq.POLLIN)
        next_sweep = time.monotonic() + 1.0
        try:
            while not self._stop.is_set():
                timeout = max(0.0, next_sweep - time.monotonic())
                events = dict(poller.poll(timeout * 1000))
                if events.get(self._wake):
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(self._wake)
                self._send_completed(sock)
                if events.get(sock):
                    self._receive(sock)
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + 1.0
        finally:
            for client in list(self._clients.values()):
                self._drop(client, "server stopping")
            self._send_completed(sock)
            sock.close(0)
            if self._own_context:
                self.context.term()
            with contextlib.suppress(OSError):
                os.close(self._wake)

    def _receive(self, sock: zmq.Socket[Any]) -> None:
        """Take every request waiting on the socket (bounded, so replies go out too)."""
        for _ in range(256):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(sock, frames)

    def _handle(self, sock: zmq.Socket[Any], frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        client = self._clients.get(identity)
        if client is None:
            tenant = self.tenant_of(identity, frames[-1])
            if tenant is None:
                log.warning("refusing a client with no tenant")
                return
            client = self._clients[identity] = _Client(identity, tenant, time.monotonic())
            log.info("client %s connected (tenant %s)", identity.hex()[:8], tenant.name)
        client.last_seen = time.monotonic()
        body = [f.buffer for f in frames[1:]]
        try:
            header = wire.decode_request(body)
        except wire.WireFormatError as exc:
            self.malformed += 1
            request_id = _peek_id(body)
            self._reply(sock, identity, request_id, error=_wire_error(exc))
            return
        self.requests_served += 1
        op = header.op
        try:
            if isinstance(op, wire.Ping):
                self._reply(sock, identity, header.id)
            elif isinstance(op, wire.Bye):
                self._drop(client, "said goodbye")
                self._reply(sock, identity, header.id)
            else:
                op = client.tenant.admit(op)
                if isinstance(op, m.Write):
                    op = msgspec.structs.replace(op, data=body[1])
                self._dispatch(client, header.id, op, header.handle)
        except Exception as exc:
            self._reply(sock, identity, header.id, error=_wire_error(exc))

    def _dispatch(self, client: _Client, request_id: int, op: Any, handle: int) -> None:
        if isinstance(op, wire.HANDLE_OPS):
            entry = client.handles.get(handle)
            if entry is None:
                raise OSError(errno.EBADF, "no such handle on this connection")
            ref, is_dir = entry
            if isinstance(op, m.Close):
                del client.handles[handle]
            elif is_dir != isinstance(op, _DIR_OPS):
                raise OSError(errno.EBADF, "wrong kind of handle for this operation")
        else:
            ref = client.tenant.fs.session
        future = _ReplyFuture(self, client, request_id, op, handle)
        if not ref.is_alive():
            raise OSError(errno.EBADF if isinstance(op, wire.HANDLE_OPS) else errno.ENOTCONN,
                          "the actor serving this request is gone")
        ref.actor_inbox.put(Envelope(op, reply_to=future))

    # -- completions (any thread → server thread) --------------------------------------------

    def _completed(self, future: _ReplyFuture) -> None:
        self._done.append(future)
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)

    def _send_completed(self, sock: zmq.Socket[Any]) -> None:
        while self._done:
            future = self._done.popleft()
            client = future.client
            try:
                value = future.get(timeout=0)
            except Exception as exc:
                self._reply(sock, client.identity, future.request_id, error=_wire_error(exc))
                continue
            op = future.op
            data: Any = None
            if isinstance(op, m.Read):
                value, data = None, value
            elif isinstance(op, (m.Open, m.OpenDir)):
                value = self._register(client, op, value)
                if value is None:
                    continue
            self._reply(sock, client.identity, future.request_id, value, data=data)

    def _register(self, client: _Client, op: Any, opened: Any) -> wire.RemoteHandle | None:
        """Give a newly opened handle actor an id on the client's connection."""
        ref = opened.actor
        if self._clients.get(client.identity) is not client:
            ref.stop(block=False)  # the client left while its open was in flight
            return None
        handle = secrets.randbits(62) | 1
        while handle in client.handles:
            handle = secrets.randbits(62) | 1
        is_dir = isinstance(op, m.OpenDir)
        client.handles[handle] = (ref, is_dir)
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

    def _drop(self, client: _Client, why: str) -> None:
        """Forget a connection and release its handles (the actors send RELEASE)."""
        self._clients.pop(client.identity, None)
        for ref, _ in client.handles.values():
            with contextlib.suppress(Exception):
                ref.stop(block=False)
        log.info("client %s %s; released %d handles (tenant %s)", client.identity.hex()[:8],
                 why, len(client.handles), client.tenant.name)
        client.handles.clear()


def _peek_id(frames: list[Any]) -> int:
    """The request id of a malformed request, if its header still has one (else 0)."""
    if not frames:
        return 0
    try:
        head = msgspec.msgpack.decode(frames[0])
    except (msgspec.DecodeError, ValueError):
        return 0
    if isinstance(head, list) and head and isinstance(head[0], int):
        return head[0] if 0 <= head[0] < 1 << 63 else 0
    return 0
