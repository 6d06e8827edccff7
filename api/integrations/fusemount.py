"""Re-export a share as a kernel FUSE mount (pyfuse3, low level, inode based).

    pyvirtiofs mount /srv/share /mnt/share        # until Ctrl-C, SIGTERM or fusermount3 -u
    pyvirtiofs mount -b /srv/share /mnt/share     # in the background, once mounted

    from pyvirtiofs.api import connect
    from pyvirtiofs.api.integrations.fusemount import mount
    with connect("/srv/share") as fs:
        mount(fs, "/mnt/share")                   # blocks; clean unmount on SIGINT/SIGTERM

Design
------
The kernel already speaks FUSE and so does virtiofsd: this module is a *node-level
passthrough*. Each kernel request becomes the same FUSE request to the daemon, sent as a
:class:`pyvirtiofs.actors.messages.FuseCall` to the share's device actor, and carries the kernel
request's ``(uid, gid, pid)`` as its credentials (exactly what ``fs.as_user(uid, gid, pid)``
puts on a message). No path is ever re-resolved, so rename, unlink-while-open, hard links
and ``..`` cost nothing extra and cannot go stale.

* **Inodes.** A kernel inode *is* a daemon node: the table maps kernel ino ↔ daemon node id
  and counts lookups. Every entry we hand the kernel (LOOKUP, MKDIR, MKNOD, SYMLINK, LINK,
  CREATE, accepted READDIRPLUS entries) is one lookup the daemon counted for us; the
  kernel's FORGET(ino, n) becomes FORGET(node, n) to the daemon, so both counts move in
  step and the daemon never pins what the kernel has let go. The kernel ino is the host's
  ``st_ino`` (so ``ls -i``, ``find -inum`` and tar/git hard-link detection see the real,
  stable inode numbers, never a recycled node id); when that number is unusable (1, which
  the root owns; taken by another node, i.e. a share spanning several host file systems)
  the ino is ``2**63 | node id``. The root is ino 1 = node 1.
* **Permissions: ``default_permissions`` is ON.** virtiofsd is built for a guest kernel
  that checks permissions itself: it assumes the caller's fsuid/fsgid only to *create*
  files (so ownership comes out right) and performs open, unlink, rename, chmod, setattr, …
  as root (verified with QEMU's C daemon: uid 65534 may read and unlink a root-only file in
  a 0700 directory; the Rust daemon follows the same design). With the kernel's checks off,
  any user could open or delete root's files. With them on, the kernel checks mode bits
  with the caller's full credentials — supplementary groups, capabilities, sticky
  directories, the set-gid rules of chmod/chown — exactly as on ext4, and the daemon then
  does the work.
* **Set-id bits on write/truncate.** libfuse grants HANDLE_KILLPRIV, so the kernel leaves it
  to the file system to clear S_ISUID/S_ISGID when a file is written or truncated; virtiofsd
  writes as root (CAP_FSETID) and would keep them. We clear them as ext4 would when the
  writer (the opener, for writes) is not root.
* **Data.** No ``direct_io``: the kernel's page cache is in use, so mmap (shared, writable)
  works. ``keep_cache`` follows the daemon's FOPEN_KEEP_CACHE. Reads and writes are split at
  the session's negotiated limits. Byte-range locks are left to the kernel (local locks).
* **Threads.** pyfuse3 runs on trio; each request goes to the device through its
  :class:`~pyvirtiofs.actors.device_client.DeviceClient`, and the device thread's
  completion reschedules the waiting trio task. pyfuse3 keeps global state: one mount per
  process.

Not supported: a remote (``tcp://``) share — a node-level passthrough needs the device
actor in this process; ``connect(..., restart=True)`` shares (a restarted daemon invalidates
every kernel inode: requests then fail with ENOTCONN/ESTALE); POSIX ACLs (kernel checks
use the mode bits); supplementary groups are not sent to the daemon (FUSE 7.36 has no
field for them), so creating a file in a directory writable only through a supplementary
group fails with EACCES.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import stat as stat_mod
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.device_client import DeviceClient
from pyvirtiofs.actors.runtime import Future
from pyvirtiofs.codec import fuse_requests as rq
from pyvirtiofs.codec.fuse_abi import FOPEN_KEEP_CACHE, FUSE_ROOT_ID
from pyvirtiofs.codec.fuse_types import Attr, AttrOut, DirentPlus, EntryOut

try:  # the optional "fuse" extra
    import pyfuse3
    import trio
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    pyfuse3 = None  # type: ignore[assignment]
    trio = None  # type: ignore[assignment]
    _IMPORT_ERROR: ImportError | None = _exc
else:
    _IMPORT_ERROR = None

log = logging.getLogger(__name__)

__all__ = ["FuseMount", "add_arguments", "cmd_mount", "mount"]

READDIR_BUFFER = 64 << 10
SYNTHETIC_INO = 1 << 63
MAX_IO = 1 << 20
# The kernel asks for security.capability before every write(2) (to drop file capabilities
# like set-id bits); its absence is remembered as long as the daemon's attributes are
# (cache=auto: 1 s), saving one round trip per write.
CAPS_XATTR = b"security.capability"
CAPS_CACHE_SECONDS = 1.0
_DOTS = (b".", b"..")
_mount_lock = threading.Lock()  # pyfuse3 has one global session per process


def _require_pyfuse3() -> None:
    if _IMPORT_ERROR is not None:
        raise OSError(errno.ENOSYS, "FUSE mounts need pyfuse3 and trio "
                      "(pip install 'pyvirtiofs[fuse]'; Debian: libfuse3-dev pkg-config fuse3)"
                      f": {_IMPORT_ERROR}")


def _fail(code: int | None) -> Any:
    return pyfuse3.FUSEError(code or errno.EIO)


# -- the device bridge: device futures that wake trio tasks ----------------------------------


class _Device:
    """Sends FUSE requests to the share's device from trio tasks.

    The device actor's thread completes the request's future; its callback reschedules
    the trio task parked on it (cheaper than a trio.Event per request). Deadlines are the
    device's own: a request the daemon does not answer fails with ETIMEDOUT there."""

    def __init__(self, client: DeviceClient, token: Any) -> None:
        self.client = client
        self.token = token

    async def call(self, request: Any, ctx: m.Credentials | None = None) -> Any:
        task = trio.lowlevel.current_task()
        parked = True

        def resume() -> None:  # on the trio thread
            nonlocal parked
            if parked:
                parked = False
                trio.lowlevel.reschedule(task)

        def wake(_: Future[Any]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(resume)

        def abort(_: Any) -> Any:
            nonlocal parked
            parked = False
            self.client.abandon(future, wait=False)
            return trio.lowlevel.Abort.SUCCEEDED

        future = self.client.submit(request, ctx=ctx, callback=wake)
        await trio.lowlevel.wait_task_rescheduled(abort)
        value, error = future.result_or_error()
        if error is not None:
            raise _fail(getattr(error, "errno", None)) from None
        return value

    def forget(self, items: list[tuple[int, int]]) -> None:
        """FORGET / BATCH_FORGET (the daemon sends no reply)."""
        self.client.forget(items)


# -- the operations --------------------------------------------------------------------------


@dataclass(slots=True)
class _File:
    nodeid: int
    ino: int
    fh: int
    flags: int
    privileged: bool  # opened by root: may write without clearing set-id bits


@dataclass(slots=True)
class _Dir:
    nodeid: int
    ino: int
    fh: int
    buf: list[DirentPlus] = field(default_factory=list)
    pos: int = 0
    resume: int = -1  # the kernel offset the buffered remainder continues


def _ctx(ctx: Any) -> m.Credentials:
    return (ctx.uid, ctx.gid, ctx.pid)


def _setid_bits(mode: int) -> int:
    """The set-id bits ext4 clears when a non-privileged writer changes a file."""
    if not stat_mod.S_ISREG(mode):
        return 0
    bits = mode & stat_mod.S_ISUID
    if mode & stat_mod.S_ISGID and mode & stat_mod.S_IXGRP:
        bits |= stat_mod.S_ISGID
    return bits


class _Operations(pyfuse3.Operations if pyfuse3 is not None else object):  # type: ignore[misc]
    """Node-level passthrough of kernel FUSE requests to the daemon (see module doc)."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, device: _Device, max_read: int, max_write: int) -> None:
        super().__init__()
        self.dev = device
        self.max_read = max_read
        self.max_write = max_write
        self.k2n: dict[int, int] = {pyfuse3.ROOT_INODE: FUSE_ROOT_ID}
        self.n2k: dict[int, int] = {FUSE_ROOT_ID: pyfuse3.ROOT_INODE}
        self.lookups: dict[int, int] = {}  # kernel ino -> lookups the kernel holds
        self.modes: dict[int, int] = {}  # node id -> last mode seen (set-id bookkeeping)
        self.no_caps: dict[int, float] = {}  # node id -> until when it has no file caps
        self.files: dict[int, _File] = {}
        self.dirs: dict[int, _Dir] = {}
        self._next_fh = 1

    # -- inode table -------------------------------------------------------------------------

    def _node(self, ino: int) -> int:
        nodeid = self.k2n.get(ino)
        if nodeid is None:
            raise _fail(errno.ESTALE)
        return nodeid

    def _ino_for(self, nodeid: int, host_ino: int) -> int:
        """The kernel ino for ``nodeid`` (existing, or the one it would get)."""
        ino = self.n2k.get(nodeid)
        if ino is not None:
            return ino
        if host_ino <= pyfuse3.ROOT_INODE or host_ino >= SYNTHETIC_INO or host_ino in self.k2n:
            return SYNTHETIC_INO | nodeid
        return host_ino

    def _count(self, ino: int, nodeid: int) -> None:
        """The kernel took one lookup of ``ino`` (= one the daemon counted on ``nodeid``)."""
        if ino != pyfuse3.ROOT_INODE:
            self.k2n[ino] = nodeid
            self.n2k[nodeid] = ino
            self.lookups[ino] = self.lookups.get(ino, 0) + 1

    def _attributes(self, attr: Attr, ino: int, attr_timeout: float) -> Any:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.st_mode = attr.mode
        a.st_nlink = attr.nlink
        a.st_uid = attr.uid
        a.st_gid = attr.gid
        a.st_rdev = attr.rdev
        a.st_size = attr.size
        a.st_blocks = attr.blocks
        a.st_blksize = attr.blksize or 4096
        a.st_atime_ns = attr.atime_ns
        a.st_mtime_ns = attr.mtime_ns
        a.st_ctime_ns = attr.ctime_ns
        a.attr_timeout = attr_timeout
        return a

    def _attr_reply(self, nodeid: int, ino: int, out: AttrOut) -> Any:
        self.modes[nodeid] = out.attr.mode
        return self._attributes(out.attr, ino, out.attr_valid + out.attr_valid_nsec / 1e9)

    def _entry(self, e: EntryOut) -> Any:
        """An entry reply: count the lookup it carries and build the kernel's entry."""
        ino = self._ino_for(e.nodeid, e.attr.ino)
        self._count(ino, e.nodeid)
        return self._entry_attributes(e, ino)

    def _entry_attributes(self, e: EntryOut, ino: int) -> Any:
        self.modes[e.nodeid] = e.attr.mode
        a = self._attributes(e.attr, ino, e.attr_valid + e.attr_valid_nsec / 1e9)
        a.generation = e.generation
        a.entry_timeout = e.entry_valid + e.entry_valid_nsec / 1e9
        return a

    def _forget_daemon(self, items: list[tuple[int, int]]) -> None:
        self.dev.forget(items)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        items: list[tuple[int, int]] = []
        for ino, n in inode_list:
            nodeid = self.k2n.get(ino)
            if nodeid is None or ino == pyfuse3.ROOT_INODE:
                continue
            left = self.lookups.get(ino, 0) - n
            if left <= 0:
                self.lookups.pop(ino, None)
                self.k2n.pop(ino, None)
                self.n2k.pop(nodeid, None)
                self.modes.pop(nodeid, None)
                self.no_caps.pop(nodeid, None)
            else:
                self.lookups[ino] = left
            items.append((nodeid, n))
        self._forget_daemon(items)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- set-id bits (see module doc) -------------------------------------------------------

    async def _kill_setid(self, nodeid: int, ino: int, notify: bool) -> AttrOut | None:
        bits = _setid_bits(self.modes.get(nodeid, 0))
        if not bits:
            return None
        out: AttrOut = await self.dev.call(
            rq.setattr(nodeid, mode=self.modes[nodeid] & 0o7777 & ~bits))
        self.modes[nodeid] = out.attr.mode
        if notify:
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(ino, attr_only=True)
        return out

    # -- metadata -----------------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> Any:
        e: EntryOut = await self.dev.call(rq.lookup(self._node(parent_inode), name), _ctx(ctx))
        if e.nodeid == 0:  # a negative entry, cacheable for entry_valid
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = e.entry_valid + e.entry_valid_nsec / 1e9
            return a
        return self._entry(e)

    async def getattr(self, inode: int, ctx: Any) -> Any:
        nodeid = self._node(inode)
        return self._attr_reply(nodeid, inode, await self.dev.call(rq.getattr(nodeid),
                                                                    _ctx(ctx)))

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: Any) -> Any:
        nodeid = self._node(inode)
        kwargs: dict[str, Any] = {}
        opened = self.files.get(fh) if fh is not None else None
        if opened is not None:
            kwargs["fh"] = opened.fh
        if fields.update_size:
            kwargs["size"] = attr.st_size
        if fields.update_mode:
            kwargs["mode"] = attr.st_mode & 0o7777
        elif fields.update_size and ctx.uid != 0:
            bits = _setid_bits(self.modes.get(nodeid, 0))
            if bits:  # truncate(2) by an unprivileged caller clears set-id bits on ext4
                kwargs["mode"] = self.modes[nodeid] & 0o7777 & ~bits
        if fields.update_uid:
            kwargs["uid"] = attr.st_uid
        if fields.update_gid:
            kwargs["gid"] = attr.st_gid
        if fields.update_atime:
            kwargs["atime"] = divmod(attr.st_atime_ns, 1_000_000_000)
        if fields.update_mtime:
            kwargs["mtime"] = divmod(attr.st_mtime_ns, 1_000_000_000)
        if set(kwargs) <= {"fh"}:
            out = await self.dev.call(rq.getattr(nodeid), _ctx(ctx))
        else:
            out = await self.dev.call(rq.setattr(nodeid, **kwargs), _ctx(ctx))
        return self._attr_reply(nodeid, inode, out)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.dev.call(rq.readlink(self._node(inode)), _ctx(ctx))

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> Any:
        # The kernel has applied the umask already (no FUSE_DONT_MASK): send 0.
        req = rq.mknod(self._node(parent_inode), name, mode, rdev, 0)
        return self._entry(await self.dev.call(req, _ctx(ctx)))

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        req = rq.mkdir(self._node(parent_inode), name, mode, 0)
        return self._entry(await self.dev.call(req, _ctx(ctx)))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        req = rq.symlink(self._node(parent_inode), name, target)
        return self._entry(await self.dev.call(req, _ctx(ctx)))

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        req = rq.link(self._node(inode), self._node(new_parent_inode), new_name)
        return self._entry(await self.dev.call(req, _ctx(ctx)))

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.dev.call(rq.unlink(self._node(parent_inode), name), _ctx(ctx))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.dev.call(rq.rmdir(self._node(parent_inode), name), _ctx(ctx))

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        req = rq.rename(self._node(parent_inode_old), name_old, self._node(parent_inode_new),
                        name_new, flags)
        await self.dev.call(req, _ctx(ctx))

    async def statfs(self, ctx: Any) -> Any:
        out = await self.dev.call(rq.statfs(FUSE_ROOT_ID), _ctx(ctx))
        s = pyfuse3.StatvfsData()
        s.f_bsize = out.bsize
        s.f_frsize = out.frsize or out.bsize
        s.f_blocks = out.blocks
        s.f_bfree = out.bfree
        s.f_bavail = out.bavail
        s.f_files = out.files
        s.f_ffree = out.ffree
        s.f_favail = out.ffree
        s.f_namemax = out.namelen
        return s

    async def access(self, inode: int, mode: int, ctx: Any) -> None:
        # Only asked without default_permissions; answered by the daemon then.
        await self.dev.call(rq.access(self._node(inode), mode), _ctx(ctx))

    # -- extended attributes ------------------------------------------------------------------

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        nodeid = self._node(inode)
        caps = name == CAPS_XATTR
        if caps and self.no_caps.get(nodeid, 0.0) > time.monotonic():
            raise _fail(errno.ENODATA)
        try:
            size = (await self.dev.call(rq.getxattr(nodeid, name, 0), _ctx(ctx))).size
        except pyfuse3.FUSEError as exc:
            if caps and exc.errno == errno.ENODATA:
                self.no_caps[nodeid] = time.monotonic() + CAPS_CACHE_SECONDS
            raise
        if size == 0:
            return b""
        return await self.dev.call(rq.getxattr(nodeid, name, size), _ctx(ctx))

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        nodeid = self._node(inode)
        self.no_caps.pop(nodeid, None)
        await self.dev.call(rq.setxattr(nodeid, name, value, 0), _ctx(ctx))

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        nodeid = self._node(inode)
        size = (await self.dev.call(rq.listxattr(nodeid, 0), _ctx(ctx))).size
        if size == 0:
            return []
        return await self.dev.call(rq.listxattr(nodeid, size), _ctx(ctx))

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        nodeid = self._node(inode)
        self.no_caps.pop(nodeid, None)
        await self.dev.call(rq.removexattr(nodeid, name), _ctx(ctx))

    # -- files ------------------------------------------------------------------------------

    def _file_info(self, nodeid: int, ino: int, fh: int, flags: int, open_flags: int,
                   ctx: Any) -> Any:
        mine = self._new_fh()
        self.files[mine] = _File(nodeid, ino, fh, flags, privileged=ctx.uid == 0)
        # Never direct_io: the page cache makes mmap work.
        return pyfuse3.FileInfo(fh=mine, direct_io=False,
                                keep_cache=bool(open_flags & FOPEN_KEEP_CACHE))

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        nodeid = self._node(inode)
        out = await self.dev.call(rq.open(nodeid, flags), _ctx(ctx))
        if flags & os.O_TRUNC and ctx.uid != 0:
            await self._kill_setid(nodeid, inode, notify=True)
        return self._file_info(nodeid, inode, out.fh, flags, out.open_flags, ctx)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[Any, Any]:
        req = rq.create(self._node(parent_inode), name, flags, mode, 0)
        out = await self.dev.call(req, _ctx(ctx))
        entry = self._entry(out.entry)
        info = self._file_info(out.entry.nodeid, entry.st_ino, out.open.fh, flags,
                               out.open.open_flags, ctx)
        return info, entry

    def _opened(self, fh: int) -> _File:
        f = self.files.get(fh)
        if f is None:
            raise _fail(errno.EBADF)
        return f

    async def read(self, fh: int, off: int, size: int) -> bytes:
        f = self._opened(fh)
        flags = f.flags & 0xFFFFFFFF
        if size <= self.max_read:
            return await self.dev.call(rq.read(f.nodeid, f.fh, off, size, flags))
        chunks = []
        while size > 0:
            n = min(size, self.max_read)
            data = await self.dev.call(rq.read(f.nodeid, f.fh, off, n, flags))
            chunks.append(data)
            if len(data) < n:
                break
            off += n
            size -= n
        return b"".join(chunks)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        f = self._opened(fh)
        if not f.privileged and f.nodeid in self.modes:
            await self._kill_setid(f.nodeid, f.ino, notify=True)
        flags = f.flags & 0xFFFFFFFF
        view = memoryview(buf)
        done = 0
        while done < len(view):
            piece = view[done:done + self.max_write]
            out = await self.dev.call(rq.write(f.nodeid, f.fh, off + done, piece, flags))
            done += out.size
            if out.size < len(piece):
                break
        return done

    async def flush(self, fh: int) -> None:
        f = self._opened(fh)
        await self.dev.call(rq.flush(f.nodeid, f.fh))

    async def fsync(self, fh: int, datasync: bool) -> None:
        f = self._opened(fh)
        await self.dev.call(rq.fsync(f.nodeid, f.fh, datasync))

    async def release(self, fh: int) -> None:
        f = self.files.pop(fh, None)
        if f is not None:
            await self.dev.call(rq.release(f.nodeid, f.fh, f.flags & 0xFFFFFFFF))

    # -- directories --------------------------------------------------------------------------

    async def opendir(self, inode: int, ctx: Any) -> int:
        nodeid = self._node(inode)
        out = await self.dev.call(rq.opendir(nodeid), _ctx(ctx))
        mine = self._new_fh()
        self.dirs[mine] = _Dir(nodeid, inode, out.fh)
        return mine

    def _drop_buffer(self, d: _Dir) -> None:
        """Give back the lookups held by buffered entries the kernel never took."""
        self._forget_daemon([(e.entry.nodeid, 1) for e in d.buf[d.pos:] if e.entry.nodeid])
        d.buf = []
        d.pos = 0

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        d = self.dirs.get(fh)
        if d is None:
            raise _fail(errno.EBADF)
        if d.pos < len(d.buf) and d.resume != start_id:
            self._drop_buffer(d)  # the kernel seeked (rewinddir, telldir/seekdir)
        while True:
            if d.pos >= len(d.buf):
                d.buf = await self.dev.call(
                    rq.readdirplus(d.nodeid, d.fh, start_id, READDIR_BUFFER))
                d.pos = 0
                if not d.buf:
                    return
            e = d.buf[d.pos]
            name = e.dirent.name
            linked = e.entry.nodeid != 0 and name not in _DOTS
            if linked:
                ino = self._ino_for(e.entry.nodeid, e.entry.attr.ino)
                a = self._entry_attributes(e.entry, ino)
            else:
                # The kernel links no inode for "." and ".." (whatever their node id) nor
                # for entries without one: only the ino and the type are shown.
                a = pyfuse3.EntryAttributes()
                a.st_ino = d.ino if name == b"." else e.dirent.ino if name == b".." else 0
                a.st_mode = e.dirent.type << 12
            if not pyfuse3.readdir_reply(token, name, a, e.dirent.off):
                d.resume = start_id
                return
            if linked:
                self._count(ino, e.entry.nodeid)
            elif e.entry.nodeid:
                self._forget_daemon([(e.entry.nodeid, 1)])  # counted by the daemon only
            d.pos += 1
            start_id = e.dirent.off

    async def releasedir(self, fh: int) -> None:
        d = self.dirs.pop(fh, None)
        if d is not None:
            self._drop_buffer(d)
            await self.dev.call(rq.releasedir(d.nodeid, d.fh))

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        d = self.dirs.get(fh)
        if d is None:
            raise _fail(errno.EBADF)
        await self.dev.call(rq.fsyncdir(d.nodeid, d.fh, datasync))

    # -- shutdown ------------------------------------------------------------------------------

    async def give_back(self) -> None:
        """After unmount: release every handle still open and forget every lookup, so the
        share (which may live on in this process) holds nothing for us."""
        for fh in list(self.files):
            with contextlib.suppress(Exception):
                await self.release(fh)
        for fh in list(self.dirs):
            with contextlib.suppress(Exception):
                await self.releasedir(fh)
        self._forget_daemon([(self.k2n[ino], n) for ino, n in self.lookups.items()
                             if ino in self.k2n])
        self.lookups.clear()
        self.k2n = {pyfuse3.ROOT_INODE: FUSE_ROOT_ID}
        self.n2k = {FUSE_ROOT_ID: pyfuse3.ROOT_INODE}


def _guard(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn OSErrors into FUSEErrors and bugs into EIO: an exception escaping a handler
    would end pyfuse3's main loop, i.e. the whole mount."""

    async def handler(*args: Any) -> Any:
        try:
            return await fn(*args)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise _fail(exc.errno) from None
        except Exception:
            log.exception("FUSE %s failed", name)
            raise _fail(errno.EIO) from None

    handler.__name__ = name
    return handler


_GUARDED = ("lookup", "getattr", "setattr", "readlink", "mknod", "mkdir", "symlink", "link",
            "unlink", "rmdir", "rename", "statfs", "access", "getxattr", "setxattr",
            "listxattr", "removexattr", "open", "create", "read", "write", "flush", "fsync",
            "release", "opendir", "readdir", "releasedir", "fsyncdir", "forget")
if pyfuse3 is not None:
    for _name in _GUARDED:
        setattr(_Operations, _name, _guard(_name, getattr(_Operations, _name)))
    del _name


# -- mounting ------------------------------------------------------------------------------


def _limits(fs: Any) -> tuple[int, int]:
    """Read and write sizes the session negotiated with the daemon."""
    try:
        stats = fs.session.ask(m.SessionStats())
    except Exception:
        return 128 << 10, 128 << 10
    pages = stats.get("max_pages") or 32
    max_read = max(4096, min(pages * 4096, MAX_IO))
    max_write = max(4096, min(stats.get("max_write") or (128 << 10), MAX_IO))
    return max_read, max_write


def _mount_options(fs: Any, allow_other: bool, options: list[str] | tuple[str, ...]) -> set[str]:
    opts = {"default_permissions", "subtype=pyvirtiofs"}
    daemon = getattr(getattr(fs, "transport", None), "daemon", None)
    source = getattr(daemon, "shared_dir", None) or "virtiofs"
    opts.add("fsname=pyvirtiofs:" + source.replace(",", "_").replace("\\", "_"))
    if allow_other:
        if os.geteuid() != 0 and not _user_allow_other():
            raise PermissionError(errno.EPERM, "allow_other needs root or 'user_allow_other' "
                                  "in /etc/fuse.conf (or mount with allow_other=False)")
        opts.add("allow_other")
    for option in options:
        if option.split("=", 1)[0] in ("default_permissions", "nodefault_permissions"):
            continue  # not negotiable: see the module doc
        opts.add(option)
    return opts


def _user_allow_other() -> bool:
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except OSError:
        return False


class FuseMount:
    """A mount served by a background thread (``mount(..., foreground=False)``).

    ``unmount()`` (or leaving the ``with`` block) unmounts and waits for the thread."""

    def __init__(self, mountpoint: str) -> None:
        self.mountpoint = mountpoint
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._token: Any = None
        self._ready = threading.Event()

    @property
    def mounted(self) -> bool:
        return self.thread is not None and self.thread.is_alive() and self._token is not None

    def unmount(self, timeout: float = 30.0) -> None:
        if self.thread is None:
            return
        token = self._token
        if token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(_terminate)
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"FUSE mount on {self.mountpoint} did not stop")

    def wait(self, timeout: float | None = None) -> None:
        """Block until the mount ends (unmounted from outside, or :meth:`unmount`)."""
        if self.thread is not None:
            self.thread.join(timeout)

    def __enter__(self) -> FuseMount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def _terminate() -> None:
    with contextlib.suppress(Exception):
        pyfuse3.terminate()


async def _serve(fs: Any, mountpoint: str, options: set[str], handle_signals: bool,
                 started: Callable[[Any], None]) -> None:
    token = trio.lowlevel.current_trio_token()
    device = _Device(fs.device_client, token)
    ops = _Operations(device, *_limits(fs))
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as exc:  # libfuse has printed why on stderr
        raise OSError(errno.EIO, f"could not mount ({exc})", mountpoint) from None
    unmounted = False
    try:
        async with trio.open_nursery() as nursery:
            if handle_signals:
                nursery.start_soon(_watch_signals)
            started(token)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=True)
            unmounted = True
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await ops.give_back()
        log.info("unmounted %s%s", mountpoint, "" if unmounted else " (close failed)")


async def _watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            _terminate()
            return


def mount(fs: Any, mountpoint: str, *, allow_other: bool = True, foreground: bool = True,
          options: list[str] | tuple[str, ...] = (),
          on_ready: Callable[[], None] | None = None) -> FuseMount | None:
    """Mount the share ``fs`` (an in-process :class:`~pyvirtiofs.api.local.VirtioFS`) on
    ``mountpoint``.

    ``foreground``: serve in this thread until unmounted (``fusermount3 -u``/``umount``) or,
    in the main thread, until SIGINT/SIGTERM/SIGHUP — the mount is then removed cleanly —
    and return None. Otherwise serve from a background thread and return a
    :class:`FuseMount` once the mount is up. ``allow_other``: let every user in (their
    requests carry their own credentials; permissions are checked by the kernel as on
    ext4). ``options``: more mount options (``ro``, ``suid``, ``dev``, …; libfuse mounts
    ``nosuid,nodev`` unless told otherwise). ``on_ready`` is called once mounted.
    """
    _require_pyfuse3()
    if getattr(fs, "device", None) is None:
        raise OSError(errno.EOPNOTSUPP, "a FUSE mount needs an in-process share "
                      "(api.connect(DIR) or connect(socket=...)), not a remote one")
    mountpoint = os.path.abspath(mountpoint)
    if not os.path.isdir(mountpoint):
        raise NotADirectoryError(errno.ENOTDIR, "mount point is not a directory", mountpoint)
    opts = _mount_options(fs, allow_other, options)
    if not _mount_lock.acquire(blocking=False):
        raise OSError(errno.EBUSY, "this process already serves a FUSE mount (pyfuse3 "
                      "allows one per process)", mountpoint)
    if foreground:
        try:
            handle_signals = threading.current_thread() is threading.main_thread()
            trio.run(_serve, fs, mountpoint, opts, handle_signals,
                     lambda token: on_ready() if on_ready is not None else None)
        finally:
            _mount_lock.release()
        return None

    handle = FuseMount(mountpoint)

    def started(token: Any) -> None:
        handle._token = token
        handle._ready.set()
        if on_ready is not None:
            on_ready()

    def run() -> None:
        try:
            trio.run(_serve, fs, mountpoint, opts, False, started)
        except BaseException as exc:
            handle.error = exc
            log.error("FUSE mount on %s failed: %s", mountpoint, exc)
        finally:
            handle._token = None
            _mount_lock.release()
            handle._ready.set()

    handle.thread = threading.Thread(target=run, name=f"fuse:{mountpoint}", daemon=True)
    handle.thread.start()
    handle._ready.wait()
    if handle.error is not None:
        raise handle.error
    return handle


# -- command line ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``pyvirtiofs mount`` arguments (for :func:`cmd_mount`)."""
    parser.add_argument("share", metavar="SHARE",
                        help="folder to share (a private virtiofsd is started on it)")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="empty directory to mount on")
    parser.add_argument("-b", "--background", action="store_true",
                        help="return once mounted and keep serving in the background "
                             "(unmount with: fusermount3 -u MOUNTPOINT)")
    parser.add_argument("--no-allow-other", dest="allow_other", action="store_false",
                        help="only the mounting user may use the mount (default: every "
                             "user, each with their own permissions)")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT]",
                        help="more mount options, e.g. ro, suid, dev")


def cmd_mount(args: argparse.Namespace) -> int:
    """``pyvirtiofs mount SHARE MOUNTPOINT``: serve until unmounted or Ctrl-C/SIGTERM."""
    _require_pyfuse3()
    share: str = args.share
    if share.startswith(("tcp://", "ipc://")):
        raise OSError(errno.EOPNOTSUPP, "mounting a remote share is not supported yet; "
                      "mount the folder on the server's machine", share)
    if not os.path.isdir(share):
        raise NotADirectoryError(errno.ENOTDIR, "no such folder to share", share)
    if not os.path.isdir(args.mountpoint):
        raise NotADirectoryError(errno.ENOTDIR, "mount point is not a directory",
                                 args.mountpoint)
    options = [o for opt in getattr(args, "options", []) or [] for o in opt.split(",") if o]
    allow_other = getattr(args, "allow_other", True)
    if getattr(args, "background", False):
        return _background(share, args.mountpoint, allow_other, options)
    from pyvirtiofs.api.local import connect

    with connect(os.path.abspath(share)) as fs:
        mount(fs, args.mountpoint, allow_other=allow_other, foreground=True, options=options)
    return 0


def _background(share: str, mountpoint: str, allow_other: bool, options: list[str]) -> int:
    """Fork before any thread exists; the parent returns when the child has mounted."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read().decode(errors="replace")
        if report == "ok":
            return 0
        os.waitpid(pid, 0)
        raise OSError(errno.EIO, report or "the mount process died", mountpoint)
    code = 1
    try:
        os.close(read_end)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)

        def ready() -> None:
            os.write(write_end, b"ok")
            os.close(write_end)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)

        from pyvirtiofs.api.local import connect

        with connect(os.path.abspath(share)) as fs:
            mount(fs, mountpoint, allow_other=allow_other, foreground=True, options=options,
                  on_ready=ready)
        code = 0
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(write_end, str(exc).encode())
    finally:
        os._exit(code)
