"""Copies in and out of a share and inside it, as ``cp -a``: ``get``, ``put``, ``cp``."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import stat as stat_mod
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pyvirtiofs.api.cli.share import open_share
from pyvirtiofs.api.fs import ShareFS, current_umask

# -- copies ----------------------------------------------------------------------------------
#
# put, get and cp copy as GNU `cp -r` does, and with -a as `cp -a`: directories recursively,
# symbolic links as links (dangling ones too), fifos as fifos; new files and directories get
# the source's permission bits less the umask. -a also keeps exact modes, times (atime and
# mtime, to the nanosecond, links included), owners (as root; the group otherwise, when
# possible), hard links within the copy and extended attributes.
#
# The source tree is walked by the main thread, which creates each directory before the
# entries inside it; files are copied by a bounded pool of threads (the share objects are
# thread-safe), many in flight at once. A file of several chunks is split into ranges copied
# by several threads, each with its own handles, with large reads and writes (several
# requests in flight per call). Directories get their final mode and times last, deepest
# first, once nothing is written into them any more.
#
# A failure is reported (one line, the path named) and the copy goes on; at the end a summary
# says how many entries were and were not copied, and the exit status is 1. A lost device
# stops the copy at once, saying what had been copied.

# Bytes per read/write call: several FUSE requests (1 MiB each) in flight per call, and a
# working set small enough to stay in the CPU's caches between the daemon's copy and ours
# (measured: 4 MiB beats 8 and 16 by a third on a 500 MiB file).
CHUNK = 4 << 20
RANGE = 32 << 20  # a file larger than this is copied by several threads, one range each
# Threads for one big file: one per CPU (more only compete for the same memory bandwidth).
RANGE_THREADS = max(2, os.cpu_count() or 2)
DEFAULT_JOBS = 4
# Errors after which nothing more can be copied: stop, and say what was done.
FATAL_ERRNOS = frozenset({errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNRESET, errno.EROFS})


class _Side:
    """One end of a copy: the share (``fs``) or the local disk (``fs`` None), behind the
    calls a copy needs. Paths are the side's own: absolute or relative local paths, or
    paths inside the share."""

    def __init__(self, fs: ShareFS | None) -> None:
        self.fs = fs

    def lstat(self, path: str) -> os.stat_result:
        return os.lstat(path) if self.fs is None else self.fs.lstat(path)

    def stat(self, path: str) -> os.stat_result:
        return os.stat(path) if self.fs is None else self.fs.stat(path)

    def is_dir(self, path: str) -> bool:
        try:
            return stat_mod.S_ISDIR(self.stat(path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def entries(self, path: str) -> list[tuple[str, os.stat_result]]:
        """Names in directory ``path`` with their lstat (no extra round trip on a share:
        READDIRPLUS brings the attributes)."""
        if self.fs is None:
            with os.scandir(path) as it:
                return [(e.name, e.stat(follow_symlinks=False)) for e in it]
        with self.fs.scandir(path) as it:
            return [(e.name, e.stat(follow_symlinks=False)) for e in it]

    def readlink(self, path: str) -> str:
        return os.fsdecode(os.readlink(path) if self.fs is None else self.fs.readlink(path))

    def symlink(self, target: str, path: str) -> None:
        (os.symlink if self.fs is None else self.fs.symlink)(target, path)

    def mkdir(self, path: str, mode: int) -> None:
        (os.mkdir if self.fs is None else self.fs.mkdir)(path, mode)

    def mkfifo(self, path: str, mode: int) -> None:
        (os.mkfifo if self.fs is None else self.fs.mkfifo)(path, mode)

    def mknod(self, path: str, mode: int, rdev: int) -> None:
        if self.fs is None:
            os.mknod(path, mode, rdev)
        else:
            raise OSError(errno.EOPNOTSUPP, "a share cannot make device or socket files", path)

    def remove(self, path: str) -> None:
        (os.remove if self.fs is None else self.fs.remove)(path)

    def link(self, src: str, dst: str) -> None:
        if self.fs is None:
            os.link(src, dst, follow_symlinks=False)
        else:
            self.fs.link(src, dst)

    def chmod(self, path: str, mode: int) -> None:
        (os.chmod if self.fs is None else self.fs.chmod)(path, mode)

    def lchown(self, path: str, uid: int, gid: int) -> None:
        if self.fs is None:
            os.chown(path, uid, gid, follow_symlinks=False)
        else:
            self.fs.chown(path, uid, gid, follow_symlinks=False)

    def utime(self, path: str, ns: tuple[int, int], *, follow: bool) -> None:
        (os.utime if self.fs is None else self.fs.utime)(path, ns=ns, follow_symlinks=follow)

    def xattrs(self, path: str) -> list[tuple[str, bytes]]:
        if self.fs is None:
            return [(n, os.getxattr(path, n, follow_symlinks=False))
                    for n in os.listxattr(path, follow_symlinks=False)]
        return [(n, self.fs.getxattr(path, n, follow_symlinks=False))
                for n in self.fs.listxattr(path, follow_symlinks=False)]

    def setxattr(self, path: str, name: str, value: bytes) -> None:
        if self.fs is None:
            os.setxattr(path, name, value, follow_symlinks=False)
        else:
            self.fs.setxattr(path, name, value, follow_symlinks=False)

    def open_read(self, path: str) -> _Reader:
        if self.fs is None:
            return _LocalReader(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        return _ShareReader(self.fs.open_raw(path, os.O_RDONLY))

    def open_write(self, path: str, mode: int, *, create: bool) -> _Writer:
        """``create``: O_CREAT|O_TRUNC with ``mode`` (less the umask), as cp opens a
        destination; otherwise an existing file, written in place (another range)."""
        flags = os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if create else 0)
        if self.fs is None:
            return _LocalWriter(os.open(path, flags | os.O_CLOEXEC, mode))
        return _ShareWriter(self.fs.open_raw(path, flags, mode))


class _Reader:
    def readinto(self, view: memoryview, offset: int) -> int:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _Writer:
    def write(self, view: memoryview, offset: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _LocalReader(_Reader):
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def readinto(self, view: memoryview, offset: int) -> int:
        return os.preadv(self.fd, [view], offset)

    def close(self) -> None:
        os.close(self.fd)


class _ShareReader(_Reader):
    """Reads through one handle, sequentially from wherever the first read starts."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.pos = 0

    def readinto(self, view: memoryview, offset: int) -> int:
        if offset != self.pos:
            self.pos = self.f.seek(offset)
        n: int = self.f.readinto(view)
        self.pos += n
        return n

    def close(self) -> None:
        self.f.close()


class _LocalWriter(_Writer):
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def write(self, view: memoryview, offset: int) -> None:
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def close(self) -> None:
        os.close(self.fd)


class _ShareWriter(_Writer):
    def __init__(self, f: Any) -> None:
        self.f = f

    def write(self, view: memoryview, offset: int) -> None:
        while view:
            n = self.f.pwrite(view, offset)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            view, offset = view[n:], offset + n

    def close(self) -> None:
        self.f.close()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class _Progress:
    """Files and bytes copied: a bar on stderr (tqdm) with the file count beside it, and a
    summary line at the end; silent unless wanted. Thread-safe."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.lock = threading.Lock()
        self.bar: Any = None
        self.files_total = 0
        self.files_done = 0
        self.bytes_done = 0
        self.started = time.monotonic()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024,
                            file=sys.stderr, leave=False, dynamic_ncols=True)

    def found(self, nbytes: int) -> None:
        """One more file to copy, of ``nbytes``."""
        with self.lock:
            self.files_total += 1
            if self.bar is not None:
                self.bar.total += nbytes
                self._postfix()
                if self.files_total == 1:
                    self.bar.refresh()  # at once, not at the first chunk's end

    def advance(self, nbytes: int) -> None:
        with self.lock:
            self.bytes_done += nbytes
            if self.bar is not None:
                self.bar.update(nbytes)

    def file_done(self) -> None:
        with self.lock:
            self.files_done += 1
            if self.bar is not None:
                self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"{self.files_done}/{self.files_total} files", refresh=False)

    def note(self, line: str) -> None:
        """A line on stderr that does not tear the bar."""
        with self.lock:
            if self.bar is not None:
                self.bar.write(line, file=sys.stderr)
            else:
                print(line, file=sys.stderr, flush=True)

    def close(self, summary: str | None) -> None:
        with self.lock:
            if self.bar is not None:
                self._postfix()
                self.bar.refresh()  # the final count, however fast the copy went
                self.bar.close()
                self.bar = None
        if self.enabled and summary:
            print(summary, file=sys.stderr, flush=True)


class CopyIncomplete(Exception):
    """A copy that did not copy everything; the failures were reported as they happened
    and ``str()`` is the summary."""


class _Copy:
    """One put/get/cp: the walk (caller's thread), the pool, the bookkeeping."""

    def __init__(self, src: _Side, dst: _Side, *, archive: bool, jobs: int,
                 progress: _Progress) -> None:
        self.src = src
        self.dst = dst
        self.archive = archive
        self.progress = progress
        self.jobs = max(1, jobs)
        self.umask = current_umask()
        self.lock = threading.Lock()
        self.copied = {"file": 0, "directory": 0, "symlink": 0, "special": 0}
        self.failed: list[str] = []
        self.fatal: OSError | None = None
        self.bytes = 0
        self.dirs_to_finish: list[tuple[str, os.stat_result, bool]] = []
        self.hard_links: dict[tuple[int, int], str] = {}  # source (dev, ino) -> its copy
        self.later_links: list[tuple[str, str]] = []
        self.fresh_dirs: dict[str, bool] = {}  # destination directory -> made by this copy
        self.dir_dst: dict[str, str] = {}  # source directory -> its copy
        self.errors: list[BaseException] = []
        self.abort = threading.Event()  # stop the workers: the device is gone, or Ctrl-C
        self.quiet = False  # one file: its error is raised, not reported
        self.interrupted = False  # Ctrl-C: what is cut short is not reported one by one
        self.buffers = threading.local()
        self.pool = ThreadPoolExecutor(self.jobs, thread_name_prefix="pyvirtiofs-copy")
        self.slots = threading.BoundedSemaphore(self.jobs * 4)  # tasks queued ahead of the walk
        self.futures: set[Future[None]] = set()

    # -- bookkeeping --------------------------------------------------------------------

    def fail(self, what: str, exc: BaseException) -> None:
        """Report one entry that could not be copied (at once, one line)."""
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            if exc.errno in FATAL_ERRNOS:
                with self.lock:
                    self.fatal = self.fatal or exc
                self.abort.set()
        else:
            reason = f"{type(exc).__name__}: {exc}"
        with self.lock:
            self.failed.append(what)
            self.errors.append(exc)
        if not self.quiet and not self.interrupted:
            self.progress.note(f"pyvirtiofs: cannot copy {what}: {reason}")

    def done(self, kind: str, nbytes: int = 0) -> None:
        with self.lock:
            self.copied[kind] += 1
            self.bytes += nbytes

    def submit(self, fn: Any, *args: Any) -> None:
        if self.abort.is_set():
            return  # the rest is not copied; the summary says so
        self.slots.acquire()
        try:
            future = self.pool.submit(fn, *args)
        except BaseException:
            self.slots.release()
            raise
        with self.lock:
            self.futures.add(future)
        future.add_done_callback(self._task_done)

    def _task_done(self, future: Future[None]) -> None:
        with self.lock:
            self.futures.discard(future)
        self.slots.release()

    def buffer(self) -> memoryview:
        buf = getattr(self.buffers, "view", None)
        if buf is None:
            buf = self.buffers.view = memoryview(bytearray(CHUNK))
        return buf

    # -- the walk ---------------------------------------------------------------------------

    def run(self, src: str, dst: str, st: os.stat_result) -> None:
        """Copy ``src`` (whose lstat, or stat when following it, is ``st``) to ``dst``
        (its final name)."""
        try:
            if stat_mod.S_ISDIR(st.st_mode):
                # Nothing can be copied without it: its error is the command's.
                self.directory(src, dst, st, fresh_parent=False)
                self.walk(src, dst)
            else:
                self.entry(src, dst, st, fresh_parent=False)
            self.wait()
            if not self.abort.is_set():
                self.link_later()
                self.finish_dirs()
        except BaseException as exc:
            # Ctrl-C, or a bug: the workers stop at their next chunk, quietly.
            self.interrupted = isinstance(exc, KeyboardInterrupt)
            self.abort.set()
            raise
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def wait(self) -> None:
        while True:
            with self.lock:
                pending = list(self.futures)
            if not pending:
                return
            for f in pending:
                f.result()

    def walk(self, src: str, dst: str) -> None:
        stack = [(src, dst)]
        while stack:
            if self.abort.is_set():
                return
            s_dir, d_dir = stack.pop()
            try:
                entries = self.src.entries(s_dir)
            except OSError as exc:
                self.fail(f"the contents of {s_dir!r}", exc)
                continue
            fresh = self.fresh_dirs.get(d_dir, False)
            for name, st in entries:
                s, d = os.path.join(s_dir, name), os.path.join(d_dir, name)
                if self.entry(s, d, st, fresh_parent=fresh) and stat_mod.S_ISDIR(st.st_mode):
                    stack.append((s, d))

    def entry(self, s: str, d: str, st: os.stat_result, *, fresh_parent: bool) -> bool:
        """Copy one entry (a directory: make it, its contents come from the walk); False
        when it failed. Files go to the pool; the rest is done here."""
        mode = st.st_mode
        try:
            if stat_mod.S_ISREG(mode):
                self.file(s, d, st, fresh_parent)
                return True
            if stat_mod.S_ISDIR(mode):
                self.directory(s, d, st, fresh_parent)
                return True
            self.replace_existing(d, fresh_parent)
            if stat_mod.S_ISLNK(mode):
                self.dst.symlink(self.src.readlink(s), d)
                kind = "symlink"
            elif stat_mod.S_ISFIFO(mode):
                self.dst.mkfifo(d, stat_mod.S_IMODE(mode))
                kind = "special"
            else:
                self.dst.mknod(d, mode, st.st_rdev)
                kind = "special"
            self.keep_attributes(s, d, st)
            self.done(kind)
            return True
        except OSError as exc:
            self.fail(repr(s), exc)
            return False

    def replace_existing(self, d: str, fresh_parent: bool) -> None:
        """Make room for a link or special file: remove what is at ``d`` unless it is a
        directory (as cp does); nothing to do in a directory this copy made."""
        if fresh_parent:
            return
        try:
            st = self.dst.lstat(d)
        except FileNotFoundError:
            return
        if stat_mod.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR,
                                    "cannot overwrite a directory with a non-directory", d)
        self.dst.remove(d)

    def directory(self, s: str, d: str, st: os.stat_result, fresh_parent: bool) -> None:
        want = stat_mod.S_IMODE(st.st_mode) & 0o777
        try:
            # Writable by us while we copy into it; its own mode comes last.
            self.dst.mkdir(d, want | 0o700)
            made = True
        except FileExistsError:
            if not self.dst.is_dir(d):
                raise NotADirectoryError(
                    errno.ENOTDIR, "cannot overwrite a non-directory with a directory",
                    d) from None
            made = False  # copy into it, as cp does
        self.fresh_dirs[d] = made
        self.dir_dst[s] = d
        self.dirs_to_finish.append((s, st, made))
        self.done("directory")

    def file(self, s: str, d: str, st: os.stat_result, fresh_parent: bool) -> None:
        if self.archive and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = self.hard_links.get(key)
            if first is not None:
                self.later_links.append((d, first))
                return
            self.hard_links[key] = d
        self.progress.found(st.st_size)
        if not fresh_parent:
            try:
                existing = self.dst.lstat(d)
            except FileNotFoundError:
                pass
            else:
                if stat_mod.S_ISDIR(existing.st_mode):
                    raise IsADirectoryError(
                        errno.EISDIR, "cannot overwrite a directory with a non-directory", d)
                if stat_mod.S_ISLNK(existing.st_mode):
                    self.dst.remove(d)  # never write through a link at the destination
        size = st.st_size
        if size <= RANGE or self.jobs == 1:
            self.submit(self.copy_whole, s, d, st)
            return
        # A big file: made here, filled by several threads, one range each.
        self.dst.open_write(d, stat_mod.S_IMODE(st.st_mode) & 0o777, create=True).close()
        parts = max(2, min(self.jobs, RANGE_THREADS, -(-size // RANGE)))
        step = -(-size // parts)
        step = -(-step // CHUNK) * CHUNK
        ranges: list[tuple[int, int | None, int]] = [
            (off, step, step) for off in range(0, size - step, step)]
        last = ranges[-1][0] + step if ranges else 0
        ranges.append((last, None, size - last))  # the last one reads to the end
        state = _BigFile(len(ranges))
        for off, length, expected in ranges:
            self.submit(self.copy_range, s, d, st, off, length, expected, state)

    # -- the workers --------------------------------------------------------------------

    def copy_whole(self, s: str, d: str, st: os.stat_result) -> None:
        if self.abort.is_set():
            return
        try:
            reader = self.src.open_read(s)
            try:
                writer = self.dst.open_write(d, stat_mod.S_IMODE(st.st_mode) & 0o777,
                                             create=True)
                try:
                    total = self.pump(reader, writer, 0, None, st.st_size)
                finally:
                    writer.close()
            finally:
                reader.close()
            self.keep_attributes(s, d, st)
        except Exception as exc:
            self.fail(repr(s), exc)
            return
        self.done("file", total)
        self.progress.file_done()

    def copy_range(self, s: str, d: str, st: os.stat_result, offset: int,
                   length: int | None, expected: int, state: _BigFile) -> None:
        error: BaseException | None = None
        if not self.abort.is_set():
            try:
                reader = self.src.open_read(s)
                try:
                    writer = self.dst.open_write(d, 0, create=False)
                    try:
                        got = self.pump(reader, writer, offset, length, expected)
                    finally:
                        writer.close()
                finally:
                    reader.close()
                with state.lock:
                    state.bytes += got
            except Exception as exc:
                error = exc
        else:
            error = self.fatal or OSError(errno.ECANCELED, "copy interrupted")
        with state.lock:
            state.left -= 1
            if error is not None and state.error is None:
                state.error = error
            last = state.left == 0
        if not last:
            return
        if state.error is not None:
            self.fail(repr(s), state.error)
            return
        try:
            self.keep_attributes(s, d, st)
        except Exception as exc:
            self.fail(repr(s), exc)
            return
        self.done("file", state.bytes)
        self.progress.file_done()

    def pump(self, reader: _Reader, writer: _Writer, offset: int, length: int | None,
             expected: int) -> int:
        """Copy ``length`` bytes (None: to the end of the file) at ``offset``, one chunk at
        a time through this thread's buffer; the byte count.

        ``expected``: how many bytes the walk saw there. To the end of the file, each read
        asks for at most one byte more than that: the short read that tells the end comes
        with the data (one READ for a small file, not one more for the end, and no room in
        device memory reserved for bytes that are not there); a file that grew since goes
        on being read."""
        buf = self.buffer()
        done = 0
        while length is None or done < length:
            want = CHUNK if length is None else min(CHUNK, length - done)
            if length is None and done <= expected:
                want = min(want, expected - done + 1)
            n = reader.readinto(buf[:want], offset + done)
            if n <= 0:
                break
            writer.write(buf[:n], offset + done)
            done += n
            self.progress.advance(n)
            if n < want:
                break  # a short read of a regular file: its end
            if self.abort.is_set():
                raise self.fatal or OSError(errno.ECANCELED, "copy interrupted")
        return done

    # -- attributes -----------------------------------------------------------------------

    def keep_attributes(self, s: str, d: str, st: os.stat_result) -> None:
        """With -a: owner, mode, extended attributes, then times (last: nothing changes
        them after). Without: nothing (the mode was given when the file was made)."""
        if not self.archive:
            return
        link = stat_mod.S_ISLNK(st.st_mode)
        self.keep_owner(d, st)
        if not link:
            self.dst.chmod(d, stat_mod.S_IMODE(st.st_mode))
        self.keep_xattrs(s, d)
        self.dst.utime(d, (st.st_atime_ns, st.st_mtime_ns), follow=not link)

    def keep_owner(self, d: str, st: os.stat_result) -> None:
        # As cp -a: the owner when we may (root), else at least the group; failures to
        # keep them are not errors.
        try:
            self.dst.lchown(d, st.st_uid, st.st_gid)
        except OSError:
            with contextlib.suppress(OSError):
                self.dst.lchown(d, -1, st.st_gid)

    def keep_xattrs(self, s: str, d: str) -> None:
        # As cp -a: extended attributes the destination cannot take are no error.
        try:
            attrs = self.src.xattrs(s)
        except OSError:
            return
        for name, value in attrs:
            with contextlib.suppress(OSError):
                self.dst.setxattr(d, name, value)

    def link_later(self) -> None:
        """Hard links (-a): each further name of a file links to its first copy."""
        for d, first in self.later_links:
            try:
                self.replace_existing(d, False)
                self.dst.link(first, d)
                self.done("file")
            except OSError as exc:
                self.fail(f"{d!r} (a hard link to {first!r})", exc)

    def finish_dirs(self) -> None:
        """Directories' final modes and times, deepest first (made before their
        contents, so in reverse order)."""
        for s, st, made in reversed(self.dirs_to_finish):
            d = self.dir_dst[s]
            try:
                if self.archive:
                    self.keep_attributes(s, d, st)
                elif made:
                    # Made u+rwx to be filled; cp's mode for a new directory is the
                    # source's less the umask.
                    want = stat_mod.S_IMODE(st.st_mode) & 0o777
                    if (want | 0o700) & ~self.umask != want & ~self.umask:
                        self.dst.chmod(d, want & ~self.umask)
            except OSError as exc:
                self.fail(f"the mode or times of {s!r}", exc)

    def summary(self, elapsed: float) -> str:
        c = self.copied
        parts = [f"{c['file']} file{'' if c['file'] == 1 else 's'}"]
        if c["directory"]:
            parts.append(f"{c['directory']} director{'y' if c['directory'] == 1 else 'ies'}")
        if c["symlink"]:
            parts.append(f"{c['symlink']} symlink{'' if c['symlink'] == 1 else 's'}")
        if c["special"]:
            parts.append(f"{c['special']} special file{'' if c['special'] == 1 else 's'}")
        rate = self.bytes / elapsed if elapsed > 0 else 0.0
        return (f"copied {', '.join(parts)}: {_human(self.bytes)} in {elapsed:.1f} s "
                f"({_human(rate)}/s)")


@dataclass
class _BigFile:
    """The ranges of one big file still being copied, and how they went."""

    left: int
    bytes: int = 0
    error: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _want_progress(args: argparse.Namespace) -> bool:
    return bool(args.progress or (args.progress is None and sys.stderr.isatty()))


def _copy(src: _Side, src_path: str, dst: _Side, dst_path: str, *, recursive: bool,
          progress: bool, archive: bool = False, jobs: int = DEFAULT_JOBS) -> None:
    """Copy ``src_path`` to ``dst_path`` as ``cp [-r|-a]`` would. Raises for what stops it
    before anything is copied (missing source, a directory without -r, a copy into
    itself); :class:`CopyIncomplete` when some entries could not be copied."""
    recursive = recursive or archive
    # cp -r and -a copy a link given on the command line as a link; plain cp follows it.
    st = src.lstat(src_path) if recursive else src.stat(src_path)
    if stat_mod.S_ISDIR(st.st_mode):
        if not recursive:
            raise IsADirectoryError(errno.EISDIR, "is a directory (use -r)", src_path)
    if dst.is_dir(dst_path):
        dst_path = os.path.join(dst_path, os.path.basename(src_path.rstrip("/")) or ".")
    if src.fs is not None and src.fs is dst.fs:
        a = os.path.normpath(os.path.join("/", src_path))
        b = os.path.normpath(os.path.join("/", dst_path))
        if a == b:
            raise OSError(errno.EINVAL, "source and destination are the same", dst_path)
        inner = os.path.relpath(b, a)
        if stat_mod.S_ISDIR(st.st_mode) and inner != ".." and not inner.startswith("../"):
            # The walk would find the copy and copy it again, without end.
            raise OSError(errno.EINVAL, "cannot copy a directory into itself", dst_path)
    bar = _Progress(progress)
    job = _Copy(src, dst, archive=archive, jobs=jobs, progress=bar)
    single = not stat_mod.S_ISDIR(st.st_mode)
    job.quiet = single
    started = time.monotonic()
    summary: str | None = None
    try:
        try:
            job.run(src_path, dst_path, st)
        except KeyboardInterrupt:
            bar.close(None)
            print(f"pyvirtiofs: interrupted: {sum(job.copied.values())} entries copied "
                  f"({_human(job.bytes)}), the rest not", file=sys.stderr)
            raise
        summary = job.summary(time.monotonic() - started)
    finally:
        bar.close(summary)
    if single and job.errors:
        # One entry: its error, as cp reports it, in place of a summary.
        error = job.errors[0]
        if isinstance(error, OSError) and error.filename is None:
            error = OSError(error.errno, error.strerror, src_path)
        raise error
    total = sum(job.copied.values())
    if job.fatal is not None:
        raise CopyIncomplete(
            f"copy stopped: {job.fatal.strerror or job.fatal}: {total} entries copied "
            f"({_human(job.bytes)}); {len(job.failed)} failed and the rest of "
            f"{src_path} was not copied")
    if job.failed:
        raise CopyIncomplete(
            f"{len(job.failed)} of {total + len(job.failed)} entries not copied "
            f"({total} copied, {_human(job.bytes)}); the errors are above")


def _copy_command(args: argparse.Namespace, src: Any, dst: Any) -> int:
    _copy(src, args.src, dst, args.dst, recursive=args.recursive,
          progress=_want_progress(args), archive=args.archive, jobs=args.jobs)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with open_share(args.share) as fs:
        return _copy_command(args, _Side(fs), _Side(None))


def cmd_put(args: argparse.Namespace) -> int:
    with open_share(args.share) as fs:
        return _copy_command(args, _Side(None), _Side(fs))


def cmd_cp(args: argparse.Namespace) -> int:
    with open_share(args.share) as fs:
        side = _Side(fs)
        return _copy_command(args, side, side)
