"""The session's knowledge of the share: nodes, the names that lead to them, and the
lookups the daemon counted for each. Pure bookkeeping: no threads, no I/O.

Every positive LOOKUP (or CREATE, MKDIR, …, READDIRPLUS entry) makes the daemon count one
lookup on the node and hold the file open for it; the session owes one FORGET per lookup
eventually, or the daemon pins one file descriptor per node forever. :class:`NodeTable`
keeps that count per node, the node's attributes with the daemon's attribute timeout, and
the *name cache*: (parent, name) → node with the daemon's entry timeout. What must be
given back is queued in :attr:`NodeTable.forgets`; the owner sends it (FORGET /
BATCH_FORGET) and empties the list.

Bounded: past ``max_nodes`` the least recently used nodes that nobody pins are forgotten.
Pins are counted per node: an open handle, a mount root, a path walk in progress each
hold one, and a pinned node is never forgotten, nor are the names leading to it. A node
whose last name goes (unlink, rename over it, eviction of its parent) is forgotten once
nobody pins it — an open file that was unlinked is given back when it is closed.

Time is ``clock()`` (``time.monotonic`` by default), so tests can drive expiry.
"""

from __future__ import annotations

import stat as stat_mod
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvirtiofs.codec.fuse_abi import FUSE_ROOT_ID
from pyvirtiofs.codec.fuse_types import Attr, EntryOut

__all__ = ["Node", "NodeTable"]

DEFAULT_MAX_NODES = 16384


@dataclass(slots=True, eq=False)
class Node:
    """One node the daemon knows us to hold."""

    nodeid: int
    nlookup: int = 0
    pins: int = 0
    attr: Attr | None = None
    attr_expiry: float = 0.0
    names: set[tuple[int, bytes]] = field(default_factory=set)  # names leading here

    @property
    def kind(self) -> int:
        """The file type bits (``S_IFMT``), 0 while unknown. A node's type never changes,
        so attributes past their timeout still tell it."""
        return stat_mod.S_IFMT(self.attr.mode) if self.attr is not None else 0

    def is_dir(self) -> bool:
        return self.kind == stat_mod.S_IFDIR

    def is_link(self) -> bool:
        return self.kind == stat_mod.S_IFLNK


def _valid_until(now: float, sec: int, nsec: int) -> float:
    return now + sec + nsec / 1e9


class NodeTable:
    """Nodes, names and lookup counts (see module doc)."""

    def __init__(self, max_nodes: int = DEFAULT_MAX_NODES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_nodes = max_nodes
        self.clock = clock
        self._nodes: OrderedDict[int, Node] = OrderedDict()  # LRU order: oldest first
        self._names: dict[tuple[int, bytes], tuple[int, float]] = {}  # → (node id, expiry)
        self._children: dict[int, set[bytes]] = {}
        self.forgets: list[tuple[int, int]] = []  # (node id, lookups) to give back

    # -- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, nodeid: int) -> Node | None:
        return self._nodes.get(nodeid)

    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    @property
    def name_count(self) -> int:
        return len(self._names)

    def lookups_held(self) -> int:
        return sum(n.nlookup for n in self._nodes.values())

    def cached(self, parent: int, name: bytes) -> Node | None:
        """The node ``name`` in ``parent`` leads to, while the daemon's entry timeout
        holds; None when unknown or expired (ask the daemon)."""
        hit = self._names.get((parent, name))
        if hit is None or hit[1] <= self.clock():
            return None
        node = self._nodes.get(hit[0])
        if node is not None:
            self._nodes.move_to_end(node.nodeid)
        return node

    def name_expiry(self, parent: int, name: bytes) -> float:
        hit = self._names.get((parent, name))
        return hit[1] if hit is not None else 0.0

    def fresh_attr(self, node: Node) -> Attr | None:
        """The node's attributes while the daemon's attribute timeout holds, else None."""
        if node.attr is not None and node.attr_expiry > self.clock():
            return node.attr
        return None

    def published_expiry(self, node: Node) -> float:
        """Until when a path result for ``node`` may be served without asking: both its
        attributes and every name that leads to it must still be valid."""
        expiry = node.attr_expiry
        for key in node.names:
            hit = self._names.get(key)
            if hit is not None:
                expiry = min(expiry, hit[1])
        return expiry

    # -- learning --------------------------------------------------------------------------

    def node(self, nodeid: int) -> Node:
        """The node, created if new (with no lookups yet), marked most recently used."""
        node = self._nodes.get(nodeid)
        if node is None:
            node = self._nodes[nodeid] = Node(nodeid)
            self._evict()
        else:
            self._nodes.move_to_end(nodeid)
        return node

    def learn(self, parent: int, name: bytes, entry: EntryOut) -> Node:
        """Account for one lookup the daemon counted (LOOKUP, CREATE, MKDIR, …): the node
        gets the entry's attributes and ``name`` in ``parent`` leads to it."""
        node = self.node(entry.nodeid)
        node.nlookup += 1
        now = self.clock()
        self._set_attr(node, entry.attr, _valid_until(now, entry.attr_valid,
                                                      entry.attr_valid_nsec))
        self.add_name(parent, name, node,
                      _valid_until(now, entry.entry_valid, entry.entry_valid_nsec))
        return node

    def set_attr(self, node: Node, attr: Attr, valid: int, valid_nsec: int) -> None:
        self._set_attr(node, attr, _valid_until(self.clock(), valid, valid_nsec))

    @staticmethod
    def _set_attr(node: Node, attr: Attr, expiry: float) -> None:
        node.attr = attr
        node.attr_expiry = expiry

    def invalidate(self, nodeid: int) -> None:
        """The node's attributes are stale (it or what it contains changed)."""
        node = self._nodes.get(nodeid)
        if node is not None:
            node.attr_expiry = 0.0

    def add_name(self, parent: int, name: bytes, node: Node, expiry: float) -> None:
        key = (parent, name)
        old = self._names.get(key)
        if old is not None and old[0] != node.nodeid:
            self.drop_name(parent, name)
        self._names[key] = (node.nodeid, expiry)
        self._children.setdefault(parent, set()).add(name)
        node.names.add(key)

    def drop_name(self, parent: int, name: bytes, *, forget_orphan: bool = True) -> None:
        """``name`` in ``parent`` no longer leads where it did (removed, renamed, found
        absent). Its node is forgotten if that was its last name and nobody pins it."""
        hit = self._names.pop((parent, name), None)
        kids = self._children.get(parent)
        if kids is not None:
            kids.discard(name)
        if hit is None:
            return
        node = self._nodes.get(hit[0])
        if node is None:
            return
        node.names.discard((parent, name))
        if forget_orphan and not node.names and node.pins == 0:
            self.forget(node)

    def move_name(self, old_parent: int, old_name: bytes, new_parent: int,
                  new_name: bytes) -> None:
        """rename(2) moved a name: carry the cache entry along (the kernel's d_move)."""
        hit = self._names.get((old_parent, old_name))
        self.drop_name(old_parent, old_name, forget_orphan=False)
        if hit is not None:
            node = self._nodes.get(hit[0])
            if node is not None:
                self.add_name(new_parent, new_name, node, hit[1])

    # -- pins ------------------------------------------------------------------------------

    def pin(self, node: Node) -> None:
        node.pins += 1

    def unpin(self, node: Node) -> None:
        """One pin less; a node left with no pin and no name is forgotten."""
        node.pins = max(0, node.pins - 1)
        if node.pins == 0 and not node.names and node.nodeid in self._nodes \
                and node.nodeid != FUSE_ROOT_ID:
            self.forget(node)

    # -- forgetting ------------------------------------------------------------------------

    def forget(self, node: Node) -> None:
        """Drop a node, its names and what is cached below it; owe its lookups back."""
        if self._nodes.pop(node.nodeid, None) is None:
            return
        for parent, name in list(node.names):
            self._names.pop((parent, name), None)
            kids = self._children.get(parent)
            if kids is not None:
                kids.discard(name)
        node.names.clear()
        if node.nlookup > 0 and node.nodeid != FUSE_ROOT_ID:
            self.forgets.append((node.nodeid, node.nlookup))
        node.nlookup = 0
        # What was cached below goes too: a child left without a name could never be
        # reached again, and would hold its lookups (and the daemon's fd) until evicted.
        for name in self._children.pop(node.nodeid, set()):
            self.drop_name(node.nodeid, name)

    def _evict(self) -> None:
        excess = len(self._nodes) - self.max_nodes
        if excess <= 0:
            return
        victims = []
        for node in self._nodes.values():
            if node.pins == 0 and node.nodeid != FUSE_ROOT_ID:
                victims.append(node)
                if len(victims) == excess:
                    break
        for node in victims:
            self.forget(node)

    def forget_all(self) -> None:
        """The session ends: owe back every lookup held (the root's are never counted)."""
        for node in list(self._nodes.values()):
            if node.nlookup > 0 and node.nodeid != FUSE_ROOT_ID:
                self.forgets.append((node.nodeid, node.nlookup))
            node.nlookup = 0
        self._nodes.clear()
        self._names.clear()
        self._children.clear()

    def take_forgets(self) -> list[tuple[int, int]]:
        out, self.forgets = self.forgets, []
        return out
