"""The session actor: FUSE_INIT, the mount table, path walking, the lookup cache, nlookup.

State (all of it in :class:`SessionActor`, touched only by its thread):

* ``init`` — the negotiated limits (``max_write``, ``max_pages``, ``max_readahead``).
* ``mounts`` — mount point → root node id, as the Hermit driver mounts: the share at its
  tag, or with tag ``/`` each top-level directory of the share on its own (``tmp`` and
  ``proc`` skipped). With no tag, the share is the whole namespace.
* ``nodes`` — node id → :class:`_Node` (nlookup count, pins by open handles, cached attrs),
  kept in LRU order; unpinned nodes beyond ``max_nodes`` are evicted with BATCH_FORGET.
* ``dentries`` — (parent, name) → (node id, expiry): the lookup cache, honouring the
  daemon's entry timeouts; attributes honour the attr timeouts. Mount roots (the share's
  root included) are pinned: closing a handle on one never drops what is cached below.
* ``lost`` — set when the device actor reports the device gone (``DeviceLost``, to which
  the session subscribes on start): from then on every request fails with ENOTCONN,
  answers the cache could give included.

Paths are walked one component at a time (LOOKUP takes one name: virtiofsd answers EINVAL
to a whole path), ``..`` never climbs above a mount's root, and symlinks are followed like
POSIX: relative targets from the link's directory, absolute ones from the mount root,
ELOOP after 40 hops.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat as stat_mod
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pykka

from pyvirtiofs.actors import device as dev
from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.handles import DirectoryActor, FileActor, HandleLimits
from pyvirtiofs.actors.published import PublishedAttrs
from pyvirtiofs.codec import fuse_requests as rq
from pyvirtiofs.codec.fuse_abi import FUSE_ROOT_ID, MIN_MINOR, RENAME_EXCHANGE
from pyvirtiofs.codec.fuse_types import Attr, Dirent, DirentPlus, EntryOut, InitOut
from pyvirtiofs.hw.transport import DeviceGone

log = logging.getLogger(__name__)

__all__ = ["SessionActor", "SessionConfig", "open_session"]

MAX_SYMLINK_HOPS = 40
PATH_MAX = 4096
NAME_MAX = 255
SKIPPED_MOUNTS = (b"tmp", b"proc")  # as the Hermit driver does in tag "/" mode
_O_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_CLOEXEC  # never sent to the daemon
_O_STRIP_CREATE = os.O_CREAT | os.O_NOCTTY | os.O_CLOEXEC  # CREATE keeps O_EXCL


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """How a session mounts and caches.

    ``tag``: None/"" — the share is the namespace root; a name — the share is mounted at
    ``/name``; ``"/"`` — each top-level directory of the share is mounted on its own.
    ``root``: a directory inside the share that becomes the session's root (the agent
    confines a tenant to it: ``..`` and symlinks never climb above a mount's root).
    ``max_request``: bytes per READ/WRITE at most (default: what the daemon negotiated,
    up to 1 MiB); 64 KiB reproduces the Hermit driver's request size. ``read_ahead``: a
    file read sequentially has its next chunk requested before the caller asks for it.
    """

    tag: str | None = None
    root: str | None = None
    max_nodes: int = 16384
    request_timeout: float = 60.0
    max_readahead: int = 1 << 20
    readdir_size: int = 128 << 10
    max_request: int | None = None
    read_ahead: bool = True


@dataclass(slots=True)
class _Node:
    nodeid: int
    nlookup: int = 0
    pins: int = 0
    attr: Attr | None = None
    attr_expiry: float = 0.0
    names: set[tuple[int, bytes]] = field(default_factory=set)  # dentries pointing here


def _expiry(sec: int, nsec: int) -> float:
    return time.monotonic() + sec + nsec / 1e9


def _permitted(attr: Attr, mode: int, ctx: m.Credentials | None) -> bool:
    """POSIX permission check of ``mode`` (R_OK|W_OK|X_OK) on ``attr`` for ``ctx``
    (None: this process), as the kernel's generic_permission does (no ACLs, no
    supplementary groups beyond the caller's own gid list when it is this process)."""
    uid, gid = (os.geteuid(), os.getegid()) if ctx is None else (ctx[0], ctx[1])
    bits = attr.mode & 0o777
    if uid == 0:
        # root may read and write anything; execute needs some x bit (or a directory)
        return not mode & os.X_OK or bool(bits & 0o111) or stat_mod.S_ISDIR(attr.mode)
    groups = set(os.getgroups()) | {gid} if ctx is None else {gid}
    if uid == attr.uid:
        have = bits >> 6
    elif attr.gid in groups:
        have = bits >> 3
    else:
        have = bits
    want = (4 if mode & os.R_OK else 0) | (2 if mode & os.W_OK else 0) | (
        1 if mode & os.X_OK else 0)
    return (have & want) == want


def _err(exc: OSError, path: Any, path2: Any = None) -> OSError:
    """The same error, with the caller's path(s) attached (as ``os`` functions do)."""
    if path2 is not None:
        return OSError(exc.errno, exc.strerror or os.strerror(exc.errno or 0), path, None, path2)
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno or 0), path)


def _trailing_slash(path: m.PathArg) -> bool:
    return os.fsencode(path).endswith(b"/")


class SessionActor(pykka.ThreadingActor):
    """One FUSE session on one device. See the module docstring for its state."""

    use_daemon_thread = True

    def __init__(self, device: pykka.ActorRef[Any], config: SessionConfig | None = None,
                 published: PublishedAttrs | None = None) -> None:
        super().__init__()
        self.device = device
        self.config = config or SessionConfig()
        self.published = published or PublishedAttrs()
        self.init: InitOut | None = None
        self.limits: HandleLimits | None = None
        self.mounts: dict[bytes, int] = {}
        self.nodes: OrderedDict[int, _Node] = OrderedDict()
        self.dentries: dict[tuple[int, bytes], tuple[int, float]] = {}
        self.children: dict[int, set[bytes]] = {}
        self.handles: set[pykka.ActorRef[Any]] = set()
        self.forgets_sent = 0
        self.lost: DeviceGone | None = None  # the device died: nothing is answered any more
        self._ctx: m.Credentials | None = None  # credentials of the message being handled

    # -- device access ---------------------------------------------------------------------

    def _call(self, request: Any) -> Any:
        future = dev.call(self.device, request, ctx=self._ctx)
        return dev.wait(self.device, future, request, self.config.request_timeout)

    def _send_forgets(self, items: list[tuple[int, int]]) -> None:
        """FORGET/BATCH_FORGET go out on the hiprio queue without waiting."""
        if not items:
            return
        self.forgets_sent += len(items)
        for start in range(0, len(items), 256):
            chunk = items[start:start + 256]
            req = rq.forget(*chunk[0]) if len(chunk) == 1 else rq.batch_forget(chunk)
            dev.call(self.device, req)

    # -- life cycle ------------------------------------------------------------------------

    def _mount(self) -> dict[str, int]:
        """FUSE_INIT, then build the mount table. Called once, by :func:`open_session`."""
        init: InitOut = self._call(rq.init(self.config.max_readahead, rq.DEFAULT_INIT_FLAGS))
        if init.major != 7 or init.minor < MIN_MINOR:
            raise OSError(errno.EPROTONOSUPPORT,
                          f"device speaks FUSE {init.major}.{init.minor}; need 7.{MIN_MINOR}+")
        self.init = init
        self.limits = HandleLimits.from_init(init, self.config.readdir_size,
                                             self.config.request_timeout,
                                             self.config.max_request,
                                             self.config.read_ahead)
        # Like every mount root, the share's root is pinned: closing a handle on it or
        # evicting must never drop it (with it would go the dentries of everything below,
        # and the FORGETs those nodes are owed).
        self._node(FUSE_ROOT_ID).pins += 1
        base = FUSE_ROOT_ID
        if self.config.root and self.config.root.strip("/"):
            self.mounts = {b"": FUSE_ROOT_ID}
            node = self._walk(self.config.root)
            if not stat_mod.S_ISDIR(self._attr(node).mode):
                raise NotADirectoryError(errno.ENOTDIR, "session root is not a directory",
                                         self.config.root)
            node.pins += 1  # a mount root is never evicted
            base = node.nodeid
        tag = self.config.tag
        if not tag:
            self.mounts = {b"": base}
        elif tag != "/":
            self.mounts = {os.fsencode(tag.strip("/")): base}
        else:
            self.mounts = self._top_level_mounts(base)
        return {os.fsdecode(k): v for k, v in self.mounts.items()}

    def _top_level_mounts(self, base: int) -> dict[bytes, int]:
        """Tag "/" mode: every top-level directory but tmp and proc is its own mount."""
        mounts: dict[bytes, int] = {}
        for entry in self._list_all(base):
            name = entry.name
            if name in (b".", b"..") or name in SKIPPED_MOUNTS:
                continue
            if entry.type != stat_mod.S_IFDIR >> 12:
                continue
            node = self._lookup(base, name)
            node.pins += 1  # mount roots are never evicted
            mounts[name] = node.nodeid
        return mounts

    def _list_all(self, nodeid: int) -> list[Dirent]:
        fh = self._call(rq.opendir(nodeid)).fh
        entries: list[Dirent] = []
        try:
            offset = 0
            while True:
                batch = self._call(rq.readdir(nodeid, fh, offset, self.limits.readdir_size))
                if not batch:
                    return entries
                entries += batch
                offset = batch[-1].off
        finally:
            with contextlib.suppress(OSError):
                self._call(rq.releasedir(nodeid, fh))

    def on_start(self) -> None:
        # The cache could otherwise keep answering stat() after the daemon died.
        with contextlib.suppress(pykka.ActorDeadError):
            self.device.tell(m.WatchDevice(watcher=self.actor_ref))

    def _device_lost(self, msg: m.DeviceLost) -> None:
        self.lost = DeviceGone(msg.detail)
        self.published.disable()

    def on_stop(self) -> None:
        self._teardown()

    def on_failure(self, *exc_info: Any) -> None:
        self._teardown()

    def _teardown(self) -> None:
        """Stop every handle (each sends its RELEASE), then FORGET every node we hold."""
        for ref in list(self.handles):
            with contextlib.suppress(Exception):
                ref.stop(block=True, timeout=self.config.request_timeout)
        self.handles.clear()
        if self.lost is None:
            self._send_forgets([(n.nodeid, n.nlookup) for n in self.nodes.values()
                                if n.nlookup > 0 and n.nodeid != FUSE_ROOT_ID])
        self.nodes.clear()
        self.dentries.clear()
        self.children.clear()

    # -- the node table and the lookup cache ---------------------------------------------

    def _node(self, nodeid: int) -> _Node:
        node = self.nodes.get(nodeid)
        if node is None:
            node = self.nodes[nodeid] = _Node(nodeid)
            self._evict()
        else:
            self.nodes.move_to_end(nodeid)
        return node

    def _learn(self, parent: int, name: bytes, entry: EntryOut) -> _Node:
        """Account for one lookup the daemon counted (LOOKUP, CREATE, MKDIR, …)."""
        node = self._node(entry.nodeid)
        node.nlookup += 1
        node.attr = entry.attr
        node.attr_expiry = _expiry(entry.attr_valid, entry.attr_valid_nsec)
        self._add_dentry(parent, name, node, _expiry(entry.entry_valid, entry.entry_valid_nsec))
        return node

    def _add_dentry(self, parent: int, name: bytes, node: _Node, expiry: float) -> None:
        key = (parent, name)
        old = self.dentries.get(key)
        if old is not None and old[0] != node.nodeid:
            self._drop_dentry(parent, name)
        self.dentries[key] = (node.nodeid, expiry)
        self.children.setdefault(parent, set()).add(name)
        node.names.add(key)

    def _drop_dentry(self, parent: int, name: bytes, *, forget_orphan: bool = True) -> None:
        entry = self.dentries.pop((parent, name), None)
        kids = self.children.get(parent)
        if kids is not None:
            kids.discard(name)
        if entry is None:
            return
        node = self.nodes.get(entry[0])
        if node is None:
            return
        node.names.discard((parent, name))
        if forget_orphan and not node.names and node.pins == 0:
            self._forget_node(node)

    def _forget_node(self, node: _Node) -> None:
        """Drop a node, its dentries and the dentries under it; FORGET its lookups."""
        self.nodes.pop(node.nodeid, None)
        for parent, name in list(node.names):
            self.dentries.pop((parent, name), None)
            kids = self.children.get(parent)
            if kids is not None:
                kids.discard(name)
        node.names.clear()
        if node.nlookup > 0 and node.nodeid != FUSE_ROOT_ID:
            self._send_forgets([(node.nodeid, node.nlookup)])
        node.nlookup = 0
        # What was cached below goes too: a child left without a name could never be
        # reached again, and would hold its lookups (and the daemon's fd) until evicted.
        for name in self.children.pop(node.nodeid, set()):
            self._drop_dentry(node.nodeid, name)

    def _evict(self) -> None:
        """Keep the node table bounded: forget the least recently used unpinned nodes."""
        excess = len(self.nodes) - self.config.max_nodes
        if excess <= 0:
            return
        victims = [n for n in self.nodes.values()
                   if n.pins == 0 and n.nodeid != FUSE_ROOT_ID][:excess]
        for node in victims:
            self._forget_node(node)

    def _lookup(self, parent: int, name: bytes) -> _Node:
        cached = self.dentries.get((parent, name))
        if cached is not None and cached[1] > time.monotonic():
            node = self.nodes.get(cached[0])
            if node is not None:
                self.nodes.move_to_end(node.nodeid)
                return node
        entry: EntryOut = self._call(rq.lookup(parent, name))
        if entry.nodeid == 0:  # a negative entry: the name does not exist
            self._drop_dentry(parent, name)
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        return self._learn(parent, name, entry)

    def _attr(self, node: _Node, *, fresh: bool = False) -> Attr:
        if not fresh and node.attr is not None and node.attr_expiry > time.monotonic():
            return node.attr
        out = self._call(rq.getattr(node.nodeid))
        node.attr = out.attr
        node.attr_expiry = _expiry(out.attr_valid, out.attr_valid_nsec)
        return out.attr

    def _invalidate(self, *nodeids: int) -> None:
        for nodeid in nodeids:
            self.published.invalidate_node(nodeid)
            node = self.nodes.get(nodeid)
            if node is not None:
                node.attr_expiry = 0.0

    # -- path walking ----------------------------------------------------------------------

    def _split(self, path: m.PathArg) -> tuple[int, list[bytes], bool]:
        """Mount root, components, and whether the path ended in a slash."""
        p = os.fsencode(path)
        if not p:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        if b"\0" in p:
            raise OSError(errno.EINVAL, "embedded null byte")
        if len(p) >= PATH_MAX:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        parts = [c for c in p.split(b"/") if c and c != b"."]
        if any(len(c) > NAME_MAX for c in parts):
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        trailing = p.endswith(b"/") or p.endswith(b"/.") or p == b"."
        if b"" in self.mounts:
            return self.mounts[b""], parts, trailing
        # Tagged mounts: the first component names the mount point.
        while parts and parts[0] == b"..":
            parts.pop(0)
        if not parts:
            raise IsADirectoryError(errno.EISDIR, "the mount table itself is not a directory")
        root = self.mounts.get(parts[0])
        if root is None:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        return root, parts[1:], trailing

    def _walk(self, path: m.PathArg, *, follow: bool = True) -> _Node:
        root, parts, trailing = self._split(path)
        stack, _ = self._descend([self._node(root)], parts, follow=follow or trailing)
        node = stack[-1]
        if trailing:
            self._require_dir(node)
        return node

    def _require_dir(self, node: _Node) -> None:
        # A node's file type never changes, so attributes past their timeout still tell
        # it: no GETATTR of the parent before every create or unlink in a directory that
        # the previous one changed (the kernel does not send one either).
        attr = node.attr if node.attr is not None else self._attr(node)
        if not stat_mod.S_ISDIR(attr.mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))

    def _descend(self, stack: list[_Node], parts: list[bytes], *, follow: bool,
                 hops: int = 0) -> tuple[list[_Node], int]:
        """Walk ``parts`` from ``stack`` (the directories from the mount root down).

        ``stack`` is the whole ancestry rather than one node so that ``..`` — also inside
        symlink targets — goes back up without a LOOKUP and never above the mount root.
        Returns the new stack and the symlink hops used so far (the 40-hop limit spans
        every link of one path resolution).
        """
        stack = list(stack)
        todo = list(reversed(parts))
        while todo:
            name = todo.pop()
            if name == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            node = self._lookup(self._dir_of(stack[-1]).nodeid, name)
            mode = node.attr.mode if node.attr is not None else 0
            if stat_mod.S_ISLNK(mode) and (todo or follow):
                hops, components, absolute = self._follow(node, hops)
                if absolute:
                    del stack[1:]
                todo.extend(reversed(components))
                continue
            stack.append(node)
        return stack, hops

    def _dir_of(self, node: _Node) -> _Node:
        """``node``, checked to be something a name can be looked up in."""
        if node.attr is not None and not stat_mod.S_ISDIR(node.attr.mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return node

    def _follow(self, link: _Node, hops: int) -> tuple[int, list[bytes], bool]:
        """One more symlink hop: its target's components and whether it is absolute."""
        hops += 1
        if hops > MAX_SYMLINK_HOPS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
        target: bytes = self._call(rq.readlink(link.nodeid))
        return hops, [c for c in target.split(b"/") if c and c != b"."], target.startswith(b"/")

    def _parent_stack(self, path: m.PathArg) -> tuple[list[_Node], bytes]:
        """The directories down to the one that holds the last component, and that
        component (checked: a name the daemon may be asked to create or remove)."""
        root, parts, _ = self._split(path)
        if not parts:
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        stack, _ = self._descend([self._node(root)], parts[:-1], follow=True)
        self._require_dir(stack[-1])
        name = parts[-1]
        if name == b"..":
            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
        return stack, name

    def _parent(self, path: m.PathArg) -> tuple[_Node, bytes]:
        stack, name = self._parent_stack(path)
        return stack[-1], name

    def _creation_point(self, path: m.PathArg) -> _Node | tuple[_Node, bytes]:
        """Where ``open(path, O_CREAT)`` (without O_EXCL) acts: the existing node, or the
        directory and name to create — after following symlinks in the last component
        too, as open(2) does (a dangling link creates its target).

        The daemon cannot do this for us: CREATE of a name that exists opens a plain file
        but fails with EBADF on a symlink, and would cache the link's name for the wrong
        node.
        """
        stack, name = self._parent_stack(path)
        hops = 0
        while True:
            try:
                node = self._lookup(self._dir_of(stack[-1]).nodeid, name)
            except FileNotFoundError:
                return stack[-1], name
            if node.attr is None or not stat_mod.S_ISLNK(node.attr.mode):
                return node
            hops, components, absolute = self._follow(node, hops)
            if absolute:
                del stack[1:]
            if not components or components[-1] == b"..":
                stack, hops = self._descend(stack, components, follow=True, hops=hops)
                return stack[-1]  # the link names a directory
            stack, hops = self._descend(stack, components[:-1], follow=True, hops=hops)
            name = components[-1]

    # -- messages --------------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        handler = self._HANDLERS.get(type(message))
        if handler is None:
            return super().on_receive(message)
        self._ctx = message.ctx
        try:
            return handler(self, message)
        finally:
            self._ctx = None
            opens = message.flags if isinstance(message, m.Open) else 0
            if isinstance(message, _CHANGES) or opens & (os.O_CREAT | os.O_TRUNC):
                self.published.clear()  # a change anywhere may reach any published path
            if opens & os.O_TRUNC or (isinstance(message, m.SetAttr) and message.size is not None):
                self.published.data_changed()  # a truncation: drop every read-ahead

    def _with_path(self, fn: Any, message: Any) -> Any:
        try:
            if self.lost is not None:
                raise self.lost
            return fn(self, message)
        except OSError as exc:
            if exc.filename is not None:
                raise
            src = getattr(message, "path", None) or getattr(message, "src", None)
            dst = getattr(message, "dst", None)
            raise _err(exc, src, dst) from None

    def _stat(self, msg: m.Stat) -> Attr:
        node = self._walk(msg.path, follow=msg.follow)
        attr = self._attr(node)
        if msg.ctx is None:
            # Publish for lock-free warm stats, valid while both the attributes and the
            # name that led here are (the daemon's attr and entry timeouts).
            expiry = min([node.attr_expiry] + [self.dentries[k][1] for k in node.names
                                               if k in self.dentries])
            self.published.put(os.fsencode(msg.path), msg.follow, attr.to_stat_result(),
                               expiry, node.nodeid)
        return attr

    def _access(self, msg: m.Access) -> None:
        node = self._walk(msg.path)
        if msg.mode == os.F_OK:
            return
        try:
            self._call(rq.access(node.nodeid, msg.mode))
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                raise
            # The daemon leaves ACCESS to the client (as Linux does with
            # default_permissions): check the mode bits for the caller's credentials.
            if not _permitted(self._attr(node), msg.mode, self._ctx):
                raise OSError(errno.EACCES, os.strerror(errno.EACCES)) from None

    def _readlink(self, msg: m.ReadLink) -> bytes:
        node = self._walk(msg.path, follow=False)
        attr = self._attr(node)
        if not stat_mod.S_ISLNK(attr.mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return self._call(rq.readlink(node.nodeid))

    def _create_entry(self, parent: _Node, name: bytes, request: Any) -> Attr:
        entry: EntryOut = self._call(request)
        self._invalidate(parent.nodeid)
        return self._learn(parent.nodeid, name, entry).attr or entry.attr

    def _mkdir(self, msg: m.MakeDir) -> Attr:
        parent, name = self._parent(msg.path)
        return self._create_entry(parent, name,
                                  rq.mkdir(parent.nodeid, name, msg.mode & ~msg.umask & 0o7777, 0))

    def _mknod(self, msg: m.MakeNode) -> Attr:
        parent, name = self._parent(msg.path)
        mode = stat_mod.S_IFMT(msg.mode) | (msg.mode & ~msg.umask & 0o7777)
        if not stat_mod.S_IFMT(mode):
            mode |= stat_mod.S_IFREG
        return self._create_entry(parent, name, rq.mknod(parent.nodeid, name, mode, msg.rdev, 0))

    def _symlink(self, msg: m.Symlink) -> Attr:
        parent, name = self._parent(msg.path)
        return self._create_entry(parent, name,
                                  rq.symlink(parent.nodeid, name, os.fsencode(msg.target)))

    def _link(self, msg: m.Link) -> Attr:
        src = self._walk(msg.src, follow=False)
        parent, name = self._parent(msg.dst)
        attr = self._create_entry(parent, name, rq.link(src.nodeid, parent.nodeid, name))
        self._invalidate(src.nodeid)
        return attr

    def _unlink(self, msg: m.Unlink) -> None:
        parent, name = self._parent(msg.path)
        # virtiofsd finds the victim in its inode table: it must have been looked up
        # (the kernel always has a dentry for it); otherwise the daemon answers EIO.
        self._lookup(parent.nodeid, name)
        self._call(rq.unlink(parent.nodeid, name))
        self._after_remove(parent, name)

    def _rmdir(self, msg: m.RemoveDir) -> None:
        parent, name = self._parent(msg.path)
        if name == b".":
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self._lookup(parent.nodeid, name)  # see _unlink
        self._call(rq.rmdir(parent.nodeid, name))
        self._after_remove(parent, name)

    def _after_remove(self, parent: _Node, name: bytes) -> None:
        cached = self.dentries.get((parent.nodeid, name))
        self._drop_dentry(parent.nodeid, name)  # forgets the node unless a handle pins it
        self._invalidate(parent.nodeid)
        if cached is not None:
            self._invalidate(cached[0])

    def _rename(self, msg: m.Rename) -> None:
        sparent, sname = self._parent(msg.src)
        dparent, dname = self._parent(msg.dst)
        src = self._lookup(sparent.nodeid, sname)  # see _unlink
        # The destination too, as the kernel has it: with RENAME_EXCHANGE the daemon needs
        # it, and a file replaced here may have other names whose link count drops.
        try:
            dst: _Node | None = self._lookup(dparent.nodeid, dname)
        except FileNotFoundError:
            if msg.flags & RENAME_EXCHANGE:
                raise
            dst = None
        expiry = self.dentries.get((sparent.nodeid, sname), (0, 0.0))[1]
        self._call(rq.rename(sparent.nodeid, sname, dparent.nodeid, dname, msg.flags))
        self._invalidate(sparent.nodeid, dparent.nodeid, src.nodeid)
        if dst is not None and dst.nodeid == src.nodeid:
            return  # two names of one file: rename(2) leaves both
        # Move the cached names along (the kernel's d_move) rather than forget and look
        # the nodes up again.
        self._drop_dentry(sparent.nodeid, sname, forget_orphan=False)
        if msg.flags & RENAME_EXCHANGE:
            assert dst is not None
            dst_expiry = self.dentries.get((dparent.nodeid, dname), (0, 0.0))[1]
            self._drop_dentry(dparent.nodeid, dname, forget_orphan=False)
            self._add_dentry(sparent.nodeid, sname, dst, dst_expiry)
        elif dst is not None:
            self._invalidate(dst.nodeid)
            self._drop_dentry(dparent.nodeid, dname)  # forgotten unless open or linked
        self._add_dentry(dparent.nodeid, dname, src, expiry)

    def _setattr(self, msg: m.SetAttr) -> Attr:
        node = self._walk(msg.path, follow=msg.follow)
        kwargs: dict[str, Any] = {}
        if msg.size is not None:
            kwargs["size"] = msg.size
        if msg.mode is not None:
            kwargs["mode"] = msg.mode & 0o7777
        if msg.uid is not None and msg.uid != -1:
            kwargs["uid"] = msg.uid
        if msg.gid is not None and msg.gid != -1:
            kwargs["gid"] = msg.gid
        for which in ("atime", "mtime"):
            value = getattr(msg, which)
            if value == "now":
                kwargs[f"{which}_now"] = True
            elif value is not None:
                kwargs[which] = tuple(value)
        if not kwargs:
            return self._attr(node)
        out = self._call(rq.setattr(node.nodeid, **kwargs))
        node.attr = out.attr
        node.attr_expiry = _expiry(out.attr_valid, out.attr_valid_nsec)
        return out.attr

    def _statfs(self, msg: m.StatFs) -> Any:
        return self._call(rq.statfs(self._walk(msg.path).nodeid))

    def _getxattr(self, msg: m.GetXattr) -> bytes:
        node = self._walk(msg.path, follow=msg.follow)
        name = os.fsencode(msg.name)
        size = self._call(rq.getxattr(node.nodeid, name, 0)).size
        if size == 0:
            return b""
        return self._call(rq.getxattr(node.nodeid, name, size))

    def _setxattr(self, msg: m.SetXattr) -> None:
        node = self._walk(msg.path, follow=msg.follow)
        self._call(rq.setxattr(node.nodeid, os.fsencode(msg.name), msg.value, msg.flags))
        self._invalidate(node.nodeid)

    def _listxattr(self, msg: m.ListXattr) -> list[bytes]:
        node = self._walk(msg.path, follow=msg.follow)
        size = self._call(rq.listxattr(node.nodeid, 0)).size
        if size == 0:
            return []
        return self._call(rq.listxattr(node.nodeid, size))

    def _removexattr(self, msg: m.RemoveXattr) -> None:
        node = self._walk(msg.path, follow=msg.follow)
        self._call(rq.removexattr(node.nodeid, os.fsencode(msg.name)))
        self._invalidate(node.nodeid)

    # -- opening handles -------------------------------------------------------------------

    def _open(self, msg: m.Open) -> m.OpenedFile:
        flags = msg.flags
        if flags & os.O_CREAT:
            if _trailing_slash(msg.path):
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
            # O_EXCL: whatever is there, even a symlink, makes it fail (the daemon's
            # EEXIST); otherwise an existing file is opened as it is, through symlinks.
            where = self._parent(msg.path) if flags & os.O_EXCL else self._creation_point(
                msg.path)
            if isinstance(where, _Node):
                return self._open_node(where, flags, creating=True)
            parent, name = where
            mode = msg.mode & ~msg.umask & 0o7777
            # Never O_CREAT in CREATE's flags: the C daemon adds it itself, and when the
            # name exists it re-opens with these flags, and openat(O_CREAT) without a mode
            # aborts it (glibc fortify). The kernel only sends CREATE for absent names.
            out = self._call(rq.create(parent.nodeid, name, flags & ~_O_STRIP_CREATE, mode, 0))
            self._invalidate(parent.nodeid)
            node = self._learn(parent.nodeid, name, out.entry)
            return self._opened(node, out.open.fh, flags)
        node = self._walk(msg.path, follow=not flags & os.O_NOFOLLOW)
        return self._open_node(node, flags, creating=False)

    def _open_node(self, node: _Node, flags: int, *, creating: bool) -> m.OpenedFile:
        """OPEN of a node that exists, with open(2)'s checks of its type."""
        attr = self._attr(node)
        if stat_mod.S_ISLNK(attr.mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
        if stat_mod.S_ISDIR(attr.mode) and (creating or flags & (os.O_WRONLY | os.O_RDWR)):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        if flags & os.O_DIRECTORY and not stat_mod.S_ISDIR(attr.mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if stat_mod.S_ISDIR(attr.mode):
            # As the kernel does: a directory is opened with OPENDIR even by open(2); the
            # file actor then answers read/write with EISDIR and releases with RELEASEDIR.
            opened = self._call(rq.opendir(node.nodeid))
            return self._opened(node, opened.fh, flags, handle_flags=flags | os.O_DIRECTORY)
        opened = self._call(rq.open(node.nodeid, flags & ~_O_STRIP))
        if flags & os.O_TRUNC:
            self._invalidate(node.nodeid)
        return self._opened(node, opened.fh, flags)

    def _opened(self, node: _Node, fh: int, flags: int, *,
                handle_flags: int | None = None) -> m.OpenedFile:
        handle_flags = flags if handle_flags is None else handle_flags
        ref = self._start_handle(FileActor, node, fh, handle_flags)
        return m.OpenedFile(actor=ref, nodeid=node.nodeid, flags=flags, attr=node.attr)

    def _opendir(self, msg: m.OpenDir) -> m.OpenedDir:
        node = self._walk(msg.path)
        attr = self._attr(node)
        if not stat_mod.S_ISDIR(attr.mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        opened = self._call(rq.opendir(node.nodeid))
        ref = self._start_handle(DirectoryActor, node, opened.fh, 0)
        return m.OpenedDir(actor=ref, nodeid=node.nodeid)

    def _start_handle(self, cls: type[Any], node: _Node, fh: int, flags: int) -> Any:
        assert self.limits is not None
        node.pins += 1
        try:
            ref = cls.start(self.device, self.actor_ref, node.nodeid, fh, flags, self.limits,
                            self.published)
        except BaseException:
            node.pins -= 1
            with contextlib.suppress(OSError):
                self._call(cls.release_request(node.nodeid, fh, flags))
            raise
        self.handles.add(ref)
        return ref

    # -- notes from handle actors ------------------------------------------------------------

    def _released(self, msg: m.Forgotten) -> None:
        self.handles = {r for r in self.handles if r.is_alive()}
        node = self.nodes.get(msg.nodeid)
        if node is None:
            return
        node.pins = max(0, node.pins - 1)
        if node.pins == 0 and not node.names:
            self._forget_node(node)  # unlinked while open: now it can go

    def _learn_entries(self, msg: m.LearnEntries) -> None:
        parent = self.nodes.get(msg.parent)
        forgets: list[tuple[int, int]] = []
        for plus in msg.entries:
            assert isinstance(plus, DirentPlus)
            if plus.entry.nodeid == 0 or plus.dirent.name in (b".", b".."):
                continue
            if parent is None:
                forgets.append((plus.entry.nodeid, 1))  # nobody to cache it: give it back
            else:
                self._learn(parent.nodeid, plus.dirent.name, plus.entry)
        self._send_forgets(forgets)

    def _invalidate_attr(self, msg: m.InvalidateAttr) -> None:
        self._invalidate(msg.nodeid)

    def _stats(self, msg: m.SessionStats) -> dict[str, Any]:
        return {
            "nodes": len(self.nodes),
            "dentries": len(self.dentries),
            "handles": len([r for r in self.handles if r.is_alive()]),
            "forgets_sent": self.forgets_sent,
            "lookups_held": sum(n.nlookup for n in self.nodes.values()),
            "max_write": self.init.max_write if self.init else 0,
            "max_pages": self.init.max_pages if self.init else 0,
            "minor": self.init.minor if self.init else 0,
        }

    def _list_mounts(self, msg: m.ListMounts) -> dict[str, int]:
        return {"/" + os.fsdecode(k): v for k, v in self.mounts.items()}

    _HANDLERS: ClassVar[dict[type, Any]] = {}


def _path_handler(fn: Any) -> Any:
    return lambda self, msg: self._with_path(fn, msg)


# Messages after which no published path result can be trusted (see on_receive).
_CHANGES = (m.MakeDir, m.MakeNode, m.Symlink, m.Link, m.Unlink, m.RemoveDir, m.Rename,
            m.SetAttr, m.SetXattr, m.RemoveXattr)

SessionActor._HANDLERS = {
    m.Stat: _path_handler(SessionActor._stat),
    m.Access: _path_handler(SessionActor._access),
    m.ReadLink: _path_handler(SessionActor._readlink),
    m.MakeDir: _path_handler(SessionActor._mkdir),
    m.MakeNode: _path_handler(SessionActor._mknod),
    m.Symlink: _path_handler(SessionActor._symlink),
    m.Link: _path_handler(SessionActor._link),
    m.Unlink: _path_handler(SessionActor._unlink),
    m.RemoveDir: _path_handler(SessionActor._rmdir),
    m.Rename: _path_handler(SessionActor._rename),
    m.SetAttr: _path_handler(SessionActor._setattr),
    m.StatFs: _path_handler(SessionActor._statfs),
    m.GetXattr: _path_handler(SessionActor._getxattr),
    m.SetXattr: _path_handler(SessionActor._setxattr),
    m.ListXattr: _path_handler(SessionActor._listxattr),
    m.RemoveXattr: _path_handler(SessionActor._removexattr),
    m.Open: _path_handler(SessionActor._open),
    m.OpenDir: _path_handler(SessionActor._opendir),
    m.Forgotten: SessionActor._released,
    m.LearnEntries: SessionActor._learn_entries,
    m.InvalidateAttr: SessionActor._invalidate_attr,
    m.SessionStats: SessionActor._stats,
    m.ListMounts: SessionActor._list_mounts,
    m.Mount: lambda self, msg: self._mount(),
    m.DeviceLost: SessionActor._device_lost,
}


def open_session(device: pykka.ActorRef[Any], config: SessionConfig | None = None,
                 published: PublishedAttrs | None = None) -> pykka.ActorRef[SessionActor]:
    """Start a session actor on ``device`` and mount it (FUSE_INIT); errors are raised here,
    and the half-started actor is stopped. ``published``: where the session publishes
    attributes for lock-free warm stats (see :mod:`actors.published`)."""
    ref = SessionActor.start(device, config, published)
    try:
        ref.ask(m.Mount())
    except BaseException:
        ref.stop()
        raise
    return ref
