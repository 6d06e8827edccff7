"""The session actor: FUSE_INIT, the mount table, path walks, the node table, FORGET.

A thin actor around plain rules: :class:`~pyvirtiofs.actors.nodes.NodeTable` (nodes,
lookup counts, the name cache with the daemon's timeouts), :class:`~pyvirtiofs.actors.walk.
Walk` (path resolution) and :mod:`~pyvirtiofs.actors.permissions`. What is left here is
what an operation sends and what it learns from the reply.

It never blocks: it is an :class:`~pyvirtiofs.actors.runtime.InlineActor` whose handlers
are tasks. A walk that misses the cache sends LOOKUP and is resumed by the reply as a
message of its own, so walks from many callers are in flight at once, a slow reply delays
only its own caller, and a warm path costs no device request and no thread hand-off.

State, all of it touched only under the actor's turn:

* ``init`` — the negotiated limits (``max_write``, ``max_pages``, ``max_readahead``);
* ``mounts`` — mount point → root node id, as the Hermit driver mounts: the share at its
  tag, or with tag ``/`` each top-level directory of the share on its own (``tmp`` and
  ``proc`` skipped). With no tag, the share is the whole namespace. Mount roots (the
  share's root included) are pinned;
* ``table`` — the node table (see above); its FORGETs go out batched when the actor goes
  idle;
* ``handles`` — the file and directory actors it started (each pins its node);
* ``lost`` — set when the device reports itself gone: from then on every request fails
  with ENOTCONN, answers the cache could give included.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat as stat_mod
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import pykka

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.device_client import DeviceClient
from pyvirtiofs.actors.handles import DirectoryActor, FileActor, HandleLimits
from pyvirtiofs.actors.nodes import Node, NodeTable
from pyvirtiofs.actors.permissions import Cred, R, W, X, may, may_delete, require, require_owner
from pyvirtiofs.actors.published import PublishedAttrs
from pyvirtiofs.actors.runtime import Future, InlineActor
from pyvirtiofs.actors.walk import (
    CREATE,
    LOOKUP,
    PARENT,
    ROOT_NAME,
    NeedAttr,
    NeedLookup,
    NeedReadlink,
    Resolved,
    Walk,
    split_path,
)
from pyvirtiofs.codec import fuse_requests as rq
from pyvirtiofs.codec.fuse_abi import (
    FUSE_ROOT_ID,
    MIN_MINOR,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
)
from pyvirtiofs.codec.fuse_types import Attr, Dirent, DirentPlus, EntryOut, InitOut
from pyvirtiofs.hw.transport import DeviceGone

log = logging.getLogger(__name__)

__all__ = ["SessionActor", "SessionConfig", "open_session"]

SKIPPED_MOUNTS = (b"tmp", b"proc")  # as the Hermit driver does in tag "/" mode
_O_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_CLOEXEC  # never sent to the daemon
_O_STRIP_CREATE = os.O_CREAT | os.O_NOCTTY | os.O_CLOEXEC  # CREATE keeps O_EXCL
_SPECIAL = (b".", b"..", ROOT_NAME)

Task = Generator[Future[Any], Any, Any]


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


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _with_paths(exc: OSError, path: Any, path2: Any = None) -> OSError:
    """The same error, with the caller's path(s) attached (as ``os`` functions do)."""
    text = exc.strerror or os.strerror(exc.errno or 0)
    if path2 is not None:
        return OSError(exc.errno, text, path, None, path2)
    return OSError(exc.errno, text, path)


class Who(NamedTuple):
    """A request's caller: the credentials its FUSE requests carry (None: this process's)
    and who the client's permission checks are for."""

    ctx: m.Credentials | None
    cred: Cred


def _who(msg: Any) -> Who:
    return Who(msg.ctx, caller_cred(msg.ctx, msg.groups))


#: This process itself (the session's own requests: INIT, mount points).
def _self() -> Who:
    return Who(None, caller_cred(None))


def caller_cred(ctx: m.Credentials | None, groups: tuple[int, ...] | None = None) -> Cred:
    """Who a request acts for: its credentials, or this process's."""
    if ctx is None:
        return Cred(os.geteuid(), os.getegid(), frozenset(os.getgroups()))
    return Cred(ctx[0], ctx[1], frozenset(groups or ()))


class SessionActor(InlineActor):
    """One FUSE session on one device. See the module docstring for its state."""

    def __init__(self, device: DeviceClient, config: SessionConfig | None = None,
                 published: PublishedAttrs | None = None) -> None:
        super().__init__()
        self.device = device
        self.config = config or SessionConfig()
        self.published = published or PublishedAttrs()
        self.init: InitOut | None = None
        self.limits: HandleLimits | None = None
        self.mounts: dict[bytes, int] = {}
        self.table = NodeTable(self.config.max_nodes)
        self.handles: set[pykka.ActorRef[Any]] = set()
        self.forgets_sent = 0
        self.lost: DeviceGone | None = None

    # -- the device ------------------------------------------------------------------------

    def _send(self, request: Any, ctx: m.Credentials | None = None) -> Future[Any]:
        return self.device.submit(request, ctx=ctx)

    def on_idle(self) -> None:
        forgets = self.table.take_forgets()
        if forgets and self.lost is None:
            self.forgets_sent += len(forgets)
            self.device.forget(forgets)

    # -- life cycle ------------------------------------------------------------------------

    def on_start(self) -> None:
        # The cache could otherwise keep answering stat() after the daemon died.
        self.device.watch(self.actor_ref)

    def _mount(self, msg: m.Mount) -> Task:
        """FUSE_INIT, then build the mount table. Sent once, by :func:`open_session`."""
        init: InitOut = yield self._send(rq.init(self.config.max_readahead,
                                                 rq.DEFAULT_INIT_FLAGS))
        if init.major != 7 or init.minor < MIN_MINOR:
            raise OSError(errno.EPROTONOSUPPORT,
                          f"device speaks FUSE {init.major}.{init.minor}; need 7.{MIN_MINOR}+")
        self.init = init
        self.limits = HandleLimits.from_init(init, self.config.readdir_size,
                                             self.config.request_timeout,
                                             self.config.max_request,
                                             self.config.read_ahead)
        # Like every mount root, the share's root is pinned: closing a handle on it or
        # evicting must never drop it (with it would go the names of everything below).
        root = self.table.node(FUSE_ROOT_ID)
        self.table.pin(root)
        if root.attr is None:
            yield from self._attr(root, _self())
        base = root
        if self.config.root and self.config.root.strip("/"):
            self.mounts = {b"": FUSE_ROOT_ID}
            walk = self._walk(self.config.root)
            try:
                found = yield from self._resolve(walk, _self())
                base = found.node
                assert base is not None
                if not base.is_dir():
                    raise NotADirectoryError(errno.ENOTDIR, "session root is not a directory",
                                             self.config.root)
                self.table.pin(base)  # a mount root is never evicted
            finally:
                walk.release()
        tag = self.config.tag
        if not tag:
            self.mounts = {b"": base.nodeid}
        elif tag != "/":
            self.mounts = {os.fsencode(tag.strip("/")): base.nodeid}
        else:
            self.mounts = yield from self._top_level_mounts(base)
        return {os.fsdecode(k): v for k, v in self.mounts.items()}

    def _top_level_mounts(self, base: Node) -> Generator[Future[Any], Any, dict[bytes, int]]:
        """Tag "/" mode: every top-level directory but tmp and proc is its own mount."""
        mounts: dict[bytes, int] = {}
        entries = yield from self._list_all(base.nodeid)
        for entry in entries:
            name = entry.name
            if name in (b".", b"..") or name in SKIPPED_MOUNTS:
                continue
            if entry.type != stat_mod.S_IFDIR >> 12:
                continue
            node = yield from self._lookup(base.nodeid, name, _self())
            self.table.pin(node)  # mount roots are never evicted
            mounts[name] = node.nodeid
        return mounts

    def _list_all(self, nodeid: int) -> Generator[Future[Any], Any, list[Dirent]]:
        assert self.limits is not None
        fh = (yield self._send(rq.opendir(nodeid))).fh
        entries: list[Dirent] = []
        try:
            offset = 0
            while True:
                batch = yield self._send(rq.readdir(nodeid, fh, offset,
                                                    self.limits.readdir_size))
                if not batch:
                    return entries
                entries += batch
                offset = batch[-1].off
        finally:
            self.device.submit(rq.releasedir(nodeid, fh))

    def _device_lost(self, msg: m.DeviceLost) -> None:
        self.lost = DeviceGone(msg.detail)
        self.published.disable()

    def on_stop(self) -> Task:
        """Close every handle (each sends its RELEASE), then FORGET every node we hold."""
        closed = OSError(errno.ENOTCONN, "the share is closed")
        for task in self.pending_tasks():
            if task.reply is not None:
                task.reply.fail(closed)
            if task.waiting_on is not None:
                self.device.abandon(task.waiting_on, wait=False)
        closing = []
        for ref in list(self.handles):
            with contextlib.suppress(pykka.ActorDeadError):
                closing.append(ref.ask(m.Close(), block=False))
        self.handles.clear()
        for future in closing:
            with contextlib.suppress(Exception):
                yield future
        self.table.forget_all()
        self.on_idle()

    def on_failure(self, *exc_info: Any) -> None:
        for ref in list(self.handles):
            with contextlib.suppress(pykka.ActorDeadError):
                ref.tell(m.Close())
        self.table.forget_all()
        self.on_idle()

    # -- nodes -----------------------------------------------------------------------------

    def _learn(self, parent: int, name: bytes, entry: EntryOut) -> Node:
        return self.table.learn(parent, name, entry)

    def _lookup(self, parent: int, name: bytes, who: Who,
                ) -> Generator[Future[Any], Any, Node]:
        """The node ``name`` in ``parent`` names (cache, else LOOKUP): FileNotFoundError
        when absent."""
        node = self.table.cached(parent, name)
        if node is not None:
            return node
        try:
            entry: EntryOut = yield self._send(rq.lookup(parent, name), who.ctx)
        except FileNotFoundError:
            self.table.drop_name(parent, name)
            raise
        if entry.nodeid == 0:  # a negative entry: the name does not exist
            self.table.drop_name(parent, name)
            raise _error(errno.ENOENT)
        return self._learn(parent, name, entry)

    def _attr(self, node: Node, who: Who, *, fresh: bool = False,
              ) -> Generator[Future[Any], Any, Attr]:
        attr = None if fresh else self.table.fresh_attr(node)
        if attr is not None:
            return attr
        out = yield self._send(rq.getattr(node.nodeid), who.ctx)
        self.table.set_attr(node, out.attr, out.attr_valid, out.attr_valid_nsec)
        return out.attr

    def _invalidate(self, *nodeids: int) -> None:
        for nodeid in nodeids:
            self.published.invalidate_node(nodeid)
            self.table.invalidate(nodeid)

    # -- walking ---------------------------------------------------------------------------

    def _walk(self, path: m.PathArg, *, mode: str = LOOKUP, follow: bool = True,
              who: Who | None = None) -> Walk:
        """A walk of ``path`` from its mount root (see :mod:`pyvirtiofs.actors.walk`)."""
        parts, trailing = split_path(os.fsencode(path))
        if b"" in self.mounts:
            root = self.mounts[b""]
        else:
            # Tagged mounts: the first component names the mount point.
            while parts and parts[0] in (b".", b".."):
                parts.pop(0)
            if not parts:
                raise IsADirectoryError(errno.EISDIR, "the mount table itself is not a "
                                                      "directory")
            mounted = self.mounts.get(parts[0])
            if mounted is None:
                raise _error(errno.ENOENT)
            root, parts = mounted, parts[1:]
        cred = None if who is None else who.cred
        return Walk(self.table, self.table.node(root), parts, mode=mode, follow=follow,
                    trailing=trailing, cred=cred)

    def _resolve(self, walk: Walk, who: Who,
                 ) -> Generator[Future[Any], Any, Resolved]:
        """Drive ``walk`` to its end, asking the device what it needs."""
        while True:
            need = walk.step()
            if isinstance(need, Resolved):
                return need
            if isinstance(need, NeedLookup):
                try:
                    node: Node | None = yield from self._lookup(need.parent, need.name, who)
                except FileNotFoundError:
                    node = None
                walk.found(node)
            elif isinstance(need, NeedReadlink):
                walk.link_target((yield self._send(rq.readlink(need.nodeid), who.ctx)))
            elif isinstance(need, NeedAttr):
                node = self.table.get(need.nodeid)
                assert node is not None  # the walk pins what it waits on
                yield from self._attr(node, who, fresh=True)
                walk.resume()

    def _node_at(self, path: m.PathArg, who: Who, *, follow: bool = True,
                 ) -> Generator[Future[Any], Any, tuple[Walk, Node]]:
        """Resolve ``path`` to a node; the caller releases the walk (it pins the node)."""
        walk = self._walk(path, follow=follow, who=who)
        try:
            found = yield from self._resolve(walk, who)
        except BaseException:
            walk.release()
            raise
        assert found.node is not None
        return walk, found.node

    def _parent_of(self, path: m.PathArg, who: Who,
                   ) -> Generator[Future[Any], Any, tuple[Walk, Resolved]]:
        """The directory that holds ``path``'s last component, and that component."""
        walk = self._walk(path, mode=PARENT, who=who)
        try:
            found = yield from self._resolve(walk, who)
        except BaseException:
            walk.release()
            raise
        return walk, found

    def _may_change(self, directory: Node, who: Who,
                    ) -> Generator[Future[Any], Any, None]:
        """Adding or removing a name in ``directory`` needs write and search permission."""
        cred = who.cred
        if not cred.root:
            require((yield from self._attr(directory, who)), cred, W | X)

    def _may_create(self, directory: Node, name: bytes, who: Who,
                    ) -> Generator[Future[Any], Any, None]:
        """Creating ``name``: a name that exists is EEXIST before any permission check
        (as Linux's filename_create); the daemon would say EEXIST too, so only a caller
        whose permissions are checked pays the LOOKUP that tells."""
        if who.cred.root:
            return
        error = yield from self._absent_or_exists(directory, name, who)
        if error.errno == errno.EEXIST:
            raise error
        yield from self._may_change(directory, who)

    def _may_remove(self, directory: Node, victim: Node, who: Who,
                    ) -> Generator[Future[Any], Any, None]:
        """Removing or renaming ``victim`` out of ``directory``: write and search on the
        directory, and the sticky-bit rule."""
        cred = who.cred
        if cred.root:
            return
        dir_attr = yield from self._attr(directory, who)
        require(dir_attr, cred, W | X)
        if not may_delete(dir_attr, (yield from self._attr(victim, who)), cred):
            raise _error(errno.EPERM)

    def _absent_or_exists(self, parent: Node, name: bytes, who: Who,
                          ) -> Generator[Future[Any], Any, OSError]:
        """A name with a trailing slash cannot be created as a non-directory: EEXIST when
        it exists, ENOENT when it does not (as Linux's filename_create)."""
        try:
            yield from self._lookup(parent.nodeid, name, who)
        except FileNotFoundError:
            return _error(errno.ENOENT)
        return _error(errno.EEXIST)

    # -- messages --------------------------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        handler = self._HANDLERS.get(type(message))
        if handler is None:
            return super().on_receive(message)
        return handler(self, message)

    def _path_op(self, fn: Any, msg: Any) -> Task:
        """Run a path operation: the share must be there, errors carry the caller's
        paths, and a change drops what was published for lock-free stats."""
        try:
            if self.lost is not None:
                raise self.lost
            result = yield from fn(self, msg)
            return result
        except OSError as exc:
            if exc.filename is not None:
                raise
            src = getattr(msg, "path", None) or getattr(msg, "src", None)
            raise _with_paths(exc, src, getattr(msg, "dst", None)) from None
        finally:
            opens = msg.flags if isinstance(msg, m.Open) else 0
            if isinstance(msg, _CHANGES) or opens & (os.O_CREAT | os.O_TRUNC):
                self.published.clear()  # a change anywhere may reach any published path
            if opens & os.O_TRUNC or (isinstance(msg, m.SetAttr) and msg.size is not None):
                self.published.data_changed()  # a truncation: drop every read-ahead

    def _stat(self, msg: m.Stat) -> Task:
        who = _who(msg)
        walk, node = yield from self._node_at(msg.path, who, follow=msg.follow)
        try:
            attr = yield from self._attr(node, who)
            if who.ctx is None:
                # Publish for lock-free warm stats, valid while both the attributes and
                # the names that led here are (the daemon's attr and entry timeouts).
                self.published.put(os.fsencode(msg.path), msg.follow, attr.to_stat_result(),
                                   self.table.published_expiry(node), node.nodeid)
            return attr
        finally:
            walk.release()

    def _access(self, msg: m.Access) -> Task:
        who = _who(msg)
        walk, node = yield from self._node_at(msg.path, who)
        try:
            if msg.mode == os.F_OK:
                return None
            # As the kernel with default_permissions: checked here, from the mode bits.
            attr = yield from self._attr(node, who)
            if not may(attr, who.cred, msg.mode & (R | W | X)):
                raise _error(errno.EACCES)
            return None
        finally:
            walk.release()

    def _readlink(self, msg: m.ReadLink) -> Task:
        who = _who(msg)
        walk, node = yield from self._node_at(msg.path, who, follow=False)
        try:
            if not node.is_link():
                raise _error(errno.EINVAL)
            target: bytes = yield self._send(rq.readlink(node.nodeid), who.ctx)
            return target
        finally:
            walk.release()

    def _new_entry(self, path: m.PathArg, who: Who, request_for: Any, *,
                   directory: bool = False) -> Task:
        """Create a name (mkdir, mknod, symlink, link): the parent is resolved, the name
        checked as Linux does, then ``request_for(parent_id, name)`` is sent."""
        walk, found = yield from self._parent_of(path, who)
        try:
            parent, name = found.parent, found.name
            assert parent is not None
            if name in _SPECIAL:
                raise _error(errno.EEXIST)
            if found.trailing and not directory:
                raise (yield from self._absent_or_exists(parent, name, who))
            yield from self._may_create(parent, name, who)
            entry: EntryOut = yield self._send(request_for(parent.nodeid, name), who.ctx)
            self._invalidate(parent.nodeid)
            node = self._learn(parent.nodeid, name, entry)
            return node.attr or entry.attr
        finally:
            walk.release()

    def _mkdir(self, msg: m.MakeDir) -> Task:
        who = _who(msg)
        mode = msg.mode & ~msg.umask & 0o7777
        return (yield from self._new_entry(
            msg.path, who, lambda p, n: rq.mkdir(p, n, mode, 0), directory=True))

    def _mknod(self, msg: m.MakeNode) -> Task:
        who = _who(msg)
        mode = stat_mod.S_IFMT(msg.mode) | (msg.mode & ~msg.umask & 0o7777)
        if not stat_mod.S_IFMT(mode):
            mode |= stat_mod.S_IFREG
        return (yield from self._new_entry(
            msg.path, who, lambda p, n: rq.mknod(p, n, mode, msg.rdev, 0)))

    def _symlink(self, msg: m.Symlink) -> Task:
        who = _who(msg)
        target = os.fsencode(msg.target)
        return (yield from self._new_entry(
            msg.path, who, lambda p, n: rq.symlink(p, n, target)))

    def _link(self, msg: m.Link) -> Task:
        who = _who(msg)
        walk, src = yield from self._node_at(msg.src, who, follow=False)
        try:
            if src.is_dir():
                # No hard links to directories; but a name that exists is EEXIST first.
                dwalk, found = yield from self._parent_of(msg.dst, who)
                try:
                    if found.name in _SPECIAL:
                        raise _error(errno.EEXIST)
                    assert found.parent is not None
                    error = yield from self._absent_or_exists(found.parent, found.name,
                                                              who)
                finally:
                    dwalk.release()
                # "dst/" is ENOENT or EEXIST whatever the source; a free name, EPERM.
                raise error if found.trailing or error.errno == errno.EEXIST else _error(
                    errno.EPERM)
            attr = yield from self._new_entry(
                msg.dst, who, lambda p, n: rq.link(src.nodeid, p, n))
            self._invalidate(src.nodeid)
            return attr
        finally:
            walk.release()

    def _victim(self, parent: Node, name: bytes, who: Who,
                ) -> Generator[Future[Any], Any, Node]:
        # virtiofsd finds a victim in its inode table: it must have been looked up (the
        # kernel always has a dentry for it); otherwise the daemon answers EIO.
        victim = yield from self._lookup(parent.nodeid, name, who)
        if victim.kind == 0:
            yield from self._attr(victim, who)
        return victim

    def _unlink(self, msg: m.Unlink) -> Task:
        who = _who(msg)
        walk, found = yield from self._parent_of(msg.path, who)
        try:
            parent, name = found.parent, found.name
            assert parent is not None
            if name in _SPECIAL:
                raise _error(errno.EISDIR)
            victim = yield from self._victim(parent, name, who)
            if found.trailing:  # "x/": never a file to unlink
                raise _error(errno.EISDIR if victim.is_dir() else errno.ENOTDIR)
            yield from self._may_remove(parent, victim, who)  # permission before type
            if victim.is_dir():
                raise _error(errno.EISDIR)
            yield self._send(rq.unlink(parent.nodeid, name), who.ctx)
            self._after_remove(parent, name, victim)
            return None
        finally:
            walk.release()

    def _rmdir(self, msg: m.RemoveDir) -> Task:
        who = _who(msg)
        walk, found = yield from self._parent_of(msg.path, who)
        try:
            parent, name = found.parent, found.name
            assert parent is not None
            if name == b".":
                raise _error(errno.EINVAL)
            if name == b"..":
                raise _error(errno.ENOTEMPTY)
            if name == ROOT_NAME:
                raise _error(errno.EBUSY)
            victim = yield from self._victim(parent, name, who)
            yield from self._may_remove(parent, victim, who)  # permission before type
            if not victim.is_dir():
                raise _error(errno.ENOTDIR)
            yield self._send(rq.rmdir(parent.nodeid, name), who.ctx)
            self._after_remove(parent, name, victim)
            return None
        finally:
            walk.release()

    def _after_remove(self, parent: Node, name: bytes, victim: Node) -> None:
        self.table.drop_name(parent.nodeid, name)  # forgets the node unless pinned
        self._invalidate(parent.nodeid, victim.nodeid)

    def _rename(self, msg: m.Rename) -> Task:
        who = _who(msg)
        swalk, sfound = yield from self._parent_of(msg.src, who)
        try:
            dwalk, dfound = yield from self._parent_of(msg.dst, who)
            try:
                return (yield from self._rename_resolved(msg, who, swalk, sfound, dwalk,
                                                         dfound))
            finally:
                dwalk.release()
        finally:
            swalk.release()

    def _rename_resolved(self, msg: m.Rename, who: Who, swalk: Walk, sfound: Resolved,
                         dwalk: Walk, dfound: Resolved) -> Task:
        """rename(2)'s checks in Linux's order, so the same call fails the same way."""
        sparent, sname = sfound.parent, sfound.name
        dparent, dname = dfound.parent, dfound.name
        assert sparent is not None and dparent is not None
        exchange = bool(msg.flags & RENAME_EXCHANGE)
        if sname in _SPECIAL:
            raise _error(errno.EBUSY)
        if dname in _SPECIAL:
            raise _error(errno.EEXIST if msg.flags & RENAME_NOREPLACE else errno.EBUSY)
        src = yield from self._victim(sparent, sname, who)
        # The destination too, as the kernel has it: with RENAME_EXCHANGE the daemon
        # needs it, and a file replaced here may have other names whose count drops.
        try:
            dst: Node | None = yield from self._victim(dparent, dname, who)
        except FileNotFoundError:
            if exchange:
                raise
            dst = None
        if msg.flags & RENAME_NOREPLACE and dst is not None:
            raise _error(errno.EEXIST)
        slashes = sfound.trailing or dfound.trailing
        if slashes and (not src.is_dir() or (exchange and dst is not None
                                             and not dst.is_dir())):
            raise _error(errno.ENOTDIR)  # "x/" names a directory, on either side
        if any(n is src for n in dwalk.stack):
            raise _error(errno.EINVAL)  # a directory into itself
        if dst is not None and any(n is dst for n in swalk.stack):
            raise _error(errno.EINVAL if exchange else errno.ENOTEMPTY)
        if dst is not None and dst.nodeid == src.nodeid:
            return None  # two names of one file: rename(2) does nothing, checks nothing
        yield from self._may_remove(sparent, src, who)
        if dst is not None:
            yield from self._may_remove(dparent, dst, who)
        else:
            yield from self._may_change(dparent, who)
        if not who.cred.root and sparent is not dparent:
            # A directory moving elsewhere has its ".." rewritten: write permission on it.
            for moved in (src, dst) if exchange else (src,):
                if moved is not None and moved.is_dir():
                    require((yield from self._attr(moved, who)), who.cred, W)
        yield self._send(rq.rename(sparent.nodeid, sname, dparent.nodeid, dname, msg.flags),
                         who.ctx)
        self._invalidate(sparent.nodeid, dparent.nodeid, src.nodeid)
        # Move the cached names along (the kernel's d_move) rather than forget and look
        # the nodes up again.
        if msg.flags & RENAME_EXCHANGE:
            expiry = self.table.name_expiry(dparent.nodeid, dname)
            assert dst is not None
            self.table.move_name(sparent.nodeid, sname, dparent.nodeid, dname)
            self.table.add_name(sparent.nodeid, sname, dst, expiry)
        else:
            if dst is not None:
                self._invalidate(dst.nodeid)
                self.table.drop_name(dparent.nodeid, dname)  # forgotten unless pinned
            self.table.move_name(sparent.nodeid, sname, dparent.nodeid, dname)
        return None

    def _setattr(self, msg: m.SetAttr) -> Task:
        who = _who(msg)
        walk, node = yield from self._node_at(msg.path, who, follow=msg.follow)
        try:
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
            attr = yield from self._attr(node, who)
            if not kwargs:
                return attr
            _may_setattr(attr, who.cred, kwargs)
            out = yield self._send(rq.setattr(node.nodeid, **kwargs), who.ctx)
            self.table.set_attr(node, out.attr, out.attr_valid, out.attr_valid_nsec)
            return out.attr
        finally:
            walk.release()

    def _statfs(self, msg: m.StatFs) -> Task:
        who = _who(msg)
        walk, node = yield from self._node_at(msg.path, who)
        try:
            return (yield self._send(rq.statfs(node.nodeid), who.ctx))
        finally:
            walk.release()

    def _xattr_node(self, msg: Any, want: int) -> Generator[Future[Any], Any,
                                                            tuple[Walk, Node]]:
        who = _who(msg)
        walk, node = yield from self._node_at(msg.path, who, follow=msg.follow)
        cred = who.cred
        if not cred.root:
            try:
                attr = yield from self._attr(node, who)
                if want & W and not cred.root and cred.uid != attr.uid and \
                        stat_mod.S_ISDIR(attr.mode) and attr.mode & stat_mod.S_ISVTX:
                    raise _error(errno.EPERM)
                require(attr, cred, want)
            except BaseException:
                walk.release()
                raise
        return walk, node

    def _getxattr(self, msg: m.GetXattr) -> Task:
        who = _who(msg)
        walk, node = yield from self._xattr_node(msg, R)
        try:
            name = os.fsencode(msg.name)
            size = (yield self._send(rq.getxattr(node.nodeid, name, 0), who.ctx)).size
            if size == 0:
                return b""
            return (yield self._send(rq.getxattr(node.nodeid, name, size), who.ctx))
        finally:
            walk.release()

    def _setxattr(self, msg: m.SetXattr) -> Task:
        who = _who(msg)
        walk, node = yield from self._xattr_node(msg, W)
        try:
            yield self._send(rq.setxattr(node.nodeid, os.fsencode(msg.name), msg.value,
                                         msg.flags), who.ctx)
            self._invalidate(node.nodeid)
            return None
        finally:
            walk.release()

    def _listxattr(self, msg: m.ListXattr) -> Task:
        who = _who(msg)
        walk, node = yield from self._node_at(msg.path, who, follow=msg.follow)
        try:
            size = (yield self._send(rq.listxattr(node.nodeid, 0), who.ctx)).size
            if size == 0:
                return []
            return (yield self._send(rq.listxattr(node.nodeid, size), who.ctx))
        finally:
            walk.release()

    def _removexattr(self, msg: m.RemoveXattr) -> Task:
        who = _who(msg)
        walk, node = yield from self._xattr_node(msg, W)
        try:
            yield self._send(rq.removexattr(node.nodeid, os.fsencode(msg.name)), who.ctx)
            self._invalidate(node.nodeid)
            return None
        finally:
            walk.release()

    # -- opening handles -------------------------------------------------------------------

    def _open(self, msg: m.Open) -> Task:
        who = _who(msg)
        flags = msg.flags
        if flags & os.O_CREAT and flags & os.O_DIRECTORY:
            raise _error(errno.EINVAL)  # as Linux (6.4 on) refuses it before any lookup
        if flags & os.O_CREAT and flags & os.O_EXCL:
            # O_EXCL: whatever is there, even a symlink, makes it fail (the daemon's
            # EEXIST), and nothing is followed.
            walk, found = yield from self._parent_of(msg.path, who)
            if found.trailing or found.name in _SPECIAL:
                walk.release()
                # "x/" is EISDIR; ".", ".." and the root exist: EEXIST (as Linux).
                raise _error(errno.EISDIR if found.trailing and found.name not in _SPECIAL
                             else errno.EEXIST)
        elif flags & os.O_CREAT:
            walk = self._walk(msg.path, mode=CREATE, follow=not flags & os.O_NOFOLLOW,
                              who=who)
            try:
                found = yield from self._resolve(walk, who)
            except BaseException:
                walk.release()
                raise
        else:
            walk, node = yield from self._node_at(msg.path, who,
                                                  follow=not flags & os.O_NOFOLLOW)
            found = Resolved(node, None, b"", False)
        try:
            if found.node is not None:
                return (yield from self._open_node(found.node, flags, who,
                                                   creating=bool(flags & os.O_CREAT)))
            parent, name = found.parent, found.name
            assert parent is not None
            if flags & os.O_EXCL:
                yield from self._may_create(parent, name, who)
            else:  # CREATE mode already found the name absent
                yield from self._may_change(parent, who)
            mode = msg.mode & ~msg.umask & 0o7777
            # Never O_CREAT in CREATE's flags: the C daemon adds it itself, and when the
            # name exists it re-opens with these flags, and openat(O_CREAT) without a
            # mode aborts it (glibc fortify). The kernel only sends CREATE for absent
            # names.
            out = yield self._send(rq.create(parent.nodeid, name, flags & ~_O_STRIP_CREATE,
                                             mode, 0), who.ctx)
            self._invalidate(parent.nodeid)
            node = self._learn(parent.nodeid, name, out.entry)
            return self._opened(node, out.open.fh, flags)
        finally:
            walk.release()

    def _open_node(self, node: Node, flags: int, who: Who, *,
                   creating: bool) -> Task:
        """OPEN of a node that exists, with open(2)'s checks of its type."""
        attr = yield from self._attr(node, who)
        mode = attr.mode
        writes = flags & (os.O_WRONLY | os.O_RDWR)
        if stat_mod.S_ISLNK(mode):
            raise _error(errno.ELOOP)
        if stat_mod.S_ISDIR(mode) and (creating or writes or flags & os.O_TRUNC):
            raise _error(errno.EISDIR)
        if flags & os.O_DIRECTORY and not stat_mod.S_ISDIR(mode):
            raise _error(errno.ENOTDIR)
        cred = who.cred
        if not cred.root:
            access = flags & os.O_ACCMODE
            want = (R if access in (os.O_RDONLY, os.O_RDWR) else 0) | (
                W if access in (os.O_WRONLY, os.O_RDWR) or flags & os.O_TRUNC else 0)
            require(attr, cred, want)
        if stat_mod.S_ISDIR(mode):
            # As the kernel does: a directory is opened with OPENDIR even by open(2); the
            # file actor then answers read/write with EISDIR and releases with RELEASEDIR.
            opened = yield self._send(rq.opendir(node.nodeid), who.ctx)
            return self._opened(node, opened.fh, flags, handle_flags=flags | os.O_DIRECTORY)
        opened = yield self._send(rq.open(node.nodeid, flags & ~_O_STRIP), who.ctx)
        if flags & os.O_TRUNC:
            self._invalidate(node.nodeid)
        return self._opened(node, opened.fh, flags)

    def _opened(self, node: Node, fh: int, flags: int, *,
                handle_flags: int | None = None) -> m.OpenedFile:
        handle_flags = flags if handle_flags is None else handle_flags
        ref = self._start_handle(FileActor, node, fh, handle_flags)
        return m.OpenedFile(actor=ref, nodeid=node.nodeid, flags=flags, attr=node.attr)

    def _opendir(self, msg: m.OpenDir) -> Task:
        who = _who(msg)
        walk, node = yield from self._node_at(msg.path, who)
        try:
            attr = yield from self._attr(node, who)
            if not stat_mod.S_ISDIR(attr.mode):
                raise _error(errno.ENOTDIR)
            cred = who.cred
            if not cred.root:
                require(attr, cred, R)
            opened = yield self._send(rq.opendir(node.nodeid), who.ctx)
            ref = self._start_handle(DirectoryActor, node, opened.fh, 0)
            return m.OpenedDir(actor=ref, nodeid=node.nodeid)
        finally:
            walk.release()

    def _start_handle(self, cls: type[Any], node: Node, fh: int, flags: int) -> Any:
        assert self.limits is not None
        self.table.pin(node)
        try:
            ref = cls.start(self.device, self.actor_ref, node.nodeid, fh, flags, self.limits,
                            self.published)
        except BaseException:
            self.table.unpin(node)
            self.device.submit(cls.release_request(node.nodeid, fh, flags))
            raise
        self.handles.add(ref)
        return ref

    # -- notes from handle actors ------------------------------------------------------------

    def _released(self, msg: m.Forgotten) -> None:
        self.handles.discard(msg.handle)
        node = self.table.get(msg.nodeid)
        if node is not None:
            self.table.unpin(node)  # unlinked while open: now it can go

    def _learn_entries(self, msg: m.LearnEntries) -> None:
        parent = self.table.get(msg.parent)
        forgets: list[tuple[int, int]] = []
        for plus in msg.entries:
            assert isinstance(plus, DirentPlus)
            if plus.entry.nodeid == 0 or plus.dirent.name in (b".", b".."):
                continue
            if parent is None:
                forgets.append((plus.entry.nodeid, 1))  # nobody to cache it: give it back
            else:
                self._learn(parent.nodeid, plus.dirent.name, plus.entry)
        self.table.forgets.extend(forgets)

    def _invalidate_attr(self, msg: m.InvalidateAttr) -> None:
        self._invalidate(msg.nodeid)

    def _stats(self, msg: m.SessionStats) -> dict[str, Any]:
        return {
            "nodes": len(self.table),
            "dentries": self.table.name_count,
            "handles": len([r for r in self.handles if r.is_alive()]),
            "forgets_sent": self.forgets_sent,
            "lookups_held": self.table.lookups_held(),
            "max_write": self.init.max_write if self.init else 0,
            "max_pages": self.init.max_pages if self.init else 0,
            "minor": self.init.minor if self.init else 0,
        }

    def _list_mounts(self, msg: m.ListMounts) -> dict[str, int]:
        return {"/" + os.fsdecode(k): v for k, v in self.mounts.items()}

    _HANDLERS: ClassVar[dict[type, Any]] = {}


def _may_setattr(attr: Attr, cred: Cred, change: dict[str, Any]) -> None:
    """What chmod, chown, truncate and utime need (the kernel's setattr_prepare)."""
    if cred.root:
        return
    owner = cred.uid == attr.uid
    if "mode" in change:
        require_owner(attr, cred)
    if "uid" in change and change["uid"] != attr.uid:
        raise _error(errno.EPERM)
    if "gid" in change and change["gid"] != attr.gid and (
            not owner or not cred.in_group(change["gid"])):
        raise _error(errno.EPERM)
    if "atime" in change or "mtime" in change:
        require_owner(attr, cred)  # a given time: the owner only
    elif ("atime_now" in change or "mtime_now" in change) and not owner:
        require(attr, cred, W)  # "now": the owner, or whoever may write
    if "size" in change:
        if stat_mod.S_ISDIR(attr.mode):
            raise _error(errno.EISDIR)
        require(attr, cred, W)


def _path_handler(fn: Any) -> Any:
    return lambda self, msg: self._path_op(fn, msg)


# Messages after which no published path result can be trusted (see _path_op).
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
    m.Mount: SessionActor._mount,
    m.DeviceLost: SessionActor._device_lost,
}


def open_session(device: DeviceClient, config: SessionConfig | None = None,
                 published: PublishedAttrs | None = None) -> pykka.ActorRef[SessionActor]:
    """Start a session actor on ``device`` and mount it (FUSE_INIT); errors are raised here,
    and the half-started actor is stopped. ``published``: where the session publishes
    attributes for lock-free warm stats (see :mod:`pyvirtiofs.actors.published`)."""
    ref = SessionActor.start(device, config, published)
    timeout = (config or SessionConfig()).request_timeout
    try:
        ref.ask(m.Mount(), timeout=2 * timeout + 5)
    except BaseException:
        ref.stop()
        raise
    return ref
