"""Who may connect, and how many: the ZAP (ZeroMQ RFC 27) handler thread, and the
connection gate's I/O.

Only tenants' CURVE public keys pass the handshake, and the key names the tenant of every
message on that connection. The same thread counts the connections of the agent's socket
(its socket monitor reports each one accepted and each one gone, with its descriptor) in
the gate's books (:class:`~pyvirtiofs.api.agent.gate.ConnectionGate`: the caps on
handshakes, on connections in total and per tenant, and which tenant a connection is) and
shuts down what they say is over a cap. ZeroMQ's handshake timeout (``ZMQ_HANDSHAKE_IVL``)
drops a peer that never finishes its handshake.

The cap in total keeps the descriptors the agent needs for itself (its daemons, its control
socket, restarts). The gate hears of a connection a little after ZeroMQ accepted it, and
ZeroMQ waits for the gate when it falls behind (the monitor's queue is bounded), so a
flood holds at most :data:`GATE_BURST` more descriptors for a moment; the agent checks at
start that its descriptor limit has room for all of it beside ``fd_reserve``. Which
descriptor just completed its handshake is told by ``TCP_INFO`` (the bytes it sent).

A connection is shut down with ``shutdown(2)`` on its descriptor (after checking that the
descriptor still is the same socket, by its inode, and a connection of the agent's
endpoint): ZeroMQ sees the peer gone and cleans up as for any disconnect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils import z85

from pyvirtiofs.api.agent.gate import ConnectionGate, GateStats

log = logging.getLogger("pyvirtiofs.agent")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"pyvirtiofs"
MONITOR_ENDPOINT = "inproc://pyvirtiofs.agent.monitor"
MONITOR_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
MONITOR_HWM = 100  # events queued for the gate on our side of the monitor pipe
ZMQ_MONITOR_SNDHWM = 1000  # ZeroMQ's side of it (its monitor socket's default high-water mark)
# Beyond this many queued events ZeroMQ's I/O thread waits for the gate (and accepts nothing
# meanwhile): an inproc pipe holds the sender's high-water mark plus the receiver's.
MONITOR_QUEUE = ZMQ_MONITOR_SNDHWM + MONITOR_HWM
# Over-cap descriptors open at once: a full queue of connections the gate has not seen yet,
# and one round's worth the gate has seen and is shutting down (a round reads at most
# MONITOR_QUEUE events), so a flood holds at most this many beyond the caps for a moment.
GATE_BURST = 2 * MONITOR_QUEUE
REFUSAL_LOG_INTERVAL = 60.0  # seconds between log lines about the same refused peer
_TCP_INFO_BYTES_ACKED = 120  # offset of tcpi_bytes_acked in struct tcp_info (Linux 4.1+)
_EVENT = struct.Struct("=HI")  # a monitor event's first frame: event, value


class ZapHandler:
    """A ZAP (RFC 27) handler thread and the connection gate (see the module's doc).

    ``keys`` (Z85 bytes → tenant id) and ``limits`` (tenant id → its connection cap, None
    for no cap) may be replaced at any time (reload). ``endpoints``: the agent's bound
    endpoints, set once the server has bound them (the gate shuts down only connections
    of these)."""

    def __init__(self, context: zmq.Context[Any], keys: dict[bytes, str],
                 event: Callable[..., None], *, limits: dict[str, int | None] | None = None,
                 max_connections: int | None = None, max_handshakes: int | None = None,
                 handshake_timeout: float | None = None,
                 monitor: str | None = None) -> None:
        self.context = context
        self.keys = keys
        self.limits = limits or {}
        self.event = event
        self.gate = ConnectionGate(_bytes_acked, max_connections=max_connections,
                                   max_handshakes=max_handshakes,
                                   handshake_timeout=handshake_timeout)
        self.monitor_endpoint = monitor
        self.endpoints: list[str] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="zap", daemon=True)
        self.accepted = 0
        self.refused = 0
        self._refusals: dict[tuple[str, str, str | None], tuple[float, int]] = {}
        self._local: set[Any] | None = None
        self._noted: dict[int, tuple[str, int | None]] = {}  # to shut: fd -> (why, inode)

    def start(self) -> ZapHandler:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def stats(self) -> GateStats:
        return self.gate.stats()

    def _run(self) -> None:
        monitor: zmq.Socket[Any] | None = None
        try:
            sock = self.context.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(ZAP_ENDPOINT)
            if self.monitor_endpoint is not None:
                # Connected before the server's socket binds the monitor (inproc allows
                # it), so no event ever waits for a reader.
                monitor = self.context.socket(zmq.PAIR)
                monitor.setsockopt(zmq.LINGER, 0)
                monitor.setsockopt(zmq.RCVHWM, MONITOR_HWM)
                monitor.connect(self.monitor_endpoint)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        if monitor is not None:
            poller.register(monitor, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                self.gate.expire(now)
                # The next ZAP request waits until the approved connection has completed.
                awaiting = self.gate.awaiting(now)
                if not awaiting:
                    poller.register(sock, zmq.POLLIN)
                else:
                    with contextlib.suppress(KeyError):
                        poller.unregister(sock)
                marked = bool(self._noted) or self.gate.has_marks()
                events = dict(poller.poll(20 if awaiting or marked else 100))
                if monitor is not None and (marked or events.get(monitor)):
                    self._watch(monitor)  # (one round, then a ZAP request gets its turn)
                if events.get(sock) and not self.gate.awaiting(time.monotonic()):
                    request = sock.recv_multipart()
                    try:
                        answer = self._answer(request)
                    except Exception as exc:  # refuse, and keep answering
                        log.exception("ZAP handler failed")
                        self.refused += 1
                        answer = [b"1.0", request[1] if len(request) > 1 else b"", b"500",
                                  f"internal error: {type(exc).__name__}".encode(), b"", b""]
                    sock.send_multipart(answer)
        finally:
            sock.close(0)
            if monitor is not None:
                monitor.close(0)

    # -- the gate ------------------------------------------------------------------------------

    def _watch(self, monitor: zmq.Socket[Any]) -> None:
        """One round of the gate: tell it the queued events, shut down what the round
        before noted, and note what is over a cap now.

        A descriptor number can have been closed and reused by a new connection since
        the event that put it over a cap. ZeroMQ reports a disconnect before it closes the
        descriptor, so the socket's inode is noted first, and the next round's events
        (the queue's first :data:`MONITOR_QUEUE`, which hold every event queued by the
        time of the note: no more fit) are told before it is shut: a number reported gone
        among them is left alone, and one whose inode has changed by the time it is shut
        was reused after the note (a well-behaved client that happened to get the number
        is never cut off). A round reads at most a queue's worth, so the descriptors seen
        and not yet shut stay bounded however fast a flood connects, and ZAP requests
        are answered between rounds."""
        gone = self._drain(monitor, MONITOR_QUEUE)
        for fd, (why, inode) in self._noted.items():
            if fd not in gone and inode is not None:
                self._shut(fd, why, inode)
        self._noted = {fd: (why, _inode(fd)) for fd, why in self.gate.to_shut().items()}

    def _drain(self, monitor: zmq.Socket[Any], limit: int) -> set[int]:
        """Tell the gate up to ``limit`` queued events; the descriptors reported gone."""
        gate = self.gate
        gone: set[int] = set()
        for _ in range(limit):
            try:
                frames = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                gate.all_told(time.monotonic())
                break
            kind, value = _EVENT.unpack_from(frames[0])
            if kind == zmq.EVENT_ACCEPTED:
                gate.accepted(value, time.monotonic())  # (judged on its own: a new mark)
            elif kind == zmq.EVENT_DISCONNECTED:
                gate.gone(value)
                gone.add(value)
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                gate.completed()
        return gone

    def _shut(self, fd: int, why: str, inode: int) -> None:
        """Shut a connection of our endpoint down (never any other descriptor: it is
        checked to be the same socket as when it was marked, connected, and bound to one
        of our endpoints)."""
        if _inode(fd) != inode:
            return
        try:
            s = socket.socket(fileno=fd)  # (borrowed: detached below, never closed here)
        except OSError:
            return
        try:
            local = s.getsockname()
            s.getpeername()  # a listening socket has none
            if not self._ours(local):
                return
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            return
        finally:
            s.detach()
        self.gate.shut_down += 1
        self._refuse("-", why)

    def _ours(self, local: Any) -> bool:
        """Whether a socket's local address is one of our bound endpoints."""
        if not self._local:
            self._local = set()
            for endpoint in list(self.endpoints):
                if endpoint.startswith("tcp://"):
                    host, _, port = endpoint[6:].rpartition(":")
                    with contextlib.suppress(ValueError):
                        self._local.add(("tcp", host.strip("[]"), int(port)))
                elif endpoint.startswith("ipc://"):
                    self._local.add(("ipc", endpoint[6:]))
        if isinstance(local, tuple):
            return ("tcp", local[0], local[1]) in self._local or any(
                e[0] == "tcp" and e[2] == local[1] and e[1] in ("0.0.0.0", "::", "*")
                for e in self._local)
        name = local.decode(errors="replace") if isinstance(local, bytes) else local
        return ("ipc", name) in self._local

    # -- ZAP --------------------------------------------------------------------------------

    def _refuse(self, address: str, reason: str, key: str | None = None) -> None:
        """Count a refusal; log it the first time, then once a minute per peer and key
        (a refused client reconnects ten times a second)."""
        self.refused += 1
        what = (address, reason, key)
        now = time.monotonic()
        seen = self._refusals.get(what)
        if seen is not None and now - seen[0] < REFUSAL_LOG_INTERVAL:
            self._refusals[what] = (seen[0], seen[1] + 1)
            return
        if len(self._refusals) >= 4096:
            self._refusals.clear()
        self._refusals[what] = (now, 0)
        fields: dict[str, Any] = {"address": address, "reason": reason}
        if key is not None:
            fields["key"] = key
        if seen is not None:
            fields["repeated"] = seen[1]
        self.event("auth_refused", None, level=logging.WARNING, **fields)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:
            self.refused += 1
            return [b"1.0", request[1] if len(request) > 1 else b"", b"400",
                    b"malformed ZAP request", b"", b""]
        version, request_id, _domain, address, _identity, mechanism = request[:6]
        creds = request[6:]
        address_text = address.decode(errors="replace")
        if version != b"1.0" or mechanism != b"CURVE" or len(creds) != 1 or len(creds[0]) != 32:
            self._refuse(address_text, f"mechanism {mechanism.decode(errors='replace')} "
                                       "not allowed")
            return [b"1.0", request_id, b"400", b"CURVE required", b"", b""]
        key = z85.encode(creds[0])
        tenant = self.keys.get(key)
        if tenant is None:
            self._refuse(address_text, "unknown key", key.decode()[:12] + "...")
            return [b"1.0", request_id, b"400", b"unknown key", b"", b""]
        if self.monitor_endpoint is not None:
            over = self.gate.approve(tenant, self.limits.get(tenant), time.monotonic())
            if over is not None:
                self._refuse(address_text, over, tenant)
                return [b"1.0", request_id, b"400", b"too many connections", b"", b""]
        self.accepted += 1
        self.event("authenticated", tenant, address=address_text)
        return [b"1.0", request_id, b"200", b"OK", key, b""]


def _inode(fd: int) -> int | None:
    """The inode of the socket behind ``fd`` (None: no such descriptor, or not a socket):
    unique while the socket lives, so it tells a reused descriptor number."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else None


def _bytes_acked(fd: int) -> int | None:
    """``tcpi_bytes_acked`` of a TCP socket (None: not TCP, or not known)."""
    try:
        s = socket.socket(fileno=fd)  # (borrowed: detached below)
    except OSError:
        return None
    try:
        if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
            return None
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
        if len(info) < _TCP_INFO_BYTES_ACKED + 8:
            return None
        return int(struct.unpack_from("=Q", info, _TCP_INFO_BYTES_ACKED)[0])
    except OSError:
        return None
    finally:
        s.detach()
