"""FuseChannel: FUSE requests in and out of the virtqueues — mechanics only, no threads.

The channel assigns each request a non-zero ``unique``, copies it into guest memory,
builds its descriptor chain (device-readable request, then device-writable reply buffer),
publishes, and kicks. On harvest it validates each reply against the request it answers
(descriptor head → in-flight record → ``unique``), decodes it, and frees the buffer.

It is single-threaded by design: exactly one thread (the device actor's) may call it.
:class:`BlockingDevice` drives it synchronously for the small paths that need no actors.
"""

from __future__ import annotations

import errno
import os
import select
from collections import Counter
from dataclasses import dataclass
from typing import Any, NamedTuple

from codec import fuse_replies
from codec.fuse_abi import IN_HEADER, OUT_HEADER, Opcode
from codec.fuse_replies import FuseProtocolError
from codec.fuse_requests import FuseRequest, pack_in_header
from hw.memory import BufferAllocator
from hw.transport import DeviceGone, VirtioTransport
from hw.virtqueue import QueueFull

__all__ = ["BlockingDevice", "Completion", "FuseChannel", "RequestContext"]

HIPRIO_QUEUE = 0
REQUEST_QUEUE = 1
# The C daemon dies on a device-readable payload over 1 MiB + 4 KiB (DESIGN.md §3).
MAX_READABLE = (1 << 20) + 4096
_ALIGN = 64


class RequestContext(NamedTuple):
    """The caller's credentials, sent in every request header."""

    uid: int
    gid: int
    pid: int

    @classmethod
    def current(cls) -> RequestContext:
        return cls(os.geteuid(), os.getegid(), os.getpid())


class Completion(NamedTuple):
    """One finished request: the caller's token and either a result or an exception."""

    token: Any
    result: Any
    error: BaseException | None


@dataclass(slots=True)
class _InFlight:
    unique: int
    request: FuseRequest
    offset: int
    reply_offset: int
    reply_capacity: int
    token: Any
    sink: memoryview | None


class FuseChannel:
    """Submit FUSE requests and harvest their replies on one transport."""

    def __init__(self, transport: VirtioTransport, *, ctx: RequestContext | None = None) -> None:
        self.transport = transport
        self.ctx = ctx or RequestContext.current()
        mem = transport.memory
        self._view = mem.view
        self._gpa_base = mem.gpa_base
        self.allocator = BufferAllocator(transport.buffer_start, mem.size, _ALIGN)
        self._capacity = mem.size - transport.buffer_start
        self._unique = 0
        self._inflight: dict[int, _InFlight] = {}
        self._dirty: set[int] = set()
        self.requests_sent: Counter[int] = Counter()  # per opcode: the request economy
        self.protocol_errors = 0

    # -- submission ----------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def _next_unique(self) -> int:
        self._unique = (self._unique + 1) & 0xFFFF_FFFF_FFFF_FFFF or 1
        return self._unique

    def check(self, request: FuseRequest) -> None:
        """Reject a request that could never be submitted (it would wait forever or crash
        the daemon) before it is queued."""
        req_len = IN_HEADER.size + len(request.args) + len(request.payload or b"")
        if req_len > MAX_READABLE:
            raise OSError(errno.EINVAL, f"request too large for the device ({req_len} bytes)")
        reply_len = OUT_HEADER.size + request.reply_size if request.expects_reply else 0
        if _round(req_len) + reply_len > self._capacity:
            raise OSError(errno.ENOMEM, "request larger than guest memory")

    def submit(self, request: FuseRequest, token: Any = None, *,
               sink: memoryview | None = None, ctx: RequestContext | None = None) -> bool:
        """Place ``request`` in its queue. Returns False, changing nothing, when the ring or
        guest memory is full: the caller keeps it and retries after a harvest.

        ``sink``: for READ, a caller buffer the data is copied into (the result is then the
        byte count) instead of a new ``bytes``.
        """
        args, payload = request.args, request.payload
        req_len = IN_HEADER.size + len(args) + (len(payload) if payload is not None else 0)
        reply_len = OUT_HEADER.size + request.reply_size if request.expects_reply else 0
        span = _round(req_len)
        offset = self.allocator.alloc(span + reply_len)
        if offset is None:
            return False
        queue = REQUEST_QUEUE if request.expects_reply else HIPRIO_QUEUE
        vq = self.transport.queues[queue]
        unique = self._next_unique()
        c = ctx or self.ctx
        view = self._view
        pack_in_header(view, offset, req_len, request.opcode, unique, request.nodeid,
                       c.uid, c.gid, c.pid)
        pos = offset + IN_HEADER.size
        view[pos:pos + len(args)] = args
        if payload is not None:
            pos += len(args)
            view[pos:pos + len(payload)] = payload
        gpa = self._gpa_base + offset
        writable = [(gpa + span, reply_len)] if reply_len else []
        record = _InFlight(unique, request, offset, offset + span, reply_len, token, sink)
        try:
            vq.add([(gpa, req_len)], writable, record)
        except QueueFull:
            self.allocator.free(offset)
            return False
        self._inflight[unique] = record
        self._dirty.add(queue)
        self.requests_sent[request.opcode] += 1
        return True

    def flush(self) -> None:
        """Publish everything submitted since the last flush; kick where the device asks.

        Submitting several requests then flushing once batches the notifications."""
        for queue in self._dirty:
            if self.transport.queues[queue].publish():
                self.transport.kick(queue)
        self._dirty.clear()

    # -- completion ----------------------------------------------------------------------

    def harvest(self) -> list[Completion]:
        """Drain every used ring completely and return what finished."""
        done: list[Completion] = []
        for vq in self.transport.queues:
            while True:
                batch = vq.harvest()
                if not batch:
                    break
                for completion in batch:
                    done.append(self._complete(completion.token, completion.used_len,
                                               completion.capacity))
        return done

    def _complete(self, record: _InFlight, used_len: int, capacity: int) -> Completion:
        self._inflight.pop(record.unique, None)
        try:
            if not record.request.expects_reply:
                return Completion(record.token, None, None)  # FORGET: nothing comes back
            if used_len > capacity:
                raise FuseProtocolError(
                    f"device reported {used_len} bytes written into a {capacity}-byte buffer")
            reply = self._view[record.reply_offset:record.reply_offset + record.reply_capacity]
            try:
                err, payload = fuse_replies.parse_out_header(reply, used_len, record.unique)
                if err:
                    return Completion(record.token, None, OSError(err, os.strerror(err)))
                return Completion(record.token, self._decode(record, payload), None)
            finally:
                reply.release()
        except FuseProtocolError as exc:
            self.protocol_errors += 1
            return Completion(record.token, None, exc)
        finally:
            self.allocator.free(record.offset)

    @staticmethod
    def _decode(record: _InFlight, payload: memoryview) -> Any:
        req = record.request
        if req.opcode == Opcode.READ:
            if len(payload) > req.reply_size:
                raise FuseProtocolError("READ returned more than requested")
            if record.sink is not None:
                n = len(payload)
                record.sink[:n] = payload
                return n
            return bytes(payload)
        return fuse_replies.decode_reply(req, payload)

    def fail_all(self, exc: BaseException) -> list[Completion]:
        """Fail every in-flight request (device gone). Buffers stay allocated: the device
        may still own them, and the memory dies with the transport anyway."""
        done = [Completion(r.token, None, exc) for r in self._inflight.values()]
        self._inflight.clear()
        return done


def _round(n: int) -> int:
    return (n + _ALIGN - 1) & ~(_ALIGN - 1)


class BlockingDevice:
    """Drive a :class:`FuseChannel` synchronously from one thread: one call at a time.

    The small end-to-end paths (and tests of the lower layers) use it; everything else
    goes through the device actor, which keeps many requests in flight.
    """

    def __init__(self, transport: VirtioTransport, *, timeout: float | None = 30.0) -> None:
        self.transport = transport
        self.channel = FuseChannel(transport)
        self.timeout = timeout
        self._fds = [transport.call_fd(i) for i in range(len(transport.queues))]

    def call(self, request: FuseRequest, *, sink: memoryview | None = None) -> Any:
        """Send ``request`` and wait for its reply; daemon errors raise OSError."""
        self.channel.check(request)
        if not self.channel.submit(request, token=request, sink=sink):
            raise OSError(errno.EBUSY, "device queue full")
        self.channel.flush()
        if not request.expects_reply:
            return None
        death = self.transport.death_fd()
        while True:
            for c in self.channel.harvest():
                if c.token is not request:
                    continue  # a FORGET coming back (len 0): nothing to deliver
                if c.error is not None:
                    raise c.error
                return c.result
            ready, _, _ = select.select([*self._fds, death], [], [], self.timeout)
            if not ready:
                raise OSError(errno.ETIMEDOUT, f"no reply to {Opcode(request.opcode).name}")
            if death in ready and not self.transport.alive():
                self.channel.fail_all(DeviceGone())
                raise DeviceGone()
            for i, fd in enumerate(self._fds):
                if fd in ready:
                    self.transport.ack_call(i)

    def close(self) -> None:
        self.transport.close()
