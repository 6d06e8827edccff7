"""The device actor: sole owner of the transport, its queues and every request in flight.

A pykka actor cannot block on its inbox and on file descriptors at once, so this actor
brings its own inbox (:class:`_DeviceInbox`): ``get()`` — which pykka calls on the actor's
own thread — waits with ``poll`` on a doorbell *and* the transport's interrupt fds *and*
its death fd, with a timeout that is the nearest request deadline (or the transport's
poll interval while requests are in flight on a transport without interrupts).
Interrupts, deaths and deadlines become messages handled by the same thread, so the rings
are touched by exactly one thread: the "IRQ loop" *is* the actor loop.

Requests come as :class:`~pyvirtiofs.actors.messages.FuseCall` (see
:class:`~pyvirtiofs.actors.device_client.DeviceClient`, the one way to send them); each
carries the caller's :class:`~pyvirtiofs.actors.runtime.Future`, which this thread
completes as it harvests the reply — callbacks on it run here, with no further hop.
Requests that arrive together are placed together and published with one kick (the inbox
flushes before it sleeps). When the ring or guest memory is full, requests wait in order
in a backlog. Every future handed to this actor is completed, whatever happens: a request
that cannot be encoded fails alone; one past its deadline fails with ETIMEDOUT (and is
abandoned: its late reply is reclaimed and whatever it holds paid back); when the daemon
dies, everything pending and later fails with ENOTCONN; a call that reaches the inbox
after the actor stopped is failed by the inbox itself.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import logging
import select
import time
from typing import Any, NamedTuple

import pykka

from pyvirtiofs.actors.channel import (
    Completion,
    FuseChannel,
    RequestContext,
    op_name,
    wait_for,
)
from pyvirtiofs.actors.doorbell import Doorbell
from pyvirtiofs.actors.messages import (
    Abandon,
    DeviceLost,
    DeviceStats,
    Forget,
    FuseCall,
    WatchDevice,
)
from pyvirtiofs.actors.runtime import Future, mark_nonblocking
from pyvirtiofs.codec import fuse_requests
from pyvirtiofs.hw.transport import DeviceGone, VirtioTransport

log = logging.getLogger(__name__)

__all__ = ["DeviceActor"]


class _Event(NamedTuple):
    """What the inbox hands pykka's loop besides messages (the envelope protocol:
    ``message`` and ``reply_to``)."""

    message: Any
    reply_to: Any = None


class _Harvest:
    """The used rings have entries."""


class _Died:
    """The transport's death fd fired."""


class _Expire:
    """A request deadline passed."""


_HARVEST = _Event(_Harvest())
_DIED = _Event(_Died())
_EXPIRE = _Event(_Expire())


class _DeviceInbox:
    """pykka inbox that multiplexes messages with interrupts, death and deadlines."""

    def __init__(self) -> None:
        self._queue: collections.deque[Any] = collections.deque()
        self._wake = Doorbell()
        self._sleeping = False
        self._closed = False
        self._poll = select.poll()
        self._poll.register(self._wake.fileno(), select.POLLIN)
        self._irq_fds: set[int] = set()
        self._death_fd: int | None = None
        self.actor: DeviceActor | None = None  # set in on_start, cleared at close
        self.busy_poll = False

    # Producer side (any thread). The GIL orders these bytecodes, so the lost-wake-up race
    # is closed by: consumer sets _sleeping, re-checks the queue, polls; producer appends,
    # then checks _sleeping.
    def put(self, envelope: Any, /) -> None:
        self._queue.append(envelope)
        if self._closed:
            # The actor stopped between the sender's liveness check and this append: no
            # one will read this. Appending first, then checking, closes the race with
            # close() (which sets _closed first, then drains): every envelope is rejected
            # by one side or the other, exactly once (deque pops are atomic).
            self.reject_queued()
            return
        if self._sleeping:
            self._wake.ring()

    def empty(self) -> bool:
        return not self._queue

    # Consumer side: only the device actor's thread.
    def watch(self, irq_fds: list[int], death_fd: int | None) -> None:
        for fd in irq_fds:
            self._irq_fds.add(fd)
            self._poll.register(fd, select.POLLIN)
        self._death_fd = death_fd
        if death_fd is not None:
            self._poll.register(death_fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def unwatch(self) -> None:
        for fd in [*self._irq_fds, self._death_fd]:
            if fd is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._poll.unregister(fd)
        self._irq_fds.clear()
        self._death_fd = None

    def get(self) -> Any:
        while True:
            if self._queue:
                return self._queue.popleft()
            actor = self.actor
            if actor is None:  # not started, or stopping: only messages matter
                self._sleeping = True
                if not self._queue:
                    self._wait(None)
                self._sleeping = False
                continue
            if actor.has_used():
                return _HARVEST
            timeout = actor.next_timeout()
            if timeout == 0.0:
                return _EXPIRE
            actor.flush()
            self._sleeping = True
            if self._queue:
                self._sleeping = False
                continue
            event = self._wait(0.0 if self.busy_poll else timeout)
            self._sleeping = False
            if event is not None:
                return event

    def _wait(self, timeout: float | None) -> Any:
        """Sleep in poll; the event that woke us (None: a message or nothing yet)."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000 + 0.999))
        irq = None
        for fd, _ in self._poll.poll(ms):
            if fd == self._wake.fileno():
                self._wake.drain()
            elif fd == self._death_fd:
                return _DIED
            elif self.actor is not None:
                self.actor.transport.ack_interrupt(fd)
                irq = _HARVEST
        return irq

    def close(self) -> None:
        """No more messages: reject what is queued and whatever comes later."""
        self._closed = True
        self.actor = None
        self.reject_queued()
        self._wake.close()

    def reject_queued(self) -> None:
        """Complete every queued message's future with an error (any thread)."""
        gone = DeviceGone("virtio-fs device actor is stopped")
        while True:
            try:
                envelope = self._queue.popleft()
            except IndexError:
                return
            if isinstance(envelope.message, FuseCall):
                envelope.message.reply.fail(gone)
            elif envelope.reply_to is not None:
                with contextlib.suppress(Exception):
                    error = pykka.ActorDeadError("device actor is stopped")
                    envelope.reply_to.set_exception((type(error), error, None))


class DeviceActor(pykka.ThreadingActor):
    """Owns a transport. Messages: :class:`FuseCall`, :class:`Forget`, :class:`Abandon`,
    :class:`WatchDevice`, :class:`DeviceStats` (all in :mod:`pyvirtiofs.actors.messages`).

    ``busy_poll``: spin on the used ring instead of sleeping (lower latency, burns a core).
    ``max_in_flight``: how many requests may be on the rings at once (default: as many as
    fit); the rest wait in order, e.g. 1 reproduces the Hermit driver's one-request-at-a-
    time device lock. On stop it sends DESTROY (best effort) and closes the transport,
    which stops the rings and the daemon it launched.
    """

    use_daemon_thread = True  # never keep a process alive just for the device

    def __init__(self, transport: VirtioTransport, *, busy_poll: bool = False,
                 ctx: RequestContext | None = None, destroy_timeout: float = 2.0,
                 max_in_flight: int | None = None) -> None:
        super().__init__()
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self.transport = transport
        self.channel = FuseChannel(transport, ctx=ctx)
        self.backlog: collections.deque[tuple[FuseCall, RequestContext | None]] = (
            collections.deque())
        self.deadlines: list[tuple[float, int, FuseCall]] = []  # a heap
        self._seq = 0
        self.timeouts = 0
        self.dead: DeviceGone | None = None
        self.watchers: list[pykka.ActorRef[Any]] = []
        self.destroy_timeout = destroy_timeout
        self.poll_interval = getattr(transport, "poll_interval", 0.0)
        self.interrupts = list(transport.interrupt_fds())
        inbox = self.actor_inbox
        assert isinstance(inbox, _DeviceInbox)
        inbox.busy_poll = busy_poll

    @staticmethod
    def _create_actor_inbox() -> _DeviceInbox:  # type: ignore[override]
        return _DeviceInbox()

    # -- the inbox's questions (this thread) ------------------------------------------------

    def has_used(self) -> bool:
        return self.dead is None and self.channel.queues.has_used()

    def flush(self) -> None:
        if self.dead is None:
            self.channel.flush()

    def next_timeout(self) -> float | None:
        """Seconds until something must be looked at without a wake-up: the nearest
        deadline, or the poll interval on a transport without interrupts."""
        timeout: float | None = None
        if self.deadlines:
            timeout = max(0.0, self.deadlines[0][0] - time.monotonic())
        if not self.interrupts and self.channel.in_flight and self.dead is None:
            poll = self.poll_interval or 0.001
            timeout = poll if timeout is None else min(timeout, poll)
        return timeout

    # -- life cycle ----------------------------------------------------------------------

    def on_start(self) -> None:
        mark_nonblocking()  # callbacks run here: a wait would be for ourselves
        inbox: _DeviceInbox = self.actor_inbox  # type: ignore[assignment]
        inbox.watch(self.interrupts, self.transport.death_fd())
        inbox.actor = self

    def on_stop(self) -> None:
        self._shutdown()

    def on_failure(self, *exc_info: Any) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        inbox: _DeviceInbox = self.actor_inbox  # type: ignore[assignment]
        if self.dead is None:
            self._destroy()
        gone = DeviceGone("virtio-fs device actor stopped")
        self._fail_everything(gone)
        self._tell_watchers(self.dead or gone)
        inbox.unwatch()
        try:
            self.transport.close()
        except OSError as exc:
            log.warning("closing the transport failed: %s", exc)
        inbox.close()

    def _destroy(self) -> None:
        """Send FUSE_DESTROY and wait briefly for its reply (the session is over)."""
        request = fuse_requests.destroy()
        if not self.channel.submit(request, token=request):
            return
        self.channel.flush()
        with contextlib.suppress(DeviceGone):
            wait_for(self.channel, request, time.monotonic() + self.destroy_timeout,
                     self._deliver)

    # -- messages ------------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, FuseCall):
            self._submit(message)
        elif isinstance(message, _Harvest):
            self._harvest()
        elif isinstance(message, _Expire):
            self._expire()
        elif isinstance(message, _Died):
            if not self.transport.alive():
                self._died()
        elif isinstance(message, Forget):
            if self.dead is None:
                self.channel.forget(message.items)
        elif isinstance(message, DeviceStats):
            return self.stats()
        elif isinstance(message, Abandon):
            self._abandon(message.reply, OSError(errno.ECANCELED, "request abandoned"))
        elif isinstance(message, WatchDevice):
            self.watchers.append(message.watcher)
            if self.dead is not None:
                self._tell_watchers(self.dead, [message.watcher])
        else:
            return super().on_receive(message)
        return None

    def stats(self) -> dict[str, Any]:
        ch = self.channel
        return {
            "requests": {int(k): v for k, v in ch.requests_sent.items()},
            "in_flight": ch.in_flight,
            "backlog": len(self.backlog),
            "protocol_errors": ch.protocol_errors,
            "timeouts": self.timeouts,
            "bytes_free": ch.allocator.bytes_free,
            "dead": self.dead is not None,
        }

    def _submit(self, call: FuseCall) -> None:
        if self.dead is not None:
            call.reply.fail(self.dead)
            return
        try:
            self.channel.check(call.request)
            ctx = _context(call.ctx)
        except OSError as exc:
            call.reply.fail(exc)
            return
        if call.deadline is not None:
            self._seq += 1
            heapq.heappush(self.deadlines, (call.deadline, self._seq, call))
        if self.backlog or self._at_depth() or not self._try_submit(call, ctx):
            self.backlog.append((call, ctx))  # back-pressure: sent as completions free room

    def _at_depth(self) -> bool:
        return self.max_in_flight is not None and self.channel.in_flight >= self.max_in_flight

    def _try_submit(self, call: FuseCall, ctx: RequestContext | None) -> bool:
        """Place one call; True when it is done with (placed, or failed on its own)."""
        try:
            return self.channel.submit(call.request, call.reply, sink=call.sink, ctx=ctx)
        except Exception as exc:  # one bad request must not take the device down
            log.warning("cannot submit %r: %s", call.request, exc)
            call.reply.fail(OSError(errno.EINVAL, f"cannot submit the request: {exc}"))
            return True

    def _abandon(self, reply: Future[Any], error: OSError) -> None:
        """Give up on the call whose future is ``reply``: out of the backlog, or left to
        the device with its late reply reclaimed (and paid back) when it comes."""
        for entry in [e for e in self.backlog if e[0].reply is reply]:
            self.backlog.remove(entry)
        self.channel.abandon(reply)
        reply.fail(error)

    def _expire(self) -> None:
        now = time.monotonic()
        heap = self.deadlines
        while heap and heap[0][0] <= now:
            _, _, call = heapq.heappop(heap)
            if call.reply.done():
                continue
            self.timeouts += 1
            timeout = call.timeout or 0.0
            self._abandon(call.reply, OSError(
                errno.ETIMEDOUT,
                f"no reply to {op_name(call.request.opcode)} in {timeout:g} s; device: "
                f"{self.channel.in_flight} in flight, {len(self.backlog)} waiting"))
        if self.transport.death_fd() is None and self.timeouts and not self.transport.alive():
            self._died()  # a transport that cannot report its death: ask after a timeout
        # Completed calls leave their entries behind: drop them when they dominate.
        if len(heap) > 64 and len(heap) > 4 * (self.channel.in_flight + len(self.backlog)):
            self.deadlines = [e for e in heap if not e[2].reply.done()]
            heapq.heapify(self.deadlines)

    def _harvest(self) -> None:
        for completion in self.channel.harvest():
            self._deliver(completion)
        self._drain_backlog()

    def _drain_backlog(self) -> None:
        """Submit waiting calls in order while they fit. Retried after every harvest, so a
        call that does not fit with nothing in flight would wait forever (no completion
        will come to make room): it fails instead, with the reason check() gives."""
        while self.backlog and not self._at_depth():
            call, ctx = self.backlog[0]
            if self._try_submit(call, ctx):
                self.backlog.popleft()
                continue
            if self.channel.in_flight:
                return
            self.backlog.popleft()
            try:
                self.channel.check(call.request)
            except OSError as exc:
                call.reply.fail(exc)
            else:
                call.reply.fail(OSError(errno.ENOMEM, "no room for the request in an idle "
                                                      "device"))

    @staticmethod
    def _deliver(c: Completion) -> None:
        future = c.token
        if not isinstance(future, Future):
            return  # FORGET/DESTROY sent by the actor itself
        if c.error is not None:
            future.fail(c.error)
        elif not future.done():
            future.set(c.result)

    def _died(self) -> None:
        daemon = getattr(self.transport, "daemon", None)
        rc = getattr(daemon, "returncode", lambda: None)()
        detail = "virtio-fs device died" + (f" (daemon exit status {rc})" if rc is not None else "")
        # The daemon's last words say why (a vhost-user panic, a resource limit, …).
        said = getattr(daemon, "stderr_text", lambda limit: "")(600).strip()
        rings = []
        with contextlib.suppress(Exception):  # memory may be gone with the transport
            rings = [vq.indices() for vq in self.transport.queues]
        log.error("%s; failing %d pending requests%s; rings %s", detail,
                  self.channel.in_flight + len(self.backlog),
                  f"; daemon said: {said}" if said else "", rings)
        self.dead = DeviceGone(detail)
        # Stop watching: the dead socket would stay readable forever (a busy loop).
        inbox: _DeviceInbox = self.actor_inbox  # type: ignore[assignment]
        inbox.unwatch()
        self._fail_everything(self.dead)
        self._tell_watchers(self.dead)

    def _fail_everything(self, exc: OSError) -> None:
        for c in self.channel.fail_all(exc):
            self._deliver(c)
        while self.backlog:
            self.backlog.popleft()[0].reply.fail(exc)
        self.deadlines.clear()

    def _tell_watchers(self, exc: OSError, watchers: list[pykka.ActorRef[Any]] | None = None,
                       ) -> None:
        for ref in self.watchers if watchers is None else watchers:
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(DeviceLost(detail=exc.strerror or str(exc)))
        if watchers is None:
            self.watchers.clear()


def _context(ctx: Any) -> RequestContext | None:
    """The request header's credentials, checked: each must fit its u32 field."""
    if ctx is None:
        return None
    try:
        uid, gid, pid = (int(v) for v in ctx)
    except (TypeError, ValueError):
        raise OSError(errno.EINVAL, f"malformed credentials {ctx!r}") from None
    if not all(0 <= v <= 0xFFFF_FFFF for v in (uid, gid, pid)):
        raise OSError(errno.EINVAL, f"credentials out of range: {ctx!r}")
    return RequestContext(uid, gid, pid)

