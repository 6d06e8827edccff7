"""The session's open and opendir: the checks of open(2) and starting the handle's
actor, which pins its node until it is released."""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from typing import Any

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.handles import DirectoryActor, FileActor
from pyvirtiofs.actors.nodes import Node
from pyvirtiofs.actors.permissions import R, W, require
from pyvirtiofs.actors.session_core import SPECIAL_NAMES, SessionBase, Task, Who, error, who_of
from pyvirtiofs.actors.walk import (
    CREATE,
    Resolved,
)
from pyvirtiofs.codec import fuse_requests as rq

O_STRIP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_CLOEXEC  # never sent to the daemon
O_STRIP_CREATE = os.O_CREAT | os.O_NOCTTY | os.O_CLOEXEC  # CREATE keeps O_EXCL


class OpeningOps(SessionBase):
    """Opening files and directories."""

    # -- opening handles -------------------------------------------------------------------

    def _open(self, msg: m.Open) -> Task:
        who = who_of(msg)
        flags = msg.flags
        if flags & os.O_CREAT and flags & os.O_DIRECTORY:
            raise error(errno.EINVAL)  # as Linux (6.4 on) refuses it before any lookup
        if flags & os.O_CREAT and flags & os.O_EXCL:
            # O_EXCL: whatever is there, even a symlink, makes it fail (the daemon's
            # EEXIST), and nothing is followed.
            walk, found = yield from self._parent_of(msg.path, who)
            if found.trailing or found.name in SPECIAL_NAMES:
                walk.release()
                # "x/" is EISDIR; ".", ".." and the root exist: EEXIST (as Linux).
                raise error(errno.EISDIR if found.trailing and found.name not in SPECIAL_NAMES
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
            out = yield self._send(rq.create(parent.nodeid, name, flags & ~O_STRIP_CREATE,
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
            raise error(errno.ELOOP)
        if stat_mod.S_ISDIR(mode) and (creating or writes or flags & os.O_TRUNC):
            raise error(errno.EISDIR)
        if flags & os.O_DIRECTORY and not stat_mod.S_ISDIR(mode):
            raise error(errno.ENOTDIR)
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
        opened = yield self._send(rq.open(node.nodeid, flags & ~O_STRIP), who.ctx)
        if flags & os.O_TRUNC:
            self._invalidate(node.nodeid)
        return self._opened(node, opened.fh, flags)

    def _opened(self, node: Node, fh: int, flags: int, *,
                handle_flags: int | None = None) -> m.OpenedFile:
        handle_flags = flags if handle_flags is None else handle_flags
        ref = self._start_handle(FileActor, node, fh, handle_flags)
        return m.OpenedFile(actor=ref, nodeid=node.nodeid, flags=flags, attr=node.attr)

    def _opendir(self, msg: m.OpenDir) -> Task:
        who = who_of(msg)
        walk, node = yield from self._node_at(msg.path, who)
        try:
            attr = yield from self._attr(node, who)
            if not stat_mod.S_ISDIR(attr.mode):
                raise error(errno.ENOTDIR)
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
