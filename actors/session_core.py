"""The session's core, under its operations: state, the device, nodes, path walks,
and the permission checks every operation shares. The operations are in
:mod:`~pyvirtiofs.actors.attributes`, :mod:`~pyvirtiofs.actors.namespace` and
:mod:`~pyvirtiofs.actors.opening`; the actor that puts them together (and its life cycle)
in :mod:`~pyvirtiofs.actors.session`."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, NamedTuple

import pykka

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.device_client import DeviceClient
from pyvirtiofs.actors.handles import HandleLimits
from pyvirtiofs.actors.nodes import Node, NodeTable
from pyvirtiofs.actors.permissions import Cred, W, X, may_delete, require
from pyvirtiofs.actors.published import PublishedAttrs
from pyvirtiofs.actors.runtime import Future, InlineActor
from pyvirtiofs.actors.walk import (
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
from pyvirtiofs.codec.fuse_types import Attr, EntryOut, InitOut
from pyvirtiofs.hw.transport import DeviceGone

log = logging.getLogger(__name__)
log = logging.getLogger(__name__)

__all__ = ["SPECIAL_NAMES", "SessionBase", "SessionConfig", "Task", "Who", "caller_cred",
           "error", "path_handler", "this_process", "who_of"]

SPECIAL_NAMES = (b".", b"..", ROOT_NAME)

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


def error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def with_paths(exc: OSError, path: Any, path2: Any = None) -> OSError:
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


def who_of(msg: Any) -> Who:
    return Who(msg.ctx, caller_cred(msg.ctx, msg.groups))


#: This process itself (the session's own requests: INIT, mount points).
def this_process() -> Who:
    return Who(None, caller_cred(None))


def caller_cred(ctx: m.Credentials | None, groups: tuple[int, ...] | None = None) -> Cred:
    """Who a request acts for: its credentials, or this process's."""
    if ctx is None:
        return Cred(os.geteuid(), os.getegid(), frozenset(os.getgroups()))
    return Cred(ctx[0], ctx[1], frozenset(groups or ()))


class SessionBase(InlineActor):
    """State and shared steps of a session (see :mod:`pyvirtiofs.actors.session`)."""

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
            raise error(errno.ENOENT)
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
                raise error(errno.ENOENT)
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
        taken = yield from self._absent_or_exists(directory, name, who)
        if taken.errno == errno.EEXIST:
            raise taken
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
            raise error(errno.EPERM)

    def _absent_or_exists(self, parent: Node, name: bytes, who: Who,
                          ) -> Generator[Future[Any], Any, OSError]:
        """A name with a trailing slash cannot be created as a non-directory: EEXIST when
        it exists, ENOENT when it does not (as Linux's filename_create)."""
        try:
            yield from self._lookup(parent.nodeid, name, who)
        except FileNotFoundError:
            return error(errno.ENOENT)
        return error(errno.EEXIST)

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
            raise with_paths(exc, src, getattr(msg, "dst", None)) from None
        finally:
            opens = msg.flags if isinstance(msg, m.Open) else 0
            if isinstance(msg, _CHANGES) or opens & (os.O_CREAT | os.O_TRUNC):
                self.published.clear()  # a change anywhere may reach any published path
            if opens & os.O_TRUNC or (isinstance(msg, m.SetAttr) and msg.size is not None):
                self.published.data_changed()  # a truncation: drop every read-ahead


def path_handler(fn: Any) -> Any:
    return lambda self, msg: self._path_op(fn, msg)


# Messages after which no published path result can be trusted (see _path_op).
_CHANGES = (m.MakeDir, m.MakeNode, m.Symlink, m.Link, m.Unlink, m.RemoveDir, m.Rename,
            m.SetAttr, m.SetXattr, m.RemoveXattr)

