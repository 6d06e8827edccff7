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

It also counts **data versions**: a file actor that changed a file's contents (write,
ftruncate, fallocate) bumps that node's version before it replies, and the session bumps
a share-wide one for path-level size changes (truncate, open with O_TRUNC). A file actor's
read-ahead remembers the version it was sent under and is dropped if it changed, so a
read never returns data older than a write another handle of this share completed.
"""

from __future__ import annotations

import os
import time

__all__ = ["PublishedAttrs"]

MAX_ENTRIES = 16384  # as many as the session keeps nodes (SessionConfig.max_nodes)


class PublishedAttrs:
    """(path, follow) → ``os.stat_result`` with an expiry and the node it came from."""

    def __init__(self) -> None:
        self._entries: dict[tuple[bytes, bool], tuple[os.stat_result, float, int]] = {}
        # A set, not a list: a path stat'ed again after its entry expired is put again, and
        # a list would grow by one key each time (a leak in a long-lived agent).
        self._by_node: dict[int, set[tuple[bytes, bool]]] = {}
        self.enabled = True
        self._share_version = 0
        self._node_versions: dict[int, int] = {}

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
        old = self._entries.get(key)
        if old is not None and old[2] != nodeid:  # the path names another file now
            names = self._by_node.get(old[2])
            if names is not None:
                names.discard(key)
                if not names:
                    del self._by_node[old[2]]
        self._entries[key] = (result, expiry, nodeid)
        self._by_node.setdefault(nodeid, set()).add(key)

    def clear(self) -> None:
        self._entries = {}
        self._by_node = {}

    def disable(self) -> None:
        """The device is gone: nothing cached may be answered any more."""
        self.enabled = False
        self.clear()

    # -- any thread ------------------------------------------------------------------------

    def data_version(self, nodeid: int) -> tuple[int, int]:
        """Changes whenever ``nodeid``'s contents may have changed through this share (two
        racing bumps may count once: the value still differs from any earlier reading)."""
        return self._share_version, self._node_versions.get(nodeid, 0)

    def data_changed(self, nodeid: int | None = None) -> None:
        """``nodeid``'s contents changed (None: some file's size changed by path)."""
        if nodeid is None or len(self._node_versions) >= MAX_ENTRIES:
            # Also how the per-node table stays bounded: a new share-wide version makes
            # every earlier reading differ, so the node counters can start over.
            self._node_versions = {}
            self._share_version += 1
        if nodeid is not None:
            self._node_versions[nodeid] = self._node_versions.get(nodeid, 0) + 1

    def invalidate_node(self, nodeid: int) -> None:
        # list(): one C call, so a put() on the session thread cannot change the set while
        # we go through it
        for key in list(self._by_node.pop(nodeid, ())):
            self._entries.pop(key, None)
