"""The remote client: the same ``os``-style API as in-process, over ZeroMQ.

    from pyvirtiofs.api import connect_remote
    with connect_remote("tcp://127.0.0.1:5555") as fs:
        print(fs.listdir("/"))

One I/O thread owns the DEALER socket (ZeroMQ sockets are not thread-safe); any number of
caller threads hand it requests through a queue and an eventfd, and wait for their own
reply, matched by id — so many requests can be outstanding per client. Every request has
a timeout. The I/O thread also sends heartbeats, which keep the server from releasing our
open handles, and says Bye on close.

A server that dies is noticed within ``dead_after`` seconds (1.5 by default), whatever
it was doing: ZeroMQ's own heartbeats (ZMTP PING/PONG, answered by the server's I/O
thread, so a busy server is never mistaken for a dead one, and any traffic counts) close
a connection that goes silent — a killed host, a stopped process — and a killed process
closes it at once. A socket monitor tells the I/O thread, which fails every pending call
with ``ENOTCONN``; calls made while the connection is down fail at once with
``ENOTCONN`` too, until ZeroMQ has reconnected (a restarted server at the same endpoint
is reached again; handles opened before are gone with the old server).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.utils.monitor

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.doorbell import Doorbell
from pyvirtiofs.api.fs import ShareFS
from pyvirtiofs.api.remote import wire

__all__ = ["CurveKeys", "RemoteFS", "connect_remote"]


@dataclass(frozen=True)
class CurveKeys:
    """A client's CURVE key pair and the server's public key (Z85 text, as zmq makes)."""

    public: bytes
    secret: bytes
    server_public: bytes


DEAD_AFTER = 1.5  # seconds of silence after which the server is taken for dead


def connect_remote(endpoint: str, *, timeout: float = 60.0, heartbeat_interval: float = 2.0,
                   curve: CurveKeys | None = None, send_credentials: bool = True,
                   dead_after: float = DEAD_AFTER) -> RemoteFS:
    """Connect to a ``pyvirtiofs serve`` (or agent) endpoint; returns a :class:`RemoteFS`.

    ``send_credentials``: send this process's uid/gid/pid with each request (the server
    decides whether to believe them). ``heartbeat_interval``: how often the server is told
    we are alive (it releases our handles after its own timeout). ``dead_after``: how long
    the server may be silent before pending calls fail with ``ENOTCONN``."""
    return RemoteFS(endpoint, timeout=timeout, heartbeat_interval=heartbeat_interval,
                    curve=curve, send_credentials=send_credentials, dead_after=dead_after)


class _Call:
    __slots__ = ("data", "done", "header", "lost", "op", "unreachable")

    def __init__(self, op: Any) -> None:
        self.op = op
        self.done = threading.Event()
        self.header: wire.ReplyHeader | None = None
        self.data: Any = None
        self.unreachable = False
        self.lost: str | None = None  # why the connection went away before the reply


def _raise(error: wire.WireError, name: str | None) -> None:
    f1 = os.fsdecode(error.filename) if error.filename is not None else name
    f2 = os.fsdecode(error.filename2) if error.filename2 is not None else None
    raise OSError(error.errno, error.strerror, f1, None, f2)


class RemoteFS(ShareFS):
    """A share on a server, reached over ZeroMQ. Thread-safe."""

    def __init__(self, endpoint: str, *, timeout: float = 60.0, heartbeat_interval: float = 2.0,
                 curve: CurveKeys | None = None, send_credentials: bool = True,
                 dead_after: float = DEAD_AFTER) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self.heartbeat_interval = heartbeat_interval
        self.dead_after = dead_after
        self._down: str | None = None  # why the connection is down (None: up, or not yet)
        self._connected = False  # a handshake completed since the last disconnect
        self.curve = curve
        self.ctx = (os.geteuid(), os.getegid(), os.getpid()) if send_credentials else None
        self._ids = itertools.count(1)
        self._pending: dict[int, _Call] = {}
        self._outbox: collections.deque[tuple[int, list[Any]]] = collections.deque()
        self._wake = Doorbell()
        self._closing = threading.Event()
        self._context = zmq.Context()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._owner = True
        self._thread = threading.Thread(target=self._run, name="RemoteFS-io", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._context.term()
            raise self._error

    # -- the I/O thread ----------------------------------------------------------------------

    def _run(self) -> None:
        monitor: zmq.Socket[Any] | None = None
        try:
            sock = self._context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTING_ID, secrets.token_bytes(16))
            # ZMTP heartbeats: a PING every ivl; no traffic at all for `timeout` after one
            # and ZeroMQ closes the connection (the monitor below hears of it).
            ivl = max(50, int(self.dead_after * 1000 / 3))
            # No receive high-water mark: libzmq 4.3 aborts when its heartbeat timer fires
            # on a connection whose input stopped at the mark. What we receive is bounded
            # by what we asked for (replies to our own requests).
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(ivl, int(self.dead_after * 1000) - ivl))
            if self.curve is not None:
                sock.curve_publickey = self.curve.public
                sock.curve_secretkey = self.curve.secret
                sock.curve_serverkey = self.curve.server_public
            monitor = sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
            sock.connect(self.endpoint)
        except BaseException as exc:
            if monitor is not None:
                monitor.close(0)
            self._error = OSError(errno.EINVAL, f"cannot connect to {self.endpoint}: {exc}")
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        poller.register(self._wake.fileno(), zmq.POLLIN)
        next_ping = time.monotonic()
        try:
            while not self._closing.is_set() or self._outbox:
                now = time.monotonic()
                if now >= next_ping:
                    # Never block the I/O thread: with no connection (or a failed CURVE
                    # handshake) ZeroMQ would hold the send forever.
                    with contextlib.suppress(zmq.Again):
                        sock.send(wire.encode_request(0, wire.Ping()), zmq.NOBLOCK)
                    next_ping = now + self.heartbeat_interval
                events = dict(poller.poll(max(0.0, next_ping - now) * 1000))
                if events.get(self._wake.fileno()):
                    self._wake.drain()
                while self._outbox:
                    request_id, frames = self._outbox.popleft()
                    try:
                        sock.send_multipart(frames, zmq.NOBLOCK,
                                            copy=len(frames) == 1 or len(frames[1]) < 65536)
                    except zmq.Again:
                        call = self._pending.pop(request_id, None)
                        if call is not None:
                            call.unreachable = True
                            call.done.set()
                if events.get(sock):
                    self._receive(sock)
                if events.get(monitor):
                    self._watch(monitor)
        finally:
            sock.disable_monitor()
            monitor.close(0)
            sock.close(0)
            for call in list(self._pending.values()):
                call.done.set()  # header None: the connection is closed

    def _watch(self, monitor: zmq.Socket[Any]) -> None:
        """Connection events: a lost connection fails every pending call."""
        while True:
            try:
                event = zmq.utils.monitor.recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._down = None
                self._connected = True
                continue
            if kind == zmq.EVENT_DISCONNECTED:
                if not self._connected:
                    # A connection dropped before its handshake completed (a busy server,
                    # or one shedding a flood) never took our requests: they are still
                    # queued in ZeroMQ and go out when it has reconnected.
                    continue
                self._connected = False
                why = (f"the connection to {self.endpoint} was lost (the server died, "
                       "stopped answering, or closed it)")
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                why = f"{self.endpoint} refused our key"
            else:
                why = f"the handshake with {self.endpoint} failed"
            self._down = why
            for request_id in list(self._pending):
                call = self._pending.pop(request_id, None)
                if call is not None:
                    call.lost = why
                    call.done.set()
    def _receive(self, sock: zmq.Socket[Any]) -> None:
        for _ in range(1024):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                header = wire.decode_reply(frames[0].buffer)
            except wire.WireFormatError:
                continue  # garbage from a broken server: the caller times out
            call = self._pending.pop(header.id, None)
            if call is None:
                continue  # a heartbeat answer, or a reply that came after its timeout
            call.header = header
            if len(frames) > 1:
                call.data = frames[1]
            call.done.set()

    # -- requests ------------------------------------------------------------------------------

    def _request(self, op: Any, handle: int = 0, data: Any = None,
                 name: str | None = None, *, wait: bool = True) -> Any:
        """Send ``op`` and wait for its reply; ``wait=False``: send it and return None (its
        reply, when it comes, is dropped)."""
        if self._closing.is_set():
            raise OSError(errno.ENOTCONN, "the share is closed")
        down = self._down
        if down is not None and not isinstance(op, wire.Bye):
            raise OSError(errno.ENOTCONN, down, name)
        if op.ctx is None:
            op = self._as_caller(op)
        request_id = next(self._ids)
        call = _Call(op)
        if wait:
            self._pending[request_id] = call
        frames: list[Any] = [wire.encode_request(request_id, op, handle)]
        if data is not None:
            frames.append(data)
        self._outbox.append((request_id, frames))
        self._wake.ring()
        if not wait:
            return None
        if not call.done.wait(self.timeout):
            self._pending.pop(request_id, None)
            raise OSError(errno.ETIMEDOUT, f"no reply from {self.endpoint} within "
                                           f"{self.timeout:g} s", name)
        header = call.header
        if call.lost is not None:
            raise OSError(errno.ENOTCONN, call.lost, name)
        if call.unreachable:
            raise OSError(errno.ENOTCONN, f"cannot reach {self.endpoint} (not connected, "
                                          "or its queue is full)", name)
        if header is None:
            raise OSError(errno.ENOTCONN, "the share is closed")
        if header.error is not None:
            _raise(header.error, name)
        if isinstance(op, m.Read):
            return call.data.bytes if call.data is not None else b""
        try:
            return wire.decode_value(op, header.value)
        except wire.WireFormatError as exc:
            raise OSError(exc.errno, str(exc), name) from None

    # -- transport hooks -------------------------------------------------------------------------

    def _ask(self, message: Any) -> Any:
        return self._request(message)

    def _open_file(self, message: m.Open) -> tuple[Any, int]:
        opened: wire.RemoteHandle = self._request(message)
        return opened.handle, opened.flags

    def _open_dir(self, message: m.OpenDir) -> Any:
        opened: wire.RemoteHandle = self._request(message)
        return opened.handle

    def _ask_handle(self, handle: Any, message: Any, name: str | None = None) -> Any:
        if isinstance(message, m.Write):
            return self._write(handle, message, name)
        if isinstance(message, m.Read) and message.size > wire.MAX_DATA_BYTES:
            # A short read is allowed; callers that want everything loop anyway.
            message = msgspec.structs.replace(message, size=wire.MAX_DATA_BYTES)
        return self._request(message, handle, name=name)

    def _write(self, handle: Any, message: m.Write, name: str | None) -> int:
        data = memoryview(message.data).cast("B")
        step = wire.MAX_DATA_BYTES
        written = 0
        for start in range(0, max(len(data), 1), step):
            piece = data[start:start + step]
            offset = None if message.offset is None else message.offset + start
            op = msgspec.structs.replace(message, data=None, offset=offset)
            n = self._request(op, handle, data=piece, name=name)
            written += n
            if n < len(piece):
                break
        return written

    def _close_handle(self, handle: Any, *, wait: bool = True) -> None:
        with contextlib.suppress(OSError):
            self._request(m.Close(), handle, wait=wait)

    def close(self) -> None:
        """Say Bye (the server releases our handles at once) and stop the I/O thread."""
        if not self._owner or self._closing.is_set():
            return
        with contextlib.suppress(OSError):
            saved, self.timeout = self.timeout, min(self.timeout, 2.0)
            try:
                if self._down is None:
                    self._request(wire.Bye())
            finally:
                self.timeout = saved
        self._closing.set()
        self._wake.ring()
        self._thread.join(timeout=10)
        self._wake.close()
        self._context.term()

    def __enter__(self) -> RemoteFS:
        return self

    def stats(self) -> dict[str, Any]:
        return {"session": self._ask(m.SessionStats())}
