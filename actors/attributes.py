"""The session's operations on what a path names: stat, access, readlink, setattr
(chmod, chown, truncate, utime), statfs and extended attributes."""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from collections.abc import Generator
from typing import Any

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.nodes import Node
from pyvirtiofs.actors.permissions import Cred, R, W, X, may, require, require_owner
from pyvirtiofs.actors.runtime import Future
from pyvirtiofs.actors.session_core import SessionBase, Task, error, who_of
from pyvirtiofs.actors.walk import (
    Walk,
)
from pyvirtiofs.codec import fuse_requests as rq
from pyvirtiofs.codec.fuse_types import Attr


class AttributeOps(SessionBase):
    """Questions and changes of one node's attributes."""

    def _stat(self, msg: m.Stat) -> Task:
        who = who_of(msg)
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
        who = who_of(msg)
        walk, node = yield from self._node_at(msg.path, who)
        try:
            if msg.mode == os.F_OK:
                return None
            # As the kernel with default_permissions: checked here, from the mode bits.
            attr = yield from self._attr(node, who)
            if not may(attr, who.cred, msg.mode & (R | W | X)):
                raise error(errno.EACCES)
            return None
        finally:
            walk.release()

    def _readlink(self, msg: m.ReadLink) -> Task:
        who = who_of(msg)
        walk, node = yield from self._node_at(msg.path, who, follow=False)
        try:
            if not node.is_link():
                raise error(errno.EINVAL)
            target: bytes = yield self._send(rq.readlink(node.nodeid), who.ctx)
            return target
        finally:
            walk.release()

    def _setattr(self, msg: m.SetAttr) -> Task:
        who = who_of(msg)
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
        who = who_of(msg)
        walk, node = yield from self._node_at(msg.path, who)
        try:
            return (yield self._send(rq.statfs(node.nodeid), who.ctx))
        finally:
            walk.release()

    def _xattr_node(self, msg: Any, want: int) -> Generator[Future[Any], Any,
                                                            tuple[Walk, Node]]:
        who = who_of(msg)
        walk, node = yield from self._node_at(msg.path, who, follow=msg.follow)
        cred = who.cred
        if not cred.root:
            try:
                attr = yield from self._attr(node, who)
                if want & W and not cred.root and cred.uid != attr.uid and \
                        stat_mod.S_ISDIR(attr.mode) and attr.mode & stat_mod.S_ISVTX:
                    raise error(errno.EPERM)
                require(attr, cred, want)
            except BaseException:
                walk.release()
                raise
        return walk, node

    def _getxattr(self, msg: m.GetXattr) -> Task:
        who = who_of(msg)
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
        who = who_of(msg)
        walk, node = yield from self._xattr_node(msg, W)
        try:
            yield self._send(rq.setxattr(node.nodeid, os.fsencode(msg.name), msg.value,
                                         msg.flags), who.ctx)
            self._invalidate(node.nodeid)
            return None
        finally:
            walk.release()

    def _listxattr(self, msg: m.ListXattr) -> Task:
        who = who_of(msg)
        walk, node = yield from self._node_at(msg.path, who, follow=msg.follow)
        try:
            size = (yield self._send(rq.listxattr(node.nodeid, 0), who.ctx)).size
            if size == 0:
                return []
            return (yield self._send(rq.listxattr(node.nodeid, size), who.ctx))
        finally:
            walk.release()

    def _removexattr(self, msg: m.RemoveXattr) -> Task:
        who = who_of(msg)
        walk, node = yield from self._xattr_node(msg, W)
        try:
            yield self._send(rq.removexattr(node.nodeid, os.fsencode(msg.name)), who.ctx)
            self._invalidate(node.nodeid)
            return None
        finally:
            walk.release()


def _may_setattr(attr: Attr, cred: Cred, change: dict[str, Any]) -> None:
    """What chmod, chown, truncate and utime need (the kernel's setattr_prepare)."""
    if cred.root:
        return
    owner = cred.uid == attr.uid
    if "mode" in change:
        require_owner(attr, cred)
    if "uid" in change and change["uid"] != attr.uid:
        raise error(errno.EPERM)
    if "gid" in change and change["gid"] != attr.gid and (
            not owner or not cred.in_group(change["gid"])):
        raise error(errno.EPERM)
    if "atime" in change or "mtime" in change:
        require_owner(attr, cred)  # a given time: the owner only
    elif ("atime_now" in change or "mtime_now" in change) and not owner:
        require(attr, cred, W)  # "now": the owner, or whoever may write
    if "size" in change:
        if stat_mod.S_ISDIR(attr.mode):
            raise error(errno.EISDIR)
        require(attr, cred, W)
