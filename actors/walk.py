"""Path walking, one component at a time, as Linux's path lookup does it. Pure: the walk
says what it needs (a LOOKUP, a READLINK, fresh attributes) and is resumed with the
answer; it does no I/O and starts no thread, so every rule is unit-tested without a
daemon (``tests/actors/test_walk.py``).

The rules:

* components are separated by ``/``; empty ones are ignored; ``.`` stays and ``..`` goes
  up, never above the mount root; both — and every other component — need the node they
  are looked up in to be a directory (``"file/.."`` is ENOTDIR, as on Linux);
* a trailing slash (or a final ``.``/``..``) means the path must be a directory, and a
  symbolic link in the last component is then followed;
* symbolic links in the middle are always followed; in the last one, as the caller says
  (``follow``); relative targets go on from the link's directory, absolute ones from the
  mount root; more than 40 links in one walk is ELOOP; an empty target is ENOENT;
* with credentials that are not root, each directory searched needs execute permission
  (fresh attributes: a chmod must take effect within the attribute timeout).

Three modes say what the walk resolves:

``LOOKUP``  the node the path names (stat, open of an existing file, …);
``PARENT``  the directory holding the last component, and its name, unresolved (mkdir,
            unlink, rename, …: the operation decides what the name may be);
``CREATE``  ``open(O_CREAT)`` without ``O_EXCL``: the existing node, following symbolic
            links in the last component unless ``follow`` is False (then a link is
            ELOOP, as with ``O_NOFOLLOW``) — a dangling link creates its target — or the
            directory and name to create; a trailing slash is EISDIR.

Each node on the walk's way is pinned in the :class:`~pyvirtiofs.actors.nodes.NodeTable`
until :meth:`Walk.release`, so that other walks running meanwhile cannot make the table
forget it.
"""

from __future__ import annotations

import errno
import os
from typing import NamedTuple

from pyvirtiofs.actors.nodes import Node, NodeTable
from pyvirtiofs.actors.permissions import Cred, X, may

__all__ = ["CREATE", "LOOKUP", "MAX_SYMLINK_HOPS", "PARENT", "NeedAttr", "NeedLookup",
           "NeedReadlink", "Resolved", "Walk", "split_path"]

LOOKUP, PARENT, CREATE = "lookup", "parent", "create"
MAX_SYMLINK_HOPS = 40
PATH_MAX = 4096
NAME_MAX = 255
ROOT_NAME = b"/"  # the name PARENT gives when the path is the mount root itself


class NeedLookup(NamedTuple):
    """Send LOOKUP(parent, name); resume with the node learned, or None if absent."""

    parent: int
    name: bytes


class NeedReadlink(NamedTuple):
    """Send READLINK(nodeid); resume with :meth:`Walk.link_target`."""

    nodeid: int


class NeedAttr(NamedTuple):
    """Send GETATTR(nodeid), store the attributes in the table; resume with None."""

    nodeid: int


class Resolved(NamedTuple):
    """The walk's outcome. LOOKUP: ``node``. PARENT: ``parent`` and ``name`` (``.``,
    ``..`` or ``/`` included: the operation decides). CREATE: ``node`` when it exists,
    else ``parent`` and ``name`` to create. ``trailing``: the path ended in a slash."""

    node: Node | None
    parent: Node | None
    name: bytes
    trailing: bool


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def split_path(path: bytes) -> tuple[list[bytes], bool]:
    """Components (empty ones dropped) and whether the path must name a directory."""
    if not path:
        raise _error(errno.ENOENT)
    if b"\0" in path:
        raise OSError(errno.EINVAL, "embedded null byte")
    if len(path) >= PATH_MAX:
        raise _error(errno.ENAMETOOLONG)
    parts = [c for c in path.split(b"/") if c]
    if any(len(c) > NAME_MAX for c in parts):
        raise _error(errno.ENAMETOOLONG)
    return parts, path.endswith(b"/")


class Walk:
    """One path resolution (see module doc). Drive it with :meth:`step` until it returns
    :class:`Resolved`; answer each ``Need*`` it returns with :meth:`found`,
    :meth:`link_target` or :meth:`resume`. Any of them raises the path's OSError when the
    walk ends in one. Always :meth:`release`."""

    def __init__(self, table: NodeTable, root: Node, parts: list[bytes], *,
                 mode: str = LOOKUP, follow: bool = True, trailing: bool = False,
                 cred: Cred | None = None) -> None:
        self.table = table
        self.mode = mode
        self.follow = follow
        self.trailing = trailing
        self.cred = None if cred is None or cred.root else cred  # root searches anything
        self.hops = 0
        self.stack: list[Node] = []
        self.todo = list(reversed(parts))  # next component last
        self._waiting: NeedLookup | NeedReadlink | NeedAttr | None = None
        self._link: Node | None = None  # the symbolic link whose target is awaited
        self._answer: Node | None = None  # what the last LOOKUP found
        self._create_here = False  # CREATE: the last component does not exist
        self._found_existing = False  # CREATE: it does
        self._enter(root)

    # -- the driver's side ------------------------------------------------------------------

    def step(self) -> NeedLookup | NeedReadlink | NeedAttr | Resolved:
        if self._waiting is not None:
            raise RuntimeError(f"the walk still waits for {self._waiting}")
        need = self._advance()
        if not isinstance(need, Resolved):
            self._waiting = need
        return need

    def found(self, node: Node | None) -> None:
        """The answer to :class:`NeedLookup`: the node (already learned into the table),
        or None when the name does not exist."""
        self._take(NeedLookup)
        if node is None:
            if self.mode == CREATE and len(self.todo) == 1:
                self._create_here = True
                return
            raise _error(errno.ENOENT)
        # Used as it is, not looked up again in the cache: an entry the daemon gave no
        # time to live (cache=none) is expired already.
        self._answer = node

    def link_target(self, target: bytes) -> None:
        """The answer to :class:`NeedReadlink`."""
        self._take(NeedReadlink)
        link, self._link = self._link, None
        assert link is not None
        if not target:
            raise _error(errno.ENOENT)
        self.todo.pop()  # the link's own name
        parts = [c for c in target.split(b"/") if c]
        if target.endswith(b"/") and self.todo == [] and parts:
            # "link -> dir/" at the end: the path must name a directory now.
            self.trailing = True
            if self.mode == CREATE:
                raise _error(errno.EISDIR)
        self.todo.extend(reversed(parts))
        if target.startswith(b"/"):
            while len(self.stack) > 1:
                self.table.unpin(self.stack.pop())

    def resume(self) -> None:
        """The answer to :class:`NeedAttr` (the table holds fresh attributes now)."""
        self._take(NeedAttr)

    def release(self) -> None:
        """Unpin the nodes held (idempotent)."""
        while self.stack:
            self.table.unpin(self.stack.pop())

    # -- the rules --------------------------------------------------------------------------

    def _take(self, kind: type) -> NeedLookup | NeedReadlink | NeedAttr:
        need = self._waiting
        if not isinstance(need, kind):
            raise RuntimeError(f"the walk waits for {need}, not {kind.__name__}")
        self._waiting = None
        return need

    def _enter(self, node: Node) -> None:
        self.table.pin(node)
        self.stack.append(node)

    def _advance(self) -> NeedLookup | NeedReadlink | NeedAttr | Resolved:
        table = self.table
        while True:
            if self._create_here:
                return Resolved(None, self.stack[-1], self.todo[-1], self.trailing)
            if not self.todo:
                return self._finish()
            name = self.todo[-1]
            here = self.stack[-1]
            need = self._searchable(here)
            if need is not None:
                return need
            last = len(self.todo) == 1
            if self.mode == CREATE and last and (self.trailing or name in (b".", b"..")):
                # open("x/", O_CREAT), open("dir/..", O_CREAT): once the directories
                # before it were found (a missing one is ENOENT first).
                raise _error(errno.EISDIR)
            if self.mode == PARENT and last:
                return Resolved(None, here, name, self.trailing)
            if name == b".":
                self.todo.pop()
                continue
            if name == b"..":
                self.todo.pop()
                if len(self.stack) > 1:
                    table.unpin(self.stack.pop())
                continue
            node, self._answer = self._answer, None
            if node is None:
                node = table.cached(here.nodeid, name)
            if node is None:
                return NeedLookup(here.nodeid, name)
            need = self._arrive(node)
            if need is not None:
                return need

    def _arrive(self, node: Node) -> NeedReadlink | None:
        """``node`` is what the next component names: follow it if it is a link that is
        followed here, else step into it."""
        last = len(self.todo) == 1
        if node.is_link() and (not last or self.follow or self.trailing):
            self.hops += 1
            if self.hops > MAX_SYMLINK_HOPS:
                raise _error(errno.ELOOP)
            self._link = node
            return NeedReadlink(node.nodeid)
        if node.is_link() and last and self.mode == CREATE:
            raise _error(errno.ELOOP)  # O_CREAT | O_NOFOLLOW on a link
        self.todo.pop()
        self._enter(node)
        if last and self.mode == CREATE:
            self._found_existing = True
        return None

    def _searchable(self, node: Node) -> NeedAttr | None:
        """A name is looked up in ``node``: it must be a directory we may search."""
        if node.kind == 0:
            return NeedAttr(node.nodeid)
        if not node.is_dir():
            raise _error(errno.ENOTDIR)
        if self.cred is not None:
            attr = self.table.fresh_attr(node)
            if attr is None:
                return NeedAttr(node.nodeid)
            if not may(attr, self.cred, X):
                raise _error(errno.EACCES)
        return None

    def _finish(self) -> NeedAttr | Resolved:
        node = self.stack[-1]
        if self.mode == LOOKUP or self._found_existing:
            if self.trailing:
                if node.kind == 0:
                    return NeedAttr(node.nodeid)
                if not node.is_dir():
                    raise _error(errno.ENOTDIR)
            return Resolved(node, None, b"", self.trailing)
        # PARENT or CREATE with no component left: the path is the mount root itself
        # (or a link that led there).
        if self.mode == CREATE:
            raise _error(errno.EISDIR)
        return Resolved(None, node, ROOT_NAME, self.trailing)
