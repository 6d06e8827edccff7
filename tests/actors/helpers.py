"""Helpers shared by the actor-layer tests (tests/actors); no tests of its own.

Everything here works against a real virtiofsd started per test: the helpers only build
the stack (transport → device actor → session actor → facade) and observe the daemon
from outside (its open file descriptors through ``/proc``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.session import SessionConfig
from pyvirtiofs.api.local import VirtioFS
from pyvirtiofs.codec.fuse_abi import Opcode
from pyvirtiofs.hw.vhost_user.transport import VhostUserTransport, open_private_device
from tests.conftest import open_fd_count

T = TypeVar("T")

__all__ = ["daemon_fds", "eventually", "mounted", "request_count"]


def daemon_fds(transport: VhostUserTransport) -> int:
    """How many file descriptors the virtiofsd process that serves requests holds open
    (with the namespace sandbox that is the daemon's worker child, not the pid we
    started: ``Virtiofsd.worker_pid``)."""
    daemon = transport.daemon
    assert daemon is not None
    pid = daemon.worker_pid()
    assert pid is not None
    return open_fd_count(pid)


def eventually(probe: Callable[[], T], accept: Callable[[T], bool], *,
               timeout: float = 5.0, interval: float = 0.01) -> T:
    """Poll ``probe`` until ``accept`` says yes or the deadline passes; returns the last
    value either way (the caller asserts on it, so a failure shows what was seen).

    For effects that are asynchronous by design — FORGET has no reply, a handle actor
    releases on its own thread — a deadline-bounded poll instead of a guessed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if accept(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def request_count(fs: VirtioFS, opcode: Opcode) -> int:
    """How many requests with ``opcode`` the device actor has submitted so far."""
    stats: dict[str, Any] = fs.device.ask(m.DeviceStats())
    return int(stats["requests"].get(int(opcode), 0))


@contextlib.contextmanager
def mounted(share: Path | str, *, tag: str | None = None, request_timeout: float = 60.0,
            **transport_kwargs: Any) -> Iterator[tuple[VirtioFS, VhostUserTransport]]:
    """A private virtiofsd on ``share`` with the whole actor stack on top; the transport is
    returned too, for the daemon's pid. Closed (session, device, daemon) on exit."""
    transport = open_private_device(share, **transport_kwargs)
    try:
        fs = VirtioFS(transport, SessionConfig(tag=tag, request_timeout=request_timeout))
    except BaseException:
        transport.close()
        raise
    try:
        yield fs, transport
    finally:
        fs.close()
        transport.close()  # idempotent; the device actor normally closed it already
