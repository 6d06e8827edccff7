"""Attributes the session publishes for lock-free reads by callers' threads.

A warm ``stat`` — attributes still inside the daemon's timeout — should not pay for an
actor round trip (30–50 µs here): the session actor, which resolved the path, publishes
the result here and the in-process API reads it directly.

Ownership: only the session actor's thread adds entries or clears the table. File actors
may *invalidate* a node's entries (after a write, before they reply, so their caller
never sees the old size). Readers only read. Each of those is a single dict operation,
atomic under CPython's GIL; the worst interleaving (a stat racing a write in another
thread) leaves an entry that is at most one attribute timeout old — what the Linux
client allows too.
"""

from __future__ import annotations

import os
import time

__all__ = ["PublishedAttrs"]

MAX_ENTRIES = 65536


class PublishedAttrs:
    """(path, follow) → ``os.stat_result`` with an expiry and the node it came from."""

    def __init__(self) -> None:
        self._entries: dict[tuple[bytes, bool], tuple[os.stat_result, float, int]] = {}
        self._by_node: dict[int, list[tuple[bytes, bool]]] = {}
        self.enabled = True

    def get(self, path: bytes, follow: bool) -> os.stat_result | None:
        """A fresh published result, or None (ask the session)."""
        entry = self._entries.get((path, follow))
        if entry is None or not self.enabled or entry[1] <= time.monotonic():
            return None
        return entry[0]

    # -- session thread --------------------------------------------------------------------

    def put(self, path: bytes, follow: bool, result: os.stat_result, expiry: float,
            nodeid: int) -> None:
        if len(self._entries) >= MAX_ENTRIES:
            self.clear()
        key = (path, follow)
        self._entries[key] = (result, expiry, nodeid)
        self._by_node.setdefault(nodeid, []).append(key)

    def clear(self) -> None:
        self._entries = {}
        self._by_node = {}

    def disable(self) -> None:
        """The device is gone: nothing cached may be answered any more."""
        self.enabled = False
        self.clear()

    # -- any thread ------------------------------------------------------------------------

    def invalidate_node(self, nodeid: int) -> None:
        for key in self._by_node.pop(nodeid, ()):
            self._entries.pop(key, None)
