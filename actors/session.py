"""The session actor: FUSE_INIT, the mount table, path walks, the node table, FORGET.

A thin actor around plain rules: :class:`~pyvirtiofs.actors.nodes.NodeTable` (nodes,
lookup counts, the name cache with the daemon's timeouts), :class:`~pyvirtiofs.actors.walk.
Walk` (path resolution) and :mod:`~pyvirtiofs.actors.permissions`. What is left is what an
operation sends and what it learns from the reply, in one file per kind of operation
(:mod:`~pyvirtiofs.actors.attributes`, :mod:`~pyvirtiofs.actors.namespace`,
:mod:`~pyvirtiofs.actors.opening`) over the shared steps of
:mod:`~pyvirtiofs.actors.session_core`; here, the life cycle and the dispatch.

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
from typing import Any, ClassVar

import pykka

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.attributes import AttributeOps
from pyvirtiofs.actors.device_client import DeviceClient
from pyvirtiofs.actors.handles import HandleLimits
from pyvirtiofs.actors.namespace import NamespaceOps
from pyvirtiofs.actors.nodes import Node
from pyvirtiofs.actors.opening import OpeningOps
from pyvirtiofs.actors.published import PublishedAttrs
from pyvirtiofs.actors.runtime import Future
from pyvirtiofs.actors.session_core import SessionConfig, Task, path_handler, this_process
from pyvirtiofs.codec import fuse_requests as rq
from pyvirtiofs.codec.fuse_abi import (
    FUSE_ROOT_ID,
    MIN_MINOR,
)
from pyvirtiofs.codec.fuse_types import Dirent, DirentPlus, InitOut
from pyvirtiofs.hw.transport import DeviceGone

log = logging.getLogger(__name__)

__all__ = ["SessionActor", "SessionConfig", "open_session"]

SKIPPED_MOUNTS = (b"tmp", b"proc")  # as the Hermit driver does in tag "/" mode


class SessionActor(AttributeOps, NamespaceOps, OpeningOps):
    """One FUSE session on one device. See the module docstring for its state."""

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
            yield from self._attr(root, this_process())
        base = root
        if self.config.root and self.config.root.strip("/"):
            self.mounts = {b"": FUSE_ROOT_ID}
            walk = self._walk(self.config.root)
            try:
                found = yield from self._resolve(walk, this_process())
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
            node = yield from self._lookup(base.nodeid, name, this_process())
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


SessionActor._HANDLERS = {
    m.Stat: path_handler(SessionActor._stat),
    m.Access: path_handler(SessionActor._access),
    m.ReadLink: path_handler(SessionActor._readlink),
    m.MakeDir: path_handler(SessionActor._mkdir),
    m.MakeNode: path_handler(SessionActor._mknod),
    m.Symlink: path_handler(SessionActor._symlink),
    m.Link: path_handler(SessionActor._link),
    m.Unlink: path_handler(SessionActor._unlink),
    m.RemoveDir: path_handler(SessionActor._rmdir),
    m.Rename: path_handler(SessionActor._rename),
    m.SetAttr: path_handler(SessionActor._setattr),
    m.StatFs: path_handler(SessionActor._statfs),
    m.GetXattr: path_handler(SessionActor._getxattr),
    m.SetXattr: path_handler(SessionActor._setxattr),
    m.ListXattr: path_handler(SessionActor._listxattr),
    m.RemoveXattr: path_handler(SessionActor._removexattr),
    m.Open: path_handler(SessionActor._open),
    m.OpenDir: path_handler(SessionActor._opendir),
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
