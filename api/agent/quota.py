"""A tenant's byte quota (``limits.max_bytes``): how much of the disk its root may use.

**What is measured.** Usage is the space the tenant's files take on the host's disk: the
sum of ``st_blocks × 512`` over every inode under the tenant's root (a hard-linked file
once), measured by walking the root when the share starts, then kept up to date from
what the tenant's own requests change. Sparse files count what they hold, not their
length. Changes made on the host behind the agent's back are picked up at the next start
(or reload that restarts the share).

**What is refused.** With ``EDQUOT``, as a kernel with disk quotas does, a request that
could take more than what is left:

* ``Write``: its length (rounded up to 4 KiB blocks, plus one block for the file's own
  bookkeeping) — an overwrite in place takes nothing in the end, but is checked as if it
  could;
* ``FAllocate``: its length, likewise (punching a hole takes nothing);
* ``FTruncate``/``SetAttr(size)``: a file may not grow (in length) by more than what is
  left — a truncate allocates nothing itself, but the length is what a tenant could then
  fill without further checks;
* creating anything (``Open`` with ``O_CREAT``, ``MakeDir``, ``MakeNode``, ``Symlink``,
  ``Link``): one block.

**Under concurrency.** Every admitted request *reserves* its bound before it runs, and the
check is against ``used + reserved``, so requests in flight together can never take more
than the quota between them. When one completes, its reservation is returned and the
space it really took is learnt from the inode's attributes (a ``FStat`` on the same handle
after a write; the attributes a create or ``SetAttr`` returns); each inode's last known
block count (ordered by its ``ctime``) makes successive changes add up exactly. Removing
(``Unlink``, ``RemoveDir``, ``Rename`` over a file) is preceded by a ``Stat`` of what goes,
and frees its blocks when it was the inode's last name. Space freed by deleting a file
that is still open is counted as freed at once.

All of this runs in the server thread or the device's threads without waiting: each step
is a callback on the previous one's future, and the books are guarded by one lock that is
never held while anything is awaited.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
import threading
from collections import OrderedDict
from typing import Any

from pyvirtiofs.actors import messages as m
from pyvirtiofs.actors.runtime import Future, failed

log = logging.getLogger("pyvirtiofs.agent")

BLOCK = 4096
_MAX_KNOWN = 100_000  # inodes whose block counts are remembered (least recent forgotten)
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_COLLAPSE_RANGE = 0x08
_CREATES = (m.MakeDir, m.MakeNode, m.Symlink, m.Link)
_REMOVES = (m.Unlink, m.RemoveDir)


def _round(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def measure(root: str) -> int:
    """Bytes allocated under ``root`` (hard links once; the root itself included)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(st: os.stat_result) -> None:
        nonlocal total
        key = (st.st_dev, st.st_ino)
        if key not in seen:
            seen.add(key)
            total += st.st_blocks * 512

    add(os.lstat(root))
    for top, dirs, files in os.walk(root, onerror=lambda exc: None):
        for name in dirs + files:
            try:
                add(os.lstat(os.path.join(top, name)))
            except OSError:
                continue
    return total


def _ctime(attr: Any) -> tuple[int, int]:
    return (attr.ctime, attr.ctimensec)


class Quota:
    """The books of one tenant's quota (see the module's doc)."""

    def __init__(self, limit: int, used: int) -> None:
        self.limit = limit
        self.used = used
        self.reserved = 0
        self.refused = 0
        self._known: OrderedDict[int, tuple[int, tuple[int, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"max_bytes": self.limit, "used_bytes": self.used,
                    "reserved_bytes": self.reserved}

    # -- the books --------------------------------------------------------------------------

    def reserve(self, amount: int, what: str) -> None:
        """Reserve ``amount`` bytes or raise OSError(EDQUOT)."""
        with self._lock:
            if amount and self.used + self.reserved + amount > self.limit:
                self.refused += 1
                raise OSError(errno.EDQUOT, f"disk quota exceeded ({what}: {self.used} of "
                                            f"{self.limit} bytes used)")
            self.reserved += amount

    def release(self, amount: int) -> None:
        with self._lock:
            self.reserved -= amount

    def left(self) -> int:
        with self._lock:
            return self.limit - self.used - self.reserved

    def observe(self, attr: Any, *, new: bool = False) -> None:
        """Learn an inode's current allocation. ``new``: it was just created (its blocks
        are not in the books yet); otherwise a first sighting is already counted."""
        if attr is None:
            return
        blocks = attr.blocks * 512
        with self._lock:
            known = self._known.get(attr.ino)
            if known is None:
                if new:
                    self.used += blocks
            elif _ctime(attr) >= known[1]:
                self.used += blocks - known[0]
            else:
                return  # an older view than the one we have
            self._known[attr.ino] = (blocks, _ctime(attr))
            self._known.move_to_end(attr.ino)
            if len(self._known) > _MAX_KNOWN:
                self._known.popitem(last=False)

    def refuse(self, what: str) -> OSError:
        with self._lock:
            self.refused += 1
            return OSError(errno.EDQUOT, f"disk quota exceeded ({what}: {self.used} of "
                                         f"{self.limit} bytes used)")

    def removed(self, attr: Any) -> None:
        """``attr`` (seen just before) lost a name; its last name frees its blocks."""
        if attr is None:
            return
        if attr.nlink > 1 and stat_mod.S_IFMT(attr.mode) != stat_mod.S_IFDIR:
            return
        with self._lock:
            known = self._known.pop(attr.ino, None)
            blocks = known[0] if known is not None and known[1] >= _ctime(attr) \
                else attr.blocks * 512
            self.used = max(0, self.used - blocks)


class QuotaExecutor:
    """Runs a tenant's requests through its :class:`Quota` (``execute`` of the tenant)."""

    def __init__(self, quota: Quota) -> None:
        self.quota = quota
        self._sizes: OrderedDict[int, int] = OrderedDict()  # ino -> length last seen
        self._handles: dict[str, int] = {}  # file actor's urn -> its ino

    def _size(self, ino: int, size: int) -> None:
        self._sizes[ino] = size
        self._sizes.move_to_end(ino)
        if len(self._sizes) > _MAX_KNOWN:
            self._sizes.popitem(last=False)

    def execute(self, ref: Any, op: Any) -> Future[Any]:
        q = self.quota
        try:
            bound = self._bound(ref, op)
        except OSError as exc:
            return failed(exc)
        if isinstance(op, (*_REMOVES, m.Rename)):
            return self._remove(ref, op)
        if isinstance(op, m.SetAttr) and op.size is not None:
            return self._truncate_path(ref, op)
        result: Future[Any] = Future()
        inner: Future[Any] = ref.ask(op, block=False)

        def finish(f: Future[Any]) -> None:
            value, exc = f.result_or_error()
            if exc is not None:
                q.release(bound)
                result.fail(exc)
                return
            self._learn(ref, op, value)
            if isinstance(op, (m.Write, m.FAllocate, m.FTruncate)):
                # what it really took: the inode's blocks now (same handle: after it)
                after: Future[Any] = ref.ask(m.FStat(), block=False)

                def measured(g: Future[Any]) -> None:
                    attr, _ = g.result_or_error()
                    if attr is not None:
                        q.observe(attr)
                        self._size(attr.ino, attr.size)
                    q.release(bound)
                    result.set(value)

                after.add_done_callback(measured)
                return
            q.release(bound)
            result.set(value)

        inner.add_done_callback(finish)
        return result

    def _bound(self, ref: Any, op: Any) -> int:
        """What ``op`` could take at most; reserved now (OSError EDQUOT if not there)."""
        q = self.quota
        if isinstance(op, m.Write):
            n = len(op.data) if op.data is not None else 0
            amount = _round(n) + BLOCK if n else 0
            q.reserve(amount, "write")
            return amount
        if isinstance(op, m.FAllocate):
            if op.mode & (_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_COLLAPSE_RANGE):
                return 0
            amount = _round(op.length) + BLOCK
            q.reserve(amount, "fallocate")
            return amount
        if isinstance(op, m.FTruncate):
            if op.size > q.limit or op.size - self._known_size(ref) > q.left():
                raise q.refuse("truncate")
            return 0
        if isinstance(op, _CREATES) or (isinstance(op, m.Open) and op.flags & os.O_CREAT):
            q.reserve(BLOCK, "create")
            return BLOCK
        return 0

    def _known_size(self, ref: Any) -> int:
        ino = self._handles.get(ref.actor_urn)
        return self._sizes.get(ino, 0) if ino is not None else 0

    def _learn(self, ref: Any, op: Any, value: Any) -> None:
        q = self.quota
        if isinstance(op, (m.MakeDir, m.MakeNode, m.Symlink)):
            q.observe(value, new=True)
        elif isinstance(op, m.Link):
            q.observe(value)
        elif isinstance(op, m.Open):
            attr = getattr(value, "attr", None)
            q.observe(attr)
            if attr is not None:
                self._size(attr.ino, attr.size)
                actor = getattr(value, "actor", None)
                if actor is not None:
                    if len(self._handles) > _MAX_KNOWN:
                        self._handles.clear()
                    self._handles[actor.actor_urn] = attr.ino
        elif isinstance(op, m.Close):
            self._handles.pop(ref.actor_urn, None)
        elif isinstance(op, (m.FStat, m.SetAttr)) and value is not None:
            q.observe(value)
            self._size(value.ino, value.size)

    def _remove(self, ref: Any, op: Any) -> Future[Any]:
        """Stat what goes, remove it, credit its blocks if that was its last name."""
        q = self.quota
        result: Future[Any] = Future()
        path = op.dst if isinstance(op, m.Rename) else op.path
        exchange = isinstance(op, m.Rename) and op.flags & 2
        before: Future[Any] = ref.ask(m.Stat(path=path, follow=False, ctx=op.ctx),
                                      block=False)

        def stated(f: Future[Any]) -> None:
            victim, _ = f.result_or_error()
            inner: Future[Any] = ref.ask(op, block=False)

            def removed(g: Future[Any]) -> None:
                value, exc = g.result_or_error()
                if exc is not None:
                    result.fail(exc)
                    return
                if victim is not None and not exchange:
                    q.removed(victim)
                result.set(value)

            inner.add_done_callback(removed)

        before.add_done_callback(stated)
        return result

    def _truncate_path(self, ref: Any, op: m.SetAttr) -> Future[Any]:
        """A truncate by path: its growth is checked against the file's length now."""
        q = self.quota
        result: Future[Any] = Future()
        before: Future[Any] = ref.ask(m.Stat(path=op.path, follow=op.follow, ctx=op.ctx),
                                      block=False)

        def stated(f: Future[Any]) -> None:
            attr, _ = f.result_or_error()
            size = attr.size if attr is not None else 0
            assert op.size is not None
            if op.size > q.limit or op.size - size > q.left():
                result.fail(q.refuse("truncate"))
                return
            inner: Future[Any] = ref.ask(op, block=False)

            def done(g: Future[Any]) -> None:
                value, exc = g.result_or_error()
                if exc is not None:
                    result.fail(exc)
                    return
                q.observe(value)
                result.set(value)

            inner.add_done_callback(done)

        before.add_done_callback(stated)
        return result
