"""The device actor: sole owner of the transport, its queues and every request in flight.

It is an :class:`~pyvirtiofs.actors.runtime.InlineActor`: a request is placed in the ring
by the thread that sends it when the actor is idle (no hand-off to another thread on the
way in), or by whichever thread holds the actor's turn; requests that arrive together are
published with one kick (the actor kicks when its mailbox runs empty). One thread of its
own, the *interrupt thread*, waits with ``poll`` on the transport's interrupt fds, its
death fd and a doorbell, with a timeout that is the nearest request deadline (or the
transport's poll interval while requests are in flight on a transport without
interrupts). What it sees it tells the actor as a message (harvest, died, expire), which
it then usually runs itself: the "IRQ loop" is this thread, the state stays the actor's.

Requests come as :class:`~pyvirtiofs.actors.messages.FuseCall` (see
:class:`~pyvirtiofs.actors.device_client.DeviceClient`, the one way to send them); each
carries the caller's :class:`~pyvirtiofs.actors.runtime.Future`, completed as its reply
is harvested — callbacks on it (an actor's continuation) run right there, with no further
hop. When the ring or guest memory is full, requests wait in order in a backlog. Every
future handed to this actor is completed, whatever happens: a request that cannot be
encoded fails alone; one past its deadline fails with ETIMEDOUT (and is abandoned: its
late reply is reclaimed and whatever it holds paid back); when the daemon dies,
everything pending and later fails with ENOTCONN; a call that reaches a stopped actor
fails at once.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import logging
import select
import threading
import time
from typing import Any

import pykka

from pyvirtiofs.actors.channel import (
    Completion,
    FuseChannel,
    RequestContext,
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
from pyvirtiofs.actors.runtime import Future, InlineActor, mark_nonblocking
from pyvirtiofs.codec import fuse_requests
from pyvirtiofs.codec.fuse_abi import opcode_name
from pyvirtiofs.hw.transport import DeviceGone, VirtioTransport

log = logging.getLogger(__name__)

__all__ = ["DeviceActor"]


class _Harvest:
    """The used rings may have entries."""


class _Died:
    """The transport's death fd fired."""


class _Expire:
    """A request deadline may have passed."""


_HARVEST, _DIED, _EXPIRE = _Harvest(), _Died(), _Expire()


class DeviceActor(InlineActor):
    """Owns a transport. Messages: :class:`FuseCall`, :class:`Forget`, :class:`Abandon`,
    :class:`WatchDevice`, :class:`DeviceStats` (all in :mod:`pyvirtiofs.actors.messages`).

    ``busy_poll``: the interrupt thread spins on the used rings instead of sleeping
    (lower latency, burns a core). ``max_in_flight``: how many requests may be on the
    rings at once (default: as many as fit); the rest wait in order, e.g. 1 reproduces
    the Hermit driver's one-request-at-a-time device lock. On stop it sends DESTROY (best
    effort) and closes the transport, which stops the rings and the daemon it launched.
    """

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
        self.busy_poll = busy_poll
        self.interrupts = list(transport.interrupt_fds())
        self.poll_interval = getattr(transport, "poll_interval", 0.0) or 0.001
        # What the interrupt thread reads without the turn: plain values, published by the
        # actor when it goes idle (a float and a bool are read atomically).
        self.wake_at: float | None = None
        self.polling = False  # in flight on a transport without interrupts: poll
        self._bell = Doorbell()
        self._irq: threading.Thread | None = None
        self._stopping = False

    # -- life cycle ----------------------------------------------------------------------

    def on_start(self) -> None:
        self._irq = threading.Thread(target=self._interrupts, name="virtio-fs-irq",
                                     daemon=True)
        self._irq.start()

    def on_stop(self) -> None:
        self._shutdown()

    def on_failure(self, *exc_info: Any) -> None:
        self._shutdown()

    def on_rejected(self, message: Any) -> None:
        if isinstance(message, FuseCall):  # sent just as the actor stopped
            message.reply.fail(DeviceGone("virtio-fs device actor is stopped"))

    def _shutdown(self) -> None:
        self._stopping = True  # the interrupt thread stops
        self._bell.ring()
        if self._irq is not None and self._irq is not threading.current_thread():
            self._irq.join(timeout=5)
        self._bell.close()
        if self.dead is None:
            self._destroy()
        gone = DeviceGone("virtio-fs device actor stopped")
        self._fail_everything(gone)
        self._tell_watchers(self.dead or gone)
        try:
            self.transport.close()
        except OSError as exc:
            log.warning("closing the transport failed: %s", exc)

    def _destroy(self) -> None:
        """Send FUSE_DESTROY and wait briefly for its reply (the session is over)."""
        request = fuse_requests.destroy()
        if not self.channel.submit(request, token=request):
            return
        self.channel.flush()
        with contextlib.suppress(DeviceGone):
            wait_for(self.channel, request, time.monotonic() + self.destroy_timeout,
                     self._deliver)

    # -- the interrupt thread ------------------------------------------------------------

    def _interrupts(self) -> None:
        """Wait for interrupts, death and deadlines; tell the actor (see module doc)."""
        mark_nonblocking()  # completions run here: a wait would be for ourselves
        bell = self._bell
        poller = select.poll()
        poller.register(bell.fileno(), select.POLLIN)
        for fd in self.interrupts:
            poller.register(fd, select.POLLIN)
        death = self.transport.death_fd()
        if death is not None:
            poller.register(death, select.POLLIN | select.POLLHUP | select.POLLERR)
        tell = self.actor_ref.tell
        try:
            while not self._stopping:
                timeout = self._wait_time()
                events = poller.poll(-1 if timeout is None else int(timeout * 1000 + 0.999))
                if self._stopping:
                    return
                # Polled (no interrupts, or spinning): look at the rings, not touch them.
                harvest = (self.polling or self.busy_poll) and self.channel.queues.has_used()
                for fd, _ in events:
                    if fd == bell.fileno():
                        bell.drain()
                    elif fd == death:
                        poller.unregister(death)  # a dead socket stays readable
                        tell(_DIED)
                    else:
                        self.transport.ack_interrupt(fd)
                        harvest = True
                if harvest:
                    tell(_HARVEST)
                wake_at = self.wake_at
                if wake_at is not None and wake_at <= time.monotonic():
                    tell(_EXPIRE)
        except pykka.ActorDeadError:
            return

    def _wait_time(self) -> float | None:
        if self.busy_poll:
            return 0.0
        timeout = None
        wake_at = self.wake_at
        if wake_at is not None:
            timeout = max(0.0, wake_at - time.monotonic())
        if self.polling:
            timeout = self.poll_interval if timeout is None else min(timeout,
                                                                      self.poll_interval)
        return timeout

    def on_idle(self) -> None:
        """Publish what was placed (one kick for all of it) and tell the interrupt thread
        when to look next."""
        if self.dead is not None:
            return
        self.channel.flush()
        self._compact_deadlines()
        wake_at = self.deadlines[0][0] if self.deadlines else None
        polling = not self.interrupts and self.channel.in_flight > 0
        earlier = wake_at is not None and (self.wake_at is None or wake_at < self.wake_at)
        start_polling = polling and not self.polling
        self.wake_at, self.polling = wake_at, polling
        if earlier or start_polling:
            self._bell.ring()

    # -- messages ------------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, FuseCall):
            self._submit(message)
        elif message is _HARVEST:
            self._harvest()
        elif message is _EXPIRE:
            self._expire()
        elif message is _DIED:
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
                f"no reply to {opcode_name(call.request.opcode)} in {timeout:g} s; device: "
                f"{self.channel.in_flight} in flight, {len(self.backlog)} waiting"))
        if self.transport.death_fd() is None and self.timeouts and not self.transport.alive():
            self._died()  # a transport that cannot report its death: ask after a timeout

    def _compact_deadlines(self) -> None:
        """Completed calls leave their heap entries behind (and with them the request, a
        WRITE's payload included): drop them once they are most of the heap. Amortised:
        the heap at least doubles between two compactions."""
        heap = self.deadlines
        if len(heap) > 64 and len(heap) > 2 * (self.channel.in_flight + len(self.backlog)):
            self.deadlines = [e for e in heap if not e[2].reply.done()]
            heapq.heapify(self.deadlines)

    def _harvest(self) -> None:
        if self.dead is not None:
            return
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
        self.wake_at, self.polling = None, False
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
