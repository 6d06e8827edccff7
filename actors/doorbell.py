"""Doorbell: an eventfd that other threads ring to wake one poller, safe against close.

Writing to a file descriptor number after it was closed is a classic hazard: the number is
reused by the next ``open``/``socket``/``eventfd`` anywhere in the process, and the stray
8-byte write lands there — in a new vhost-user socket, say, whose daemon then reads a
garbled message and exits (libvhost-user panics with exit status 1; a soak once saw a
daemon exit that way with no other cause in sight). So ringing and closing are
serialized by a lock, and a closed doorbell ignores rings.
"""

from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["Doorbell"]


class Doorbell:
    """A non-blocking eventfd: :meth:`ring` from any thread, :meth:`fileno` to poll it,
    :meth:`drain` in the polling thread, :meth:`close` once.

    Register and compare :meth:`fileno`, not the object: pollers (``select.poll``,
    ``zmq.Poller``) report plain fds, and a wake-up that is never drained makes the
    poller spin."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()

    def fileno(self) -> int:
        """The eventfd, for ``poll``; -1 once closed."""
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def ring(self) -> None:
        """Wake the poller; a no-op once closed (never a write to a reused fd)."""
        with self._lock:
            if self._fd >= 0:
                with contextlib.suppress(BlockingIOError):  # counter saturated: rung anyway
                    os.eventfd_write(self._fd, 1)

    def drain(self) -> None:
        """Reset the counter (the poller calls this after waking)."""
        with self._lock:
            if self._fd >= 0:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._fd)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __repr__(self) -> str:
        return f"Doorbell(fd={self._fd})"
