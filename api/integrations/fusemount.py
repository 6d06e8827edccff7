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
passthrough*. Each kernel request becomes the same FUSE request to the daemon, submitted
through the share's :class:`~pyvirtiofs.actors.device_client.DeviceClient`, and carries the
kernel request's ``(uid, gid, pid)`` as its credentials (exactly what
``fs.as_user(uid, gid, pid)`` puts on a message). No path is ever re-resolved, so rename,
unlink-while-open, hard links and ``..`` cost nothing extra and cannot go stale.

* **The way of a request.** pyfuse3 reads the kernel's request on the trio thread and runs
  its handler as a trio task; the handler submits the FUSE request to the device, which
  places it in the ring and kicks from this same thread (the device is an inline actor:
  no hand-off on the way in). The device's interrupt thread harvests the reply and runs
  the future's callback, which queues the parked task and, once per batch of completions,
  asks trio to run them (one wake-up of the trio thread for all the replies of a
  harvest). The task then replies to the kernel. Each handler is its own task (pyfuse3
  starts more readers while handlers wait), so slow requests overlap; nothing here holds
  a lock across a request. Reads and writes larger than the daemon's limit go out as
  several requests at once.
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

Caches (what the kernel's own virtio-fs client does with ``cache=auto``)
-----------------------------------------------------------------------
* **Entries and attributes** are cached by the kernel for the timeouts the daemon puts in
  each reply (virtiofsd ``cache=auto``: 1 s); we pass them on unchanged.
* **File data: keep the page cache of an unchanged file.** No ``direct_io`` (the page cache
  makes mmap work). At each OPEN we compare the file's ``(mtime, size, ctime)`` with what
  they were at its previous open: unchanged, the kernel keeps the pages it has
  (``keep_cache``); changed, or never opened, it drops them. The attributes used are the
  newest the daemon gave us for the node if they are still within their timeout, else a
  GETATTR sent together with the OPEN — libfuse's ``auto_cache`` rule. The daemon's own
  FOPEN_KEEP_CACHE is honoured as well. Writes through the mount keep the page cache
  coherent themselves (no writeback cache: every write goes to the daemon before
  ``write(2)`` returns). A change made on the host behind the mount is seen at the next
  open once the attributes the kernel and we hold have expired (the daemon's attribute
  timeout), and by any read after the kernel refreshes them (libfuse's default
  ``auto_inval_data``: the kernel drops the pages when it sees a new mtime or size) — the
  same bound ``cache=auto`` gives attributes. Writeback caching is not used: it makes the
  kernel the authority on size and mtime, which a share changed from the host contradicts.
* **Extended attributes without a request per entry.** ``ls -l`` asks every entry for
  ``security.selinux`` and ``system.posix_acl_access``, and the kernel asks for
  ``security.capability`` before every write; almost always the answer is "none". We
  remember, per node, the list of its xattr names (one LISTXATTR answers every later
  question about ``security.*`` and ``system.posix_acl_*`` names, which Linux always lists
  when present) and the names the daemon answered ENODATA for, and answer "no such
  attribute" (ENODATA) from that; a name that exists is always read from the daemon. What
  we know is stamped with the node's ctime when we asked, and is used while the newest
  attributes we have for the node are within their timeout and show that same ctime
  (every change of an xattr — ACLs are xattrs — changes the ctime), or for at most the
  daemon's attribute timeout after we asked (``cache=auto``'s bound on everything the
  kernel caches; it covers a file this mount is writing, whose ctime moves with every
  write). A name can only appear through SETXATTR — through the mount we forget what we
  knew of the node at once; on the host it is seen within that bound — or when a file is
  created (a new file has no file capabilities: that much is known at CREATE). LISTXATTR
  is answered from memory only under the ctime rule. ACLs keep working: the daemon stores
  and returns them, and the kernel checks access with the mode bits (no FUSE_POSIX_ACL:
  with it the kernel would send a GETXATTR for the ACL after every attribute refresh —
  the same storm).
* **Request deadlines.** Every request the daemon does not answer within the share's
  request timeout fails with ETIMEDOUT: the device keeps the deadline and abandons it.

Not supported: a remote (``tcp://``) share — a node-level passthrough needs the device
actor in this process; ``connect(..., restart=True)`` shares (a restarted daemon invalidates
every kernel inode: requests then fail with ENOTCONN/ESTALE); POSIX ACLs in the kernel's
permission checks (they are stored and returned, but the kernel checks the mode bits);
supplementary groups are not sent to the daemon (FUSE 7.36 has no field for them), so
creating a file in a directory writable only through a supplementary group fails with
EACCES. pyfuse3 keeps global state: one mount per process.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import logging
import os
import signal
import stat as stat_mod
import threading
import time
from collections.abc import Callable, Sequence
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
XATTR_MAX = 65536  # the largest value or name list Linux allows: one request is enough
# Names Linux always lists when a file has them: a LISTXATTR without one proves it absent.
LISTED_PREFIXES = (b"security.", b"system.posix_acl_")
NO_CAPS = frozenset({b"security.capability"})  # a new file never has file capabilities
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


class _Waiter:
    """A trio task parked until a set of device futures has completed."""

    __slots__ = ("device", "futures", "parked", "task")

    def __init__(self, device: _Device, futures: Sequence[Future[Any]]) -> None:
        self.device = device
        self.futures = futures
        self.parked = False
        self.task: Any = None

    def __call__(self, _: Future[Any]) -> None:
        """A future's callback: on the device's thread (or at once, if already done)."""
        for f in self.futures:
            if not f.done():
                return
        self.device.ready(self)


class _Device:
    """Sends FUSE requests to the share's device from trio tasks (see the module doc).

    Completions arrive on the device's interrupt thread: the waiters they finish are queued
    and the trio thread is woken once per batch (``run_sync_soon`` when the queue was
    empty). Deadlines are the device's: a request the daemon does not answer in the
    client's timeout fails with ETIMEDOUT there (and is abandoned)."""

    def __init__(self, client: DeviceClient, token: Any) -> None:
        self.client = client
        self.token = token
        self._ready: collections.deque[_Waiter] = collections.deque()
        self._scheduled = False
        self.submitted = 0

    # -- completions ---------------------------------------------------------------------

    def ready(self, waiter: _Waiter) -> None:  # any thread
        self._ready.append(waiter)
        if not self._scheduled:
            self._scheduled = True
            try:
                self.token.run_sync_soon(self._resume)
            except trio.RunFinishedError:
                pass

    def _resume(self) -> None:  # the trio thread
        # Cleared before draining: a waiter queued after the last pop schedules a new run.
        self._scheduled = False
        ready = self._ready
        while ready:
            waiter = ready.popleft()
            if waiter.parked:
                waiter.parked = False
                trio.lowlevel.reschedule(waiter.task)

    async def wait(self, futures: Sequence[Future[Any]]) -> None:
        """Until every future in ``futures`` is done (their callbacks are set here)."""
        waiter = _Waiter(self, futures)
        for f in futures:
            f.add_done_callback(waiter)
        while not all(f.done() for f in futures):
            waiter.parked = True
            waiter.task = trio.lowlevel.current_task()

            def abort(_: Any) -> Any:
                waiter.parked = False
                for f in futures:
                    if not f.done():
                        self.client.abandon(f, wait=False)
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)

    # -- requests -------------------------------------------------------------------------

    def submit(self, request: Any, ctx: m.Credentials | None = None,
               sink: Any = None) -> Future[Any]:
        future = self.client.submit(request, ctx=ctx, sink=sink)
        self.submitted += 1
        return future

    async def call(self, request: Any, ctx: m.Credentials | None = None) -> Any:
        future = self.submit(request, ctx)
        if not future.done():
            await self.wait((future,))
        return _result(future)

    def forget(self, items: list[tuple[int, int]]) -> None:
        """FORGET / BATCH_FORGET (the daemon sends no reply)."""
        self.client.forget(items)


def _result(future: Future[Any]) -> Any:
    value, error = future.result_or_error()
    if error is not None:
        raise _fail(getattr(error, "errno", None)) from None
    return value


# -- the operations --------------------------------------------------------------------------


@dataclass(slots=True)
class _Xattrs:
    """What we know of one node's xattrs: learned when its ctime was ``ctime``, and good
    for absent names until ``until`` whatever the ctime does (see the module doc)."""

    ctime: int
    until: float
    names: frozenset[bytes] | None = None  # the whole list, when a LISTXATTR told us
    absent: set[bytes] = field(default_factory=set)  # answered ENODATA

    def lacks(self, name: bytes) -> bool:
        if name in self.absent:
            return True
        return (self.names is not None and name not in self.names
                and name.startswith(LISTED_PREFIXES))


@dataclass(slots=True)
class _Node:
    """A daemon node the kernel holds (by its ino), and what we know of it."""

    nodeid: int
    lookups: int = 0
    mode: int = 0
    mtime: int = 0
    size: int = 0
    ctime: int = 0
    fresh_until: float = 0.0  # monotonic time until which these attributes are current
    valid: float = 0.0  # the daemon's attribute timeout in its last reply, seconds
    xattrs: _Xattrs | None = None
    xattr_gen: int = 0  # bumped by every SETXATTR/REMOVEXATTR through the mount
    cached: tuple[int, int, int] | None = None  # (mtime, size, ctime) at the last open

    def saw(self, attr: Attr, valid: float) -> None:
        self.mode = attr.mode
        self.mtime = attr.mtime_ns
        self.size = attr.size
        self.ctime = attr.ctime_ns
        self.valid = valid
        self.fresh_until = time.monotonic() + valid

    def fresh(self) -> bool:
        return self.fresh_until > time.monotonic()

    def known_xattrs(self, *, strict: bool = False) -> _Xattrs | None:
        """What we know that is still good: for absent names, or (``strict``) for the
        whole list."""
        x = self.xattrs
        if x is None:
            return None
        now = time.monotonic()
        if x.ctime == self.ctime and self.fresh_until > now:
            return x
        return x if not strict and x.until > now else None

    def knowing(self, ctime: int) -> _Xattrs:
        """A fresh record of what we know, learned at ``ctime`` (now)."""
        return _Xattrs(ctime, time.monotonic() + self.valid)


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
    end: int = -1  # the offset at which the daemon last answered "no more entries"


def _ctx(ctx: Any) -> m.Credentials:
    return (ctx.uid, ctx.gid, ctx.pid)


def _valid(seconds: int, nsec: int) -> float:
    return seconds + nsec / 1e9


def _setid_bits(mode: int) -> int:
    """The set-id bits ext4 clears when a non-privileged writer changes a file."""
    if not stat_mod.S_ISREG(mode):
        return 0
    bits = mode & stat_mod.S_ISUID
    if mode & stat_mod.S_ISGID and mode & stat_mod.S_IXGRP:
        bits |= stat_mod.S_ISGID
    return bits


def _pieces(off: int, size: int, limit: int) -> list[tuple[int, int]]:
    """(offset, length) pieces of at most ``limit`` bytes covering ``size`` bytes."""
    return [(off + at, min(limit, size - at)) for at in range(0, size, limit)]


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
        self.nodes: dict[int, _Node] = {pyfuse3.ROOT_INODE: _Node(FUSE_ROOT_ID, lookups=1)}
        self.n2k: dict[int, int] = {FUSE_ROOT_ID: pyfuse3.ROOT_INODE}
        self.files: dict[int, _File] = {}
        self.dirs: dict[int, _Dir] = {}
        self._next_fh = 1
        self.kernel: collections.Counter[str] = collections.Counter()  # requests, by op
        self.local: collections.Counter[str] = collections.Counter()  # answered here

    def stats(self) -> dict[str, Any]:
        return {"kernel": dict(self.kernel), "local": dict(self.local),
                "nodes": len(self.nodes), "files": len(self.files), "dirs": len(self.dirs)}

    # -- inode table -------------------------------------------------------------------------

    def _get(self, ino: int) -> _Node:
        node = self.nodes.get(ino)
        if node is None:
            raise _fail(errno.ESTALE)
        return node

    def _ino_for(self, nodeid: int, host_ino: int) -> int:
        """The kernel ino for ``nodeid`` (existing, or the one it would get)."""
        ino = self.n2k.get(nodeid)
        if ino is not None:
            return ino
        if (host_ino <= pyfuse3.ROOT_INODE or host_ino >= SYNTHETIC_INO
                or host_ino in self.nodes):
            return SYNTHETIC_INO | nodeid
        return host_ino

    def _link(self, ino: int, e: EntryOut) -> _Node:
        """The kernel took one lookup of ``ino`` (= one the daemon counted on the node)."""
        node = self.nodes.get(ino)
        if node is None:
            node = self.nodes[ino] = _Node(e.nodeid)
            self.n2k[e.nodeid] = ino
        node.lookups += 1
        node.saw(e.attr, _valid(e.attr_valid, e.attr_valid_nsec))
        return node

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

    def _attr_reply(self, node: _Node, ino: int, out: AttrOut) -> Any:
        valid = _valid(out.attr_valid, out.attr_valid_nsec)
        node.saw(out.attr, valid)
        return self._attributes(out.attr, ino, valid)

    def _entry(self, e: EntryOut) -> Any:
        """An entry reply: count the lookup it carries and build the kernel's entry."""
        ino = self._ino_for(e.nodeid, e.attr.ino)
        self._link(ino, e)
        return self._entry_attributes(e, ino)

    def _entry_attributes(self, e: EntryOut, ino: int) -> Any:
        a = self._attributes(e.attr, ino, _valid(e.attr_valid, e.attr_valid_nsec))
        a.generation = e.generation
        a.entry_timeout = _valid(e.entry_valid, e.entry_valid_nsec)
        return a

    def _new_entry(self, e: EntryOut) -> Any:
        """An entry the daemon has just created: it has no file capabilities yet."""
        a = self._entry(e)
        node = self.nodes[a.st_ino]
        node.xattrs = node.knowing(node.ctime)
        node.xattrs.absent.update(NO_CAPS)
        return a

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        items: list[tuple[int, int]] = []
        for ino, n in inode_list:
            node = self.nodes.get(ino)
            if node is None or ino == pyfuse3.ROOT_INODE:
                continue
            node.lookups -= n
            if node.lookups <= 0:
                del self.nodes[ino]
                self.n2k.pop(node.nodeid, None)
            items.append((node.nodeid, n))
        self.dev.forget(items)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    # -- set-id bits (see module doc) -------------------------------------------------------

    async def _kill_setid(self, node: _Node, ino: int, notify: bool) -> AttrOut | None:
        bits = _setid_bits(node.mode)
        if not bits:
            return None
        out: AttrOut = await self.dev.call(rq.setattr(node.nodeid,
                                                      mode=node.mode & 0o7777 & ~bits))
        node.saw(out.attr, _valid(out.attr_valid, out.attr_valid_nsec))
        if notify:
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(ino, attr_only=True)
        return out

    # -- metadata -----------------------------------------------------------------------------

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> Any:
        parent = self._get(parent_inode)
        e: EntryOut = await self.dev.call(rq.lookup(parent.nodeid, name), _ctx(ctx))
        if e.nodeid == 0:  # a negative entry, cacheable for entry_valid
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0
            a.entry_timeout = _valid(e.entry_valid, e.entry_valid_nsec)
            return a
        return self._entry(e)

    async def getattr(self, inode: int, ctx: Any) -> Any:
        node = self._get(inode)
        return self._attr_reply(node, inode, await self.dev.call(rq.getattr(node.nodeid),
                                                                  _ctx(ctx)))

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: int | None,
                      ctx: Any) -> Any:
        node = self._get(inode)
        kwargs: dict[str, Any] = {}
        opened = self.files.get(fh) if fh is not None else None
        if opened is not None:
            kwargs["fh"] = opened.fh
        if fields.update_size:
            kwargs["size"] = attr.st_size
        if fields.update_mode:
            kwargs["mode"] = attr.st_mode & 0o7777
        elif fields.update_size and ctx.uid != 0:
            bits = _setid_bits(node.mode)
            if bits:  # truncate(2) by an unprivileged caller clears set-id bits on ext4
                kwargs["mode"] = node.mode & 0o7777 & ~bits
        if fields.update_uid:
            kwargs["uid"] = attr.st_uid
        if fields.update_gid:
            kwargs["gid"] = attr.st_gid
        if fields.update_atime:
            kwargs["atime"] = divmod(attr.st_atime_ns, 1_000_000_000)
        if fields.update_mtime:
            kwargs["mtime"] = divmod(attr.st_mtime_ns, 1_000_000_000)
        if set(kwargs) <= {"fh"}:
            out = await self.dev.call(rq.getattr(node.nodeid), _ctx(ctx))
        else:
            out = await self.dev.call(rq.setattr(node.nodeid, **kwargs), _ctx(ctx))
        return self._attr_reply(node, inode, out)

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return await self.dev.call(rq.readlink(self._get(inode).nodeid), _ctx(ctx))

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: Any) -> Any:
        # The kernel has applied the umask already (no FUSE_DONT_MASK): send 0.
        req = rq.mknod(self._get(parent_inode).nodeid, name, mode, rdev, 0)
        return self._new_entry(await self.dev.call(req, _ctx(ctx)))

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> Any:
        req = rq.mkdir(self._get(parent_inode).nodeid, name, mode, 0)
        return self._new_entry(await self.dev.call(req, _ctx(ctx)))

    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        req = rq.symlink(self._get(parent_inode).nodeid, name, target)
        return self._entry(await self.dev.call(req, _ctx(ctx)))

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        req = rq.link(self._get(inode).nodeid, self._get(new_parent_inode).nodeid, new_name)
        return self._entry(await self.dev.call(req, _ctx(ctx)))

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.dev.call(rq.unlink(self._get(parent_inode).nodeid, name), _ctx(ctx))

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        await self.dev.call(rq.rmdir(self._get(parent_inode).nodeid, name), _ctx(ctx))

    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        req = rq.rename(self._get(parent_inode_old).nodeid, name_old,
                        self._get(parent_inode_new).nodeid, name_new, flags)
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
        await self.dev.call(rq.access(self._get(inode).nodeid, mode), _ctx(ctx))

    # -- extended attributes (see "Caches" in the module doc) --------------------------------

    async def _learn_xattrs(self, node: _Node, ctx: Any) -> _Xattrs | None:
        """One LISTXATTR: the node's names, remembered under the ctime we had before
        asking (a change racing with the question then retires the answer at once)."""
        ctime, gen = node.ctime, node.xattr_gen
        try:
            names = await self.dev.call(rq.listxattr(node.nodeid, XATTR_MAX), _ctx(ctx))
        except pyfuse3.FUSEError:
            return None  # no list (not supported, too long): ask for the name itself
        known = node.knowing(ctime)
        known.names = frozenset(names)
        if gen == node.xattr_gen:
            node.xattrs = known
        return known

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        node = self._get(inode)
        known = node.known_xattrs()
        if (name.startswith(LISTED_PREFIXES) and (known is None or known.names is None)
                and not (known is not None and name in known.absent)):
            known = await self._learn_xattrs(node, ctx) or known
        if known is not None and known.lacks(name):
            self.local["getxattr"] += 1
            raise _fail(errno.ENODATA)
        ctime, gen = node.ctime, node.xattr_gen
        try:
            return await self.dev.call(rq.getxattr(node.nodeid, name, XATTR_MAX), _ctx(ctx))
        except pyfuse3.FUSEError as exc:
            if exc.errno == errno.ENODATA and gen == node.xattr_gen:
                x = node.xattrs
                if x is None or x.ctime != ctime:
                    x = node.xattrs = node.knowing(ctime)
                x.absent.add(name)
            raise

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        node = self._get(inode)
        node.xattrs = None
        node.xattr_gen += 1
        try:
            await self.dev.call(rq.setxattr(node.nodeid, name, value, 0), _ctx(ctx))
        finally:
            node.xattrs = None
            node.xattr_gen += 1

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        node = self._get(inode)
        known = node.known_xattrs(strict=True)
        if known is not None and known.names is not None:
            self.local["listxattr"] += 1
            return list(known.names)
        known = await self._learn_xattrs(node, ctx)
        if known is not None and known.names is not None:
            return list(known.names)
        return await self.dev.call(rq.listxattr(node.nodeid, XATTR_MAX), _ctx(ctx))

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        node = self._get(inode)
        node.xattrs = None
        node.xattr_gen += 1
        try:
            await self.dev.call(rq.removexattr(node.nodeid, name), _ctx(ctx))
        finally:
            node.xattrs = None
            node.xattr_gen += 1

    # -- files ------------------------------------------------------------------------------

    def _file_info(self, nodeid: int, ino: int, fh: int, flags: int, keep: bool,
                   ctx: Any) -> Any:
        mine = self._new_fh()
        self.files[mine] = _File(nodeid, ino, fh, flags, privileged=ctx.uid == 0)
        # Never direct_io: the page cache makes mmap work.
        return pyfuse3.FileInfo(fh=mine, direct_io=False, keep_cache=keep)

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        node = self._get(inode)
        if node.fresh():
            out = await self.dev.call(rq.open(node.nodeid, flags), _ctx(ctx))
        else:  # attributes to compare with: asked for together with the OPEN
            opened = self.dev.submit(rq.open(node.nodeid, flags), _ctx(ctx))
            attrs = self.dev.submit(rq.getattr(node.nodeid), _ctx(ctx))
            await self.dev.wait((opened, attrs))
            out = _result(opened)
            value, error = attrs.result_or_error()
            if error is None:
                node.saw(value.attr, _valid(value.attr_valid, value.attr_valid_nsec))
        version = (node.mtime, node.size, node.ctime)
        keep = version == node.cached or bool(out.open_flags & FOPEN_KEEP_CACHE)
        node.cached = version
        if flags & os.O_TRUNC and ctx.uid != 0:
            await self._kill_setid(node, inode, notify=True)
        return self._file_info(node.nodeid, inode, out.fh, flags, keep, ctx)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[Any, Any]:
        req = rq.create(self._get(parent_inode).nodeid, name, flags, mode, 0)
        out = await self.dev.call(req, _ctx(ctx))
        entry = self._new_entry(out.entry)
        node = self.nodes[entry.st_ino]
        node.cached = (node.mtime, node.size, node.ctime)  # its pages are all ours
        info = self._file_info(out.entry.nodeid, entry.st_ino, out.open.fh, flags,
                               bool(out.open.open_flags & FOPEN_KEEP_CACHE), ctx)
        return info, entry

    def _opened(self, fh: int) -> _File:
        f = self.files.get(fh)
        if f is None:
            raise _fail(errno.EBADF)
        return f

    async def read(self, fh: int, off: int, size: int) -> Any:
        f = self._opened(fh)
        flags = f.flags & 0xFFFFFFFF
        if size <= self.max_read:
            return await self.dev.call(rq.read(f.nodeid, f.fh, off, size, flags))
        # Larger than the daemon takes in one request: all the pieces at once, each landing
        # in its place in one buffer.
        buf = bytearray(size)
        view = memoryview(buf)
        pieces = _pieces(off, size, self.max_read)
        futures = [self.dev.submit(rq.read(f.nodeid, f.fh, at, n, flags),
                                   sink=view[at - off:at - off + n]) for at, n in pieces]
        await self.dev.wait(futures)
        total = 0
        for (_, n), future in zip(pieces, futures, strict=True):
            got = _result(future)
            total += got
            if got < n:
                break  # end of file: what follows is not contiguous
        return view[:total]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        f = self._opened(fh)
        node = self.nodes.get(f.ino)
        if not f.privileged and node is not None and node.nodeid == f.nodeid:
            await self._kill_setid(node, f.ino, notify=True)
        flags = f.flags & 0xFFFFFFFF
        if node is not None:
            # Its mtime, size and ctime are moving: what we hold for them is no version to
            # compare the page cache with any more (the next open asks the daemon).
            node.fresh_until = 0.0
        if len(buf) <= self.max_write:
            return (await self.dev.call(rq.write(f.nodeid, f.fh, off, buf, flags))).size
        view = memoryview(buf)
        pieces = _pieces(off, len(buf), self.max_write)
        futures = [self.dev.submit(rq.write(f.nodeid, f.fh, at, view[at - off:at - off + n],
                                            flags)) for at, n in pieces]
        await self.dev.wait(futures)
        done = 0
        for (_, n), future in zip(pieces, futures, strict=True):
            wrote = _result(future).size
            done += wrote
            if wrote < n:
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
        node = self._get(inode)
        out = await self.dev.call(rq.opendir(node.nodeid), _ctx(ctx))
        mine = self._new_fh()
        self.dirs[mine] = _Dir(node.nodeid, inode, out.fh)
        return mine

    def _drop_buffer(self, d: _Dir) -> None:
        """Give back the lookups held by buffered entries the kernel never took."""
        self.dev.forget([(e.entry.nodeid, 1) for e in d.buf[d.pos:] if e.entry.nodeid])
        d.buf = []
        d.pos = 0

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        d = self.dirs.get(fh)
        if d is None:
            raise _fail(errno.EBADF)
        if d.pos < len(d.buf) and d.resume != start_id:
            self._drop_buffer(d)  # the kernel seeked (rewinddir, telldir/seekdir)
        reply = pyfuse3.readdir_reply
        while True:
            if d.pos >= len(d.buf):
                if start_id == d.end:
                    # The daemon said "no more" at this offset while filling the kernel's
                    # previous buffer: the kernel's call to confirm it needs no request.
                    d.end = -1
                    return
                d.buf = await self.dev.call(
                    rq.readdirplus(d.nodeid, d.fh, start_id, READDIR_BUFFER))
                d.pos = 0
                if not d.buf:
                    d.end = start_id
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
            if not reply(token, name, a, e.dirent.off):
                d.resume = start_id
                return
            if linked:
                self._link(ino, e.entry)
            elif e.entry.nodeid:
                self.dev.forget([(e.entry.nodeid, 1)])  # counted by the daemon only
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
        self.dev.forget([(node.nodeid, node.lookups) for ino, node in self.nodes.items()
                         if ino != pyfuse3.ROOT_INODE and node.lookups > 0])
        self.nodes = {pyfuse3.ROOT_INODE: self.nodes[pyfuse3.ROOT_INODE]}
        self.n2k = {FUSE_ROOT_ID: pyfuse3.ROOT_INODE}


def _guard(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn OSErrors into FUSEErrors and bugs into EIO (an exception escaping a handler
    would end pyfuse3's main loop, i.e. the whole mount); count the kernel's requests."""

    async def handler(self: _Operations, *args: Any) -> Any:
        self.kernel[name] += 1
        try:
            return await fn(self, *args)
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
        self._ops: _Operations | None = None

    def stats(self) -> dict[str, Any]:
        """The kernel's requests by operation (``kernel``), those answered without the
        daemon (``local``), and the nodes and handles the kernel holds. Read from another
        thread: a snapshot, not a transaction."""
        ops = self._ops
        return {} if ops is None else ops.stats()

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
                 started: Callable[[Any, _Operations], None]) -> None:
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
            started(token, ops)
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
                     lambda token, ops: on_ready() if on_ready is not None else None)
        finally:
            _mount_lock.release()
        return None

    handle = FuseMount(mountpoint)

    def started(token: Any, ops: _Operations) -> None:
        handle._token = token
        handle._ops = ops
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
