"""The one way to send a request to the device and get its reply.

The session, the open handles, the FUSE mount and the servers all use a
:class:`DeviceClient`: :meth:`~DeviceClient.submit` returns a
:class:`~pyvirtiofs.actors.runtime.Future` that the device actor's thread completes as it
harvests the reply (callbacks on it run there: no further hop), with a deadline after
which the request fails with ETIMEDOUT and is abandoned. An actor's task yields that
future; a plain thread calls :meth:`~DeviceClient.call`.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable
from typing import Any

import pykka

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.runtime import Future
from pyvirtiofs.hw.transport import DeviceGone

__all__ = ["DEFAULT_TIMEOUT", "DeviceClient"]

DEFAULT_TIMEOUT = 60.0
_FAILSAFE = 5.0  # how much longer a blocked caller waits than the device's own deadline


class DeviceClient:
    """Submit FUSE requests to one device actor (thread-safe).

    ``timeout``: the default deadline of a request, in seconds (None: no deadline)."""

    __slots__ = ("_tell", "ref", "timeout")

    def __init__(self, ref: pykka.ActorRef[Any], *, timeout: float | None = DEFAULT_TIMEOUT,
                 ) -> None:
        self.ref = ref
        self.timeout = timeout
        self._tell = ref.tell

    def submit(self, request: Any, *, ctx: m.Credentials | None = None, sink: Any = None,
               timeout: float | None = -1.0,
               callback: Callable[[Future[Any]], None] | None = None) -> Future[Any]:
        """Send ``request``; its future. ``sink``: a buffer READ data lands in (the
        result is then the byte count). ``timeout``: seconds, None for none, default the
        client's. ``callback(future)`` runs when it completes (on the device thread)."""
        future: Future[Any] = Future()
        if callback is not None:
            future.add_done_callback(callback)
        if timeout is not None and timeout < 0:
            timeout = self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._tell(m.FuseCall(request=request, reply=future, sink=sink, ctx=ctx,
                                  deadline=deadline, timeout=timeout))
        except pykka.ActorDeadError:
            future.fail(DeviceGone("virtio-fs device actor is stopped"))
        return future

    def call(self, request: Any, *, ctx: m.Credentials | None = None, sink: Any = None,
             timeout: float | None = -1.0) -> Any:
        """Send ``request`` and wait for its reply (a plain thread's way; never an
        actor's). Daemon errors raise OSError; no reply in time, ETIMEDOUT."""
        if timeout is not None and timeout < 0:
            timeout = self.timeout
        future = self.submit(request, ctx=ctx, sink=sink, timeout=timeout)
        try:
            return future.get(timeout=None if timeout is None else timeout + _FAILSAFE)
        except pykka.Timeout:
            # The device actor itself is stuck: make sure no late reply lands in ``sink``.
            self.abandon(future)
            raise OSError(errno.ETIMEDOUT, "the device actor does not answer") from None
        except BaseException:
            if not future.done():  # interrupted (Ctrl-C): the buffer is the caller's again
                self.abandon(future)
            raise

    def forget(self, items: list[tuple[int, int]]) -> None:
        """Give lookups back (FORGET / BATCH_FORGET on the hiprio queue; no reply)."""
        if items:
            with contextlib.suppress(pykka.ActorDeadError):
                self._tell(m.Forget(items=items))

    def abandon(self, future: Future[Any], *, wait: bool = True) -> None:
        """Give up on a submitted request: it fails with ECANCELED and its late reply is
        reclaimed. With ``wait``, once this returns nothing is copied into its sink."""
        try:
            if wait:
                self.ref.ask(m.Abandon(reply=future), timeout=_FAILSAFE)
            else:
                self._tell(m.Abandon(reply=future))
        except (pykka.ActorDeadError, pykka.Timeout):
            pass  # a stopped device delivers nothing any more

    def watch(self, watcher: pykka.ActorRef[Any]) -> None:
        """Tell ``watcher`` :class:`~pyvirtiofs.actors.messages.DeviceLost` when the device
        dies (at once if it already has)."""
        try:
            self._tell(m.WatchDevice(watcher=watcher))
        except pykka.ActorDeadError:
            with contextlib.suppress(pykka.ActorDeadError):
                watcher.tell(m.DeviceLost(detail="virtio-fs device actor is stopped"))

    def stats(self, timeout: float = _FAILSAFE) -> dict[str, Any]:
        """The device actor's counters (requests per opcode, in flight, …)."""
        result: dict[str, Any] = self.ref.ask(m.DeviceStats(), timeout=timeout)
        return result

    def alive(self) -> bool:
        return self.ref.is_alive()
