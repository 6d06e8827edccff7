"""SIGTERM for the long-running commands (bench, soak): unwind like Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["sigterm_interrupts"]


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Inside the block SIGTERM unwinds like Ctrl-C (KeyboardInterrupt), so a command's
    ``finally`` clauses stop its daemons and servers and remove its scratch folders; the
    previous handler is back afterwards. Only the main thread can set handlers: elsewhere
    (a command run from a test's thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
