"""The session's operations on names: mkdir, mknod, symlink, link, unlink, rmdir and
rename, with Linux's checks in Linux's order, and the name cache kept in step."""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from collections.abc import Generator
from typing import Any

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.nodes import Node
from pyvirtiofs.actors.permissions import W, require
from pyvirtiofs.actors.runtime import Future
from pyvirtiofs.actors.session_core import SPECIAL_NAMES, SessionBase, Task, Who, error, who_of
from pyvirtiofs.actors.walk import (
    ROOT_NAME,
    Resolved,
    Walk,
)
from pyvirtiofs.codec import fuse_requests as rq
from pyvirtiofs.codec.fuse_abi import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
)
from pyvirtiofs.codec.fuse_types import EntryOut


class NamespaceOps(SessionBase):
    """Adding, removing and moving names."""

    def _new_entry(self, path: m.PathArg, who: Who, request_for: Any, *,
                   directory: bool = False) -> Task:
        """Create a name (mkdir, mknod, symlink, link): the parent is resolved, the name
        checked as Linux does, then ``request_for(parent_id, name)`` is sent."""
        walk, found = yield from self._parent_of(path, who)
        try:
            parent, name = found.parent, found.name
            assert parent is not None
            if name in SPECIAL_NAMES:
                raise error(errno.EEXIST)
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
        who = who_of(msg)
        mode = msg.mode & ~msg.umask & 0o7777
        return (yield from self._new_entry(
            msg.path, who, lambda p, n: rq.mkdir(p, n, mode, 0), directory=True))

    def _mknod(self, msg: m.MakeNode) -> Task:
        who = who_of(msg)
        mode = stat_mod.S_IFMT(msg.mode) | (msg.mode & ~msg.umask & 0o7777)
        if not stat_mod.S_IFMT(mode):
            mode |= stat_mod.S_IFREG
        return (yield from self._new_entry(
            msg.path, who, lambda p, n: rq.mknod(p, n, mode, msg.rdev, 0)))

    def _symlink(self, msg: m.Symlink) -> Task:
        who = who_of(msg)
        target = os.fsencode(msg.target)
        return (yield from self._new_entry(
            msg.path, who, lambda p, n: rq.symlink(p, n, target)))

    def _link(self, msg: m.Link) -> Task:
        who = who_of(msg)
        walk, src = yield from self._node_at(msg.src, who, follow=False)
        try:
            if src.is_dir():
                # No hard links to directories; but a name that exists is EEXIST first.
                dwalk, found = yield from self._parent_of(msg.dst, who)
                try:
                    if found.name in SPECIAL_NAMES:
                        raise error(errno.EEXIST)
                    assert found.parent is not None
                    taken = yield from self._absent_or_exists(found.parent, found.name,
                                                              who)
                finally:
                    dwalk.release()
                # "dst/" is ENOENT or EEXIST whatever the source; a free name, EPERM.
                raise taken if found.trailing or taken.errno == errno.EEXIST else error(
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
        who = who_of(msg)
        walk, found = yield from self._parent_of(msg.path, who)
        try:
            parent, name = found.parent, found.name
            assert parent is not None
            if name in SPECIAL_NAMES:
                raise error(errno.EISDIR)
            victim = yield from self._victim(parent, name, who)
            if found.trailing:  # "x/": never a file to unlink
                raise error(errno.EISDIR if victim.is_dir() else errno.ENOTDIR)
            yield from self._may_remove(parent, victim, who)  # permission before type
            if victim.is_dir():
                raise error(errno.EISDIR)
            yield self._send(rq.unlink(parent.nodeid, name), who.ctx)
            self._after_remove(parent, name, victim)
            return None
        finally:
            walk.release()

    def _rmdir(self, msg: m.RemoveDir) -> Task:
        who = who_of(msg)
        walk, found = yield from self._parent_of(msg.path, who)
        try:
            parent, name = found.parent, found.name
            assert parent is not None
            if name == b".":
                raise error(errno.EINVAL)
            if name == b"..":
                raise error(errno.ENOTEMPTY)
            if name == ROOT_NAME:
                raise error(errno.EBUSY)
            victim = yield from self._victim(parent, name, who)
            yield from self._may_remove(parent, victim, who)  # permission before type
            if not victim.is_dir():
                raise error(errno.ENOTDIR)
            yield self._send(rq.rmdir(parent.nodeid, name), who.ctx)
            self._after_remove(parent, name, victim)
            return None
        finally:
            walk.release()

    def _after_remove(self, parent: Node, name: bytes, victim: Node) -> None:
        self.table.drop_name(parent.nodeid, name)  # forgets the node unless pinned
        self._invalidate(parent.nodeid, victim.nodeid)

    def _rename(self, msg: m.Rename) -> Task:
        who = who_of(msg)
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
        if sname in SPECIAL_NAMES:
            raise error(errno.EBUSY)
        if dname in SPECIAL_NAMES:
            raise error(errno.EEXIST if msg.flags & RENAME_NOREPLACE else errno.EBUSY)
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
            raise error(errno.EEXIST)
        slashes = sfound.trailing or dfound.trailing
        if slashes and (not src.is_dir() or (exchange and dst is not None
                                             and not dst.is_dir())):
            raise error(errno.ENOTDIR)  # "x/" names a directory, on either side
        if any(n is src for n in dwalk.stack):
            raise error(errno.EINVAL)  # a directory into itself
        if dst is not None and any(n is dst for n in swalk.stack):
            raise error(errno.EINVAL if exchange else errno.ENOTEMPTY)
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
