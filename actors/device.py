"""The device actor: sole owner of the transport, guest memory and virtqueues.

A pykka actor cannot block on its inbox and on eventfds at once, so this actor brings its
own inbox (:class:`_DeviceInbox`): ``get()`` — which pykka calls on the actor's own thread —
waits with ``poll`` on a wake-up eventfd *and* the device's call eventfds *and* the
transport's death fd. Interrupts and daemon death turn into ordinary messages
(``_Interrupt``, ``_DeviceDied``) handled by the same thread. So the rings are touched by
exactly one thread, and there is no separate IRQ thread to coordinate with: the "IRQ loop"
*is* the actor loop.

Callers send :class:`pyvirtiofs.actors.messages.FuseCall` with a future and wait on the future (or
gather many): requests are pipelined up to the ring size; when the ring or guest memory
is full, requests wait in a backlog and go out as completions free space.

Every future handed to this actor is completed, whatever happens: a request that cannot be
encoded fails alone (the actor keeps serving everyone else); when the daemon dies, every
pending and later request fails with ENOTCONN; and a ``FuseCall`` that reaches the inbox
after the actor stopped is failed by the inbox itself (pykka would drop a told message
silently, and its caller would wait for its timeout). Actors that answer from a cache (the
session) subscribe with :class:`pyvirtiofs.actors.messages.WatchDevice` and are told
:class:`pyvirtiofs.actors.messages.DeviceLost`, so that they stop answering too.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import select
from typing import Any

import pykka
from pykka._envelope import Envelope  # pykka's inbox protocol carries Envelopes

from pyvirtiofs.actors.channel import Completion, FuseChannel, RequestContext
from pyvirtiofs.actors.doorbell import Doorbell
from pyvirtiofs.actors.messages import Abandon, DeviceLost, DeviceStats, FuseCall, WatchDevice
from pyvirtiofs.codec import fuse_requests
from pyvirtiofs.codec.fuse_abi import Opcode
from pyvirtiofs.hw.transport import DeviceGone, VirtioTransport

log = logging.getLogger(__name__)

__all__ = ["DeviceActor", "call", "call_many", "timed_out", "wait"]


class _Interrupt:
    """Synthetic message: a call eventfd fired or the used ring has entries."""


class _DeviceDied:
    """Synthetic message: the transport's death fd reported EOF."""


_INTERRUPT = Envelope(_Interrupt())
_DIED = Envelope(_DeviceDied())


class _DeviceInbox:
    """pykka inbox that multiplexes messages with device interrupts (see module doc)."""

    def __init__(self) -> None:
        self._queue: collections.deque[Envelope[Any]] = collections.deque()
        self._wake = Doorbell()
        self._sleeping = False
        self._closed = False
        self._poll = select.poll()
        self._poll.register(self._wake.fileno(), select.POLLIN)
        self._call_fds: dict[int, int] = {}  # fd -> queue index
        self._death_fd: int | None = None
        self.idle_hook: Any = None  # called before blocking (flushes batched kicks)
        self.ring_has_used: Any = None  # () -> bool, checked before blocking
        self.busy_poll = False

    # Producer side (any thread). The GIL orders these bytecodes, so the classic
    # lost-wake-up race is closed by: consumer sets _sleeping, re-checks the queue, polls;
    # producer appends, then checks _sleeping.
    def put(self, envelope: Envelope[Any], /) -> None:
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
    def watch(self, call_fds: list[int], death_fd: int) -> None:
        for index, fd in enumerate(call_fds):
            self._call_fds[fd] = index
            self._poll.register(fd, select.POLLIN)
        self._death_fd = death_fd
        self._poll.register(death_fd, select.POLLIN | select.POLLHUP | select.POLLERR)

    def unwatch(self) -> None:
        for fd in [*self._call_fds, self._death_fd]:
            if fd is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._poll.unregister(fd)
        self._call_fds.clear()
        self._death_fd = None

    def get(self) -> Envelope[Any]:
        while True:
            if self._queue:
                return self._queue.popleft()
            if self.ring_has_used is not None and self.ring_has_used():
                return _INTERRUPT
            if self.idle_hook is not None:
                self.idle_hook()
            self._sleeping = True
            if self._queue:
                self._sleeping = False
                continue
            events = self._poll.poll(0 if self.busy_poll else None)
            self._sleeping = False
            interrupted = False
            for fd, _ in events:
                if fd == self._wake.fileno():
                    self._wake.drain()
                elif fd == self._death_fd:
                    return _DIED
                else:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                    interrupted = True
            if interrupted:
                return _INTERRUPT

    def close(self) -> None:
        """No more messages: reject what is queued and whatever comes later."""
        self._closed = True
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
                _fail(envelope.message.reply, gone)
            elif envelope.reply_to is not None:
                _fail(envelope.reply_to, pykka.ActorDeadError("device actor is stopped"))


class DeviceActor(pykka.ThreadingActor):
    """Owns a transport. Messages: :class:`FuseCall`, :class:`Abandon`,
    :class:`WatchDevice`, :class:`DeviceStats` (all in :mod:`pyvirtiofs.actors.messages`).

    ``busy_poll``: spin on the used ring instead of sleeping on eventfds (lower latency,
    burns a core). ``max_in_flight``: how many requests may be on the rings at once
    (default: as many as fit); the rest wait in order, e.g. 1 reproduces the Hermit
    driver's one-request-at-a-time device lock. On stop it sends DESTROY (best effort)
    and closes the transport, which stops the rings and the daemon it launched.
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
        self.dead: DeviceGone | None = None
        self.watchers: list[pykka.ActorRef[Any]] = []
        self.destroy_timeout = destroy_timeout
        inbox = self.actor_inbox
        assert isinstance(inbox, _DeviceInbox)
        inbox.busy_poll = busy_poll

    @staticmethod
    def _create_actor_inbox() -> _DeviceInbox:  # type: ignore[override]
        return _DeviceInbox()

    # -- life cycle ----------------------------------------------------------------------

    def on_start(self) -> None:
        inbox: _DeviceInbox = self.actor_inbox  # type: ignore[assignment]
        queues = self.transport.queues
        inbox.watch([self.transport.call_fd(i) for i in range(len(queues))],
                    self.transport.death_fd())
        inbox.idle_hook = self.channel.flush
        inbox.ring_has_used = lambda: any(vq.has_used() for vq in self.transport.queues)

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
        inbox.idle_hook = inbox.ring_has_used = None
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
        fds = [self.transport.call_fd(i) for i in range(len(self.transport.queues))]
        deadline_polls = max(1, int(self.destroy_timeout / 0.05))
        for _ in range(deadline_polls):
            for c in self.channel.harvest():
                self._deliver(c)
                if c.token is request:
                    return
            ready, _, _ = select.select([*fds, self.transport.death_fd()], [], [], 0.05)
            if self.transport.death_fd() in ready and not self.transport.alive():
                return

    # -- messages ------------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, FuseCall):
            self._submit(message)
        elif isinstance(message, _Interrupt):
            self._harvest()
        elif isinstance(message, _DeviceDied):
            if not self.transport.alive():
                self._died()
        elif isinstance(message, DeviceStats):
            return self.stats()
        elif isinstance(message, Abandon):
            self._abandon(message.reply)
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
            "bytes_free": ch.allocator.bytes_free,
            "dead": self.dead is not None,
        }

    def _submit(self, call: FuseCall) -> None:
        if self.dead is not None:
            _fail(call.reply, self.dead)
            return
        try:
            self.channel.check(call.request)
            ctx = _context(call.ctx)
        except OSError as exc:
            _fail(call.reply, exc)
            return
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
            _fail(call.reply, OSError(errno.EINVAL, f"cannot submit the request: {exc}"))
            return True

    def _abandon(self, reply: Any) -> None:
        for entry in [e for e in self.backlog if e[0].reply is reply]:
            self.backlog.remove(entry)
        self.channel.abandon(reply)

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
                _fail(call.reply, exc)
            else:
                _fail(call.reply, OSError(errno.ENOMEM, "no room for the request in an idle "
                                                        "device"))

    @staticmethod
    def _deliver(c: Completion) -> None:
        future = c.token
        if not isinstance(future, pykka.Future):
            return  # FORGET/DESTROY sent by the actor itself
        if c.error is not None:
            _fail(future, c.error)
        else:
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
        inbox.ring_has_used = None
        self._fail_everything(self.dead)
        self._tell_watchers(self.dead)

    def _fail_everything(self, exc: OSError) -> None:
        for c in self.channel.fail_all(exc):
            self._deliver(c)
        while self.backlog:
            _fail(self.backlog.popleft()[0].reply, exc)

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


def _fail(future: Any, exc: BaseException) -> None:
    with contextlib.suppress(Exception):  # a future already completed stays as it is
        future.set_exception((type(exc), exc, exc.__traceback__))


def call(device: pykka.ActorRef[DeviceActor], request: Any, *, sink: Any = None,
         ctx: tuple[int, int, int] | None = None) -> pykka.Future[Any]:
    """Send one FUSE request to the device actor; returns a future for its decoded reply.

    A stopped device fails the future with ENOTCONN instead of raising ActorDeadError.
    """
    future: pykka.ThreadingFuture[Any] = pykka.ThreadingFuture()
    try:
        device.tell(FuseCall(request=request, reply=future, sink=sink, ctx=ctx))
    except pykka.ActorDeadError:
        _fail(future, DeviceGone("virtio-fs device actor is stopped"))
    return future


def wait(device: pykka.ActorRef[DeviceActor], future: pykka.Future[Any], request: Any,
         timeout: float) -> Any:
    """The reply ``future`` brings, or ETIMEDOUT after ``timeout`` seconds — and then the
    request is abandoned first, so a late reply is never delivered (nor copied into the
    caller's buffer after the caller moved on)."""
    try:
        return future.get(timeout=timeout)
    except pykka.Timeout:
        pass
    with contextlib.suppress(Exception):  # a stuck or stopped device: nothing to undo
        device.ask(Abandon(reply=future), timeout=1.0)
    try:
        # Once the device actor has handled Abandon, the reply either came just before
        # (then it is here, and dropping it would leak what it carries: a lookup count,
        # an open handle) or it will never be delivered.
        return future.get(timeout=0)
    except pykka.Timeout:
        raise timed_out(device, request, timeout) from None


def timed_out(device: pykka.ActorRef[DeviceActor], request: Any, timeout: float) -> OSError:
    """The ETIMEDOUT for a request that got no reply in ``timeout`` seconds, saying what
    the device actor had in hand then (in flight, waiting) — a healthy daemon answers in
    milliseconds, so this is a bug to diagnose, not a condition to handle."""
    what = Opcode(request.opcode).name if request is not None else "a request"
    try:
        stats = device.ask(DeviceStats(), timeout=1.0)
        state = f"; device: {stats['in_flight']} in flight, {stats['backlog']} waiting"
    except Exception:  # a stuck or stopped device actor: say so
        state = "; the device actor does not answer"
    return OSError(errno.ETIMEDOUT, f"no reply to {what} in {timeout:g} s{state}")


def call_many(device: pykka.ActorRef[DeviceActor], requests: list[Any]) -> list[Any]:
    """Pipeline ``requests`` and wait for all; raises the first error after all finished."""
    futures = [call(device, r) for r in requests]
    results: list[Any] = []
    first: BaseException | None = None
    for f in futures:
        try:
            results.append(f.get())
        except Exception as exc:
            first = first or exc
            results.append(None)
    if first is not None:
        raise first
    return results

