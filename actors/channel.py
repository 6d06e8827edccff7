"""FuseChannel: the FUSE exchange over the request queues — rules only, no threads.

The channel assigns each request a non-zero ``unique``, writes its header and arguments
into a buffer of :class:`~pyvirtiofs.hw.queues.RequestQueues` (which chains, publishes and
kicks), and on harvest validates each reply against the request it answers (descriptor
head → in-flight record → ``unique``) and decodes it. It is the FUSE half of the device;
the ring half, which knows nothing of FUSE, is :mod:`pyvirtiofs.hw.queues`.

It is single-threaded by design: exactly one thread (the device actor's) may call it.
:class:`BlockingDevice` drives it synchronously for the small paths that need no actors.

The device is not trusted (tests/test_hostile_device.py runs a hostile one). The error
contract of this layer:

* a reply that breaks the FUSE or ring protocol fails *that* request with
  :class:`DeviceProtocolError` — a :class:`~codec.fuse_replies.FuseProtocolError` that is
  also an ``OSError`` with errno ``EIO`` (as Linux reports a malformed reply), so callers
  may catch either; the channel keeps serving other requests;
* a daemon error is an ``OSError`` with the daemon's errno; a dead daemon is
  :class:`~pyvirtiofs.hw.transport.DeviceGone` (``ENOTCONN``); no reply in time is ``ETIMEDOUT``
  (raised by the driver: :class:`BlockingDevice` or the actors' timeouts);
* lookups the daemon counted in a rejected reply (``FuseProtocolError.forget``), or in a
  reply that came after its caller gave up (:meth:`FuseChannel.abandon`), are paid back
  with FORGET on the hiprio queue by the channel itself;
* a used ring whose index jumps by more than the queue size is unrecoverable (as Linux's
  ``BAD_RING``): that queue is declared broken, every request in flight on it fails with
  ``DeviceProtocolError``, new ones are refused with it, and the buffers the device may
  still write into stay allocated (quarantined) until the transport closes.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from pyvirtiofs.codec import fuse_replies
from pyvirtiofs.codec import fuse_requests as rq
from pyvirtiofs.codec.fuse_abi import (
    FUSE_ROOT_ID,
    IN_HEADER,
    OUT_HEADER,
    Opcode,
    opcode_name,
)
from pyvirtiofs.codec.fuse_replies import FuseProtocolError
from pyvirtiofs.codec.fuse_requests import FuseRequest, pack_in_header
from pyvirtiofs.codec.fuse_types import CreateOut, DirentPlus, EntryOut
from pyvirtiofs.hw.queues import Posted, RequestQueues
from pyvirtiofs.hw.transport import DeviceGone, VirtioTransport

__all__ = [
    "BlockingDevice",
    "Completion",
    "DeviceProtocolError",
    "FuseChannel",
    "RequestContext",
    "wait_for",
]

log = logging.getLogger(__name__)

HIPRIO_QUEUE = 0
REQUEST_QUEUE = 1
# QEMU's C virtiofsd dies on a device-readable payload over 1 MiB + 4 KiB (seen on 7.2).
MAX_READABLE = (1 << 20) + 4096
# FORGET pairs per BATCH_FORGET the channel sends (as the session does).
_FORGET_CHUNK = 256
_U64_MAX = (1 << 64) - 1


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


class DeviceProtocolError(FuseProtocolError, OSError):
    """A reply (or the used ring) broke the protocol: the request fails with ``EIO``.

    Both a :class:`~codec.fuse_replies.FuseProtocolError` (``forget`` lists the lookups
    the daemon counted in the rejected reply; the channel has already queued FORGETs for
    them) and an ``OSError`` with errno ``EIO``, so that an ``os``-style caller catching
    ``OSError`` sees the same errno Linux would give for a malformed reply.
    """

    @classmethod
    def wrap(cls, exc: FuseProtocolError) -> DeviceProtocolError:
        """The channel-level error for a codec-level one (the same one if already wrapped)."""
        if isinstance(exc, DeviceProtocolError):
            return exc
        return cls(exc.strerror, forget=exc.forget)


# The token of requests the channel sends on its own (FORGET, RELEASE paying back what a
# rejected or late reply held): their completions are reclaimed and never returned.
_INTERNAL = object()


@dataclass(slots=True)
class _InFlight:
    unique: int
    request: FuseRequest
    token: Any
    sink: memoryview | None
    posted: Posted | None = None
    abandoned: bool = False  # the caller gave up (timeout): reclaim the reply, deliver nothing


class FuseChannel:
    """Submit FUSE requests and harvest their replies on one transport.

    Counters for tests and monitoring: ``protocol_errors`` (replies rejected),
    ``decode_failures`` (replies whose decoder raised something other than a protocol
    error: a codec bug, reported as a protocol error so no completion is lost),
    ``late_replies`` (completions of abandoned requests), ``forgets_sent`` (lookups the
    channel paid back), ``releases_sent`` (handles of late OPEN/OPENDIR/CREATE replies it
    released), ``quarantined_bytes`` (buffers of a broken queue, never freed).
    """

    def __init__(self, transport: VirtioTransport, *, ctx: RequestContext | None = None) -> None:
        self.transport = transport
        self.ctx = ctx or RequestContext.current()
        self.queues = RequestQueues(transport)
        self.allocator = self.queues.allocator
        self._view = self.queues.view
        self._unique = 0
        self._inflight: dict[int, _InFlight] = {}
        self.requests_sent: Counter[int] = Counter()  # per opcode: the request economy
        self.protocol_errors = 0
        self.decode_failures = 0
        self.late_replies = 0
        self.forgets_sent = 0
        self.releases_sent = 0
        self._owed_forgets: list[tuple[int, int]] = []
        self._owed_releases: list[FuseRequest] = []
        self._broken = self.queues.broken  # queue index -> why it is unusable
        self._gone: str | None = None
        self._done: list[Completion] = []  # filled while harvesting

    # -- submission ----------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests the device holds (abandoned ones included, until the device returns them)."""
        return len(self._inflight)

    @property
    def quarantined_bytes(self) -> int:
        """Buffers of broken queues, never freed (the device may still write into them)."""
        return self.queues.quarantined_bytes

    @property
    def forgets_owed(self) -> int:
        """Lookups still to pay back (FORGETs that did not fit in the ring yet)."""
        return sum(n for _, n in self._owed_forgets)

    def broken_queues(self) -> dict[int, str]:
        """Queues declared unusable (index → reason); empty for a healthy device."""
        return dict(self._broken)

    def _next_unique(self) -> int:
        self._unique = (self._unique + 1) & 0xFFFF_FFFF_FFFF_FFFF or 1
        return self._unique

    def check(self, request: FuseRequest) -> None:
        """Reject a request that could never be submitted (it would wait forever or crash
        the daemon) before it is queued; also every request once the device is gone
        (``DeviceGone``) or its queue is broken (``DeviceProtocolError``)."""
        if self._gone is not None:
            raise DeviceGone(self._gone)
        broken = self._broken.get(_queue_of(request))
        if broken is not None:
            raise DeviceProtocolError(broken)
        req_len = IN_HEADER.size + len(request.args) + len(request.payload or b"")
        if req_len > MAX_READABLE:
            raise OSError(errno.EINVAL, f"request too large for the device ({req_len} bytes)")
        reply_len = OUT_HEADER.size + request.reply_size if request.expects_reply else 0
        if not self.queues.fits(req_len, reply_len):
            raise OSError(errno.ENOMEM, "request larger than guest memory")

    def submit(self, request: FuseRequest, token: Any = None, *,
               sink: memoryview | None = None, ctx: RequestContext | None = None) -> bool:
        """Place ``request`` in its queue. Returns False, changing nothing, when the ring or
        guest memory is full: the caller keeps it and retries after a harvest. Also False
        when :meth:`check` would refuse the request (device gone, queue broken): call
        :meth:`check` first to get the error.

        ``sink``: for READ, a caller buffer the data is copied into (the result is then the
        byte count) instead of a new ``bytes``.
        """
        queue = _queue_of(request)
        if self._gone is not None or queue in self._broken:
            return False
        args, payload = request.args, request.payload
        req_len = IN_HEADER.size + len(args) + (len(payload) if payload is not None else 0)
        reply_len = OUT_HEADER.size + request.reply_size if request.expects_reply else 0
        offset = self.queues.reserve(req_len, reply_len)
        if offset is None:
            return False
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
        record = _InFlight(unique, request, token, sink)
        record.posted = self.queues.post(queue, offset, req_len, reply_len, record)
        if record.posted is None:
            return False
        self._inflight[unique] = record
        self.requests_sent[request.opcode] += 1
        return True

    def flush(self) -> None:
        """Publish everything submitted since the last flush; kick where the device asks.

        Submitting several requests then flushing once batches the notifications."""
        self.queues.flush()

    def abandon(self, token: Any) -> bool:
        """The caller of the request(s) submitted with ``token`` gave up (a timeout).

        They stay in flight — the device owns their buffers until it returns them — but
        their completion will be reclaimed silently: nothing is delivered, nothing is
        copied into their ``sink`` any more, and lookups or open handles a late positive
        reply carries are paid back (FORGET / RELEASE). Returns whether any was found.
        """
        found = False
        for record in self._inflight.values():
            if record.token is token and not record.abandoned:
                record.abandoned = True
                record.sink = None
                found = True
        return found

    # -- completion ----------------------------------------------------------------------

    def harvest(self) -> list[Completion]:
        """Drain every used ring completely and return what finished.

        Completions of the channel's own requests and of abandoned ones are reclaimed
        here and not returned. Debts (FORGET/RELEASE) are sent before returning.
        """
        self.queues.harvest(self._on_used, self._break_queue)
        done, self._done = self._done, []
        self.pay_debts()
        return done

    def _on_used(self, posted: Posted, used_len: int) -> None:
        out = self._complete(posted.token, used_len)
        if out is not None:
            self._done.append(out)

    def _complete(self, record: _InFlight, used_len: int) -> Completion | None:
        current = self._inflight.get(record.unique) is record
        if current:
            del self._inflight[record.unique]
        deliver = current and not record.abandoned and record.token is not _INTERNAL
        if not deliver and record.token is not _INTERNAL:
            self.late_replies += 1
        if not record.request.expects_reply:
            # FORGET: nothing comes back (virtiofsd returns the chain with len 0).
            return Completion(record.token, None, None) if deliver else None
        try:
            result = self._parse(record, used_len, deliver)
        except FuseProtocolError as exc:
            self.protocol_errors += 1
            self.owe_forgets(exc.forget)
            if not deliver:
                return None
            return Completion(record.token, None, DeviceProtocolError.wrap(exc))
        except OSError as exc:  # the daemon's own error
            return Completion(record.token, None, exc) if deliver else None
        if not deliver:
            self._pay_back(record, result)
            return None
        return Completion(record.token, result, None)

    def _parse(self, record: _InFlight, used_len: int, deliver: bool) -> Any:
        """Validate and decode one reply; raises FuseProtocolError or the daemon's OSError."""
        posted = record.posted
        assert posted is not None
        capacity = posted.reply_capacity
        if used_len > capacity:
            raise DeviceProtocolError(
                f"device reported {used_len} bytes written into a {capacity}-byte buffer")
        reply = self._view[posted.reply_offset:posted.reply_offset + capacity]
        try:
            err, payload = fuse_replies.parse_out_header(reply, used_len, record.unique)
            if err:
                raise OSError(err, os.strerror(err))
            try:
                return self._decode(record, payload, record.sink if deliver else None)
            except FuseProtocolError:
                raise
            except Exception as exc:
                # A decoder bug must not lose the other completions of this harvest (their
                # descriptors are already reclaimed): report it as a protocol error.
                self.decode_failures += 1
                log.error("decoding a %s reply failed: %r", opcode_name(record.request.opcode),
                          exc)
                raise DeviceProtocolError(
                    f"undecodable {opcode_name(record.request.opcode)} reply: {exc!r}") from exc
        finally:
            reply.release()

    @staticmethod
    def _decode(record: _InFlight, payload: memoryview, sink: memoryview | None) -> Any:
        req = record.request
        if req.opcode == Opcode.READ:
            if len(payload) > req.reply_size:
                raise DeviceProtocolError("READ returned more than requested")
            if sink is not None:
                n = len(payload)
                sink[:n] = payload
                return n
            return bytes(payload)
        return fuse_replies.decode_reply(req, payload)

    def _break_queue(self, index: int, reason: str, lost: list[Posted]) -> None:
        """The device moved used.idx by more than the queue size: nothing on this queue can
        be trusted any more. Fail everything that was in flight on it (the entries just
        harvested too: they came from a corrupt ring); the ring half quarantines their
        buffers."""
        log.error("%s", reason)
        for posted in lost:
            record: _InFlight = posted.token
            current = self._inflight.pop(record.unique, None) is record
            if current and not record.abandoned and record.token is not _INTERNAL:
                self.protocol_errors += 1
                self._done.append(Completion(record.token, None, DeviceProtocolError(reason)))
        if index == HIPRIO_QUEUE:
            self._owed_forgets.clear()  # nowhere to send them

    # -- paying back what the daemon holds for replies nobody takes ----------------------

    def owe_forgets(self, items: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> None:
        for nodeid, nlookup in items:
            # The root is never forgotten (as the session does); ids are u64 already.
            if nodeid != FUSE_ROOT_ID and 0 < nodeid <= _U64_MAX and 0 < nlookup <= _U64_MAX:
                self._owed_forgets.append((nodeid, nlookup))

    def _pay_back(self, record: _InFlight, result: Any) -> None:
        """A valid reply arrived for an abandoned request: give back what it holds."""
        req = record.request
        if isinstance(result, EntryOut):
            if result.nodeid:
                self.owe_forgets([(result.nodeid, 1)])
        elif isinstance(result, CreateOut):
            self.owe_forgets([(result.entry.nodeid, 1)])
            flags = int.from_bytes(req.args[0:4], "little")
            self._owed_releases.append(rq.release(result.entry.nodeid, result.open.fh, flags))
        elif req.opcode == Opcode.OPEN:
            flags = int.from_bytes(req.args[0:4], "little")
            self._owed_releases.append(rq.release(req.nodeid, result.fh, flags))
        elif req.opcode == Opcode.OPENDIR:
            self._owed_releases.append(rq.releasedir(req.nodeid, result.fh))
        elif req.opcode == Opcode.READDIRPLUS:
            entries: list[DirentPlus] = result
            self.owe_forgets([(e.entry.nodeid, 1) for e in entries
                               if e.entry.nodeid and e.dirent.name not in (b".", b"..")])

    def forget(self, items: list[tuple[int, int]]) -> None:
        """Give lookups back now: FORGET, or BATCH_FORGET in chunks, on the hiprio queue
        (what does not fit goes with the next harvest)."""
        self.owe_forgets(items)
        self.pay_debts()

    def pay_debts(self) -> None:
        """Send owed FORGETs (hiprio) and RELEASEs; what does not fit waits for the next
        harvest."""
        sent = False
        owed = self._owed_forgets
        while owed and HIPRIO_QUEUE not in self._broken and self._gone is None:
            chunk = owed[:_FORGET_CHUNK]
            req = rq.forget(*chunk[0]) if len(chunk) == 1 else rq.batch_forget(chunk)
            if not self.submit(req, _INTERNAL):
                break
            del owed[:len(chunk)]
            self.forgets_sent += len(chunk)
            sent = True
        while self._owed_releases and self._gone is None:
            if not self.submit(self._owed_releases[0], _INTERNAL):
                break
            self._owed_releases.pop(0)
            self.releases_sent += 1
            sent = True
        if sent:
            self.flush()

    def fail_all(self, exc: BaseException) -> list[Completion]:
        """Fail every in-flight request (device gone); later requests are refused with
        ``DeviceGone``. Buffers stay allocated: the device may still own them, and the
        memory dies with the transport anyway."""
        done = [Completion(r.token, None, exc) for r in self._inflight.values()
                if not r.abandoned and r.token is not _INTERNAL]
        for record in self._inflight.values():
            record.sink = None
        self._inflight.clear()
        self._owed_forgets.clear()
        self._owed_releases.clear()
        self._gone = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                      else str(exc)) or "virtio-fs device is gone"
        return done


def _queue_of(request: FuseRequest) -> int:
    return REQUEST_QUEUE if request.expects_reply else HIPRIO_QUEUE


def wait_for(channel: FuseChannel, token: Any, deadline: float | None,
             other: Callable[[Completion], None] | None = None) -> Completion | None:
    """Harvest on this thread until the request submitted with ``token`` completes: its
    completion, or None at ``deadline`` (``time.monotonic()``). Other completions go to
    ``other``. A dead device fails everything in flight and raises ``DeviceGone``."""
    transport = channel.transport
    death = transport.death_fd()
    irqs = list(transport.interrupt_fds())
    fds = [*irqs, *([death] if death is not None else [])]
    poll = getattr(transport, "poll_interval", 0.0) or 0.001
    while True:
        for c in channel.harvest():
            if c.token is token:
                return c
            if other is not None:
                other(c)
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return None
        wait = remaining if irqs else (poll if remaining is None else min(poll, remaining))
        ready, _, _ = select.select(fds, [], [], wait)
        if death is not None and death in ready and not transport.alive():
            channel.fail_all(DeviceGone())
            raise DeviceGone()
        for fd in ready:
            if fd != death:
                transport.ack_interrupt(fd)


class BlockingDevice:
    """Drive a :class:`FuseChannel` synchronously from one thread: one call at a time.

    The floor the benchmark measures (the ring with no actor and no thread hand-off),
    and tests of the lower layers, use it; everything else goes through the device actor
    (:class:`~pyvirtiofs.actors.device_client.DeviceClient`), which keeps many requests in
    flight.

    ``timeout`` (seconds, None = forever) bounds each :meth:`call` as a whole — an eventfd
    storm without completions cannot stretch it. A call that times out raises
    ``OSError(ETIMEDOUT)`` and abandons its request (see :meth:`FuseChannel.abandon`).
    """

    def __init__(self, transport: VirtioTransport, *, timeout: float | None = 30.0) -> None:
        self.transport = transport
        self.channel = FuseChannel(transport)
        self.timeout = timeout

    def call(self, request: FuseRequest, *, sink: memoryview | None = None,
             timeout: float | None = None) -> Any:
        """Send ``request`` and wait for its reply; daemon errors raise OSError, malformed
        replies :class:`DeviceProtocolError`, a dead device ``DeviceGone``.

        ``timeout`` overrides the device's default for this call.
        """
        self.channel.check(request)
        if not self.channel.submit(request, token=request, sink=sink):
            raise OSError(errno.EBUSY, "device queue full")
        self.channel.flush()
        if not request.expects_reply:
            return None
        limit = self.timeout if timeout is None else timeout
        deadline = None if limit is None else time.monotonic() + limit
        # Other completions: a FORGET coming back (len 0), or a timed-out call's reply.
        c = wait_for(self.channel, request, deadline)
        if c is None:
            self.channel.abandon(request)
            raise OSError(errno.ETIMEDOUT, f"no reply to {opcode_name(request.opcode)}")
        if c.error is not None:
            raise c.error
        return c.result

    def close(self) -> None:
        self.transport.close()
