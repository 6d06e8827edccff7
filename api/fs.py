"""The ``os``-style API shared by every way of reaching a share.

:class:`ShareFS` turns the ``os`` module's calls into actor messages
(:mod:`pyvirtiofs.actors.messages`); subclasses only say how a message travels: straight
to the actors in-process (:class:`~pyvirtiofs.api.local.VirtioFS`) or over ZeroMQ
(:class:`~pyvirtiofs.api.remote.client.RemoteFS`).
So the same operation behaves identically — results and errnos — on every path.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import io
import os
import stat as stat_mod
import warnings
from collections.abc import Iterator
from typing import Any

from pyvirtiofs.actors import messages as m
from pyvirtiofs.codec.fuse_types import Attr, DirentPlus

__all__ = ["DirEntry", "PathLike", "RawFile", "ShareFS"]

PathLike = str | bytes | os.PathLike[str] | os.PathLike[bytes]

_DT_DIR = stat_mod.S_IFDIR >> 12
_DT_LNK = stat_mod.S_IFLNK >> 12
_DT_REG = stat_mod.S_IFREG >> 12


def _p(path: PathLike) -> bytes:
    """Paths travel as bytes: names need not be UTF-8 (see pyvirtiofs.actors.messages)."""
    return os.fsencode(path)


class ShareFS(abc.ABC):
    """A mounted share with the ``os`` module's names, arguments and exceptions.

    Subclasses implement the five transport hooks below; everything else is shared.
    """

    ctx: m.Credentials | None = None

    # -- transport hooks ----------------------------------------------------------------------

    @abc.abstractmethod
    def _ask(self, message: Any) -> Any:
        """Send a session message and return its reply (raising its OSError)."""

    @abc.abstractmethod
    def _open_file(self, message: m.Open) -> tuple[Any, int]:
        """Open a file; returns (handle, flags)."""

    @abc.abstractmethod
    def _open_dir(self, message: m.OpenDir) -> Any:
        """Open a directory; returns a handle."""

    @abc.abstractmethod
    def _ask_handle(self, handle: Any, message: Any, name: str | None = None) -> Any:
        """Send a message to an open handle (file or directory actor)."""

    @abc.abstractmethod
    def _close_handle(self, handle: Any, *, wait: bool = True) -> None:
        """Release a handle (RELEASE/RELEASEDIR); never raises for a handle already gone.
        ``wait=False``: send the close and return at once (from a finalizer, which must
        never block)."""

    def _readinto(self, handle: Any, buffer: Any, name: str | None = None) -> int:
        """Read into ``buffer``; transports that can fill it in place override this."""
        view = memoryview(buffer).cast("B")
        data = self._ask_handle(handle, m.Read(size=len(view)), name)
        view[:len(data)] = data
        return len(data)

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything this object holds."""

    def __enter__(self) -> ShareFS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- metadata ----------------------------------------------------------------------------

    def stat(self, path: PathLike, *, follow_symlinks: bool = True) -> os.stat_result:
        attr: Attr = self._ask(m.Stat(path=_p(path), follow=follow_symlinks))
        return attr.to_stat_result()

    def lstat(self, path: PathLike) -> os.stat_result:
        return self.stat(path, follow_symlinks=False)

    def exists(self, path: PathLike) -> bool:
        try:
            self.stat(path)
        except FileNotFoundError:
            return False
        return True

    def access(self, path: PathLike, mode: int) -> bool:
        try:
            self._ask(m.Access(path=_p(path), mode=mode))
        except (PermissionError, FileNotFoundError):
            return False
        return True

    def readlink(self, path: PathLike) -> str | bytes:
        target: bytes = self._ask(m.ReadLink(path=_p(path)))
        return target if isinstance(path, bytes) else os.fsdecode(target)

    def mkdir(self, path: PathLike, mode: int = 0o777) -> None:
        self._ask(m.MakeDir(path=_p(path), mode=mode, umask=_umask()))

    def makedirs(self, path: PathLike, mode: int = 0o777, exist_ok: bool = False) -> None:
        head, _tail = os.path.split(os.fsdecode(path).rstrip("/"))
        if head and not self.exists(head):
            self.makedirs(head, mode, exist_ok=True)
        try:
            self.mkdir(path, mode)
        except FileExistsError:
            if not exist_ok or not stat_mod.S_ISDIR(self.stat(path).st_mode):
                raise

    def mkfifo(self, path: PathLike, mode: int = 0o666) -> None:
        self._ask(m.MakeNode(path=_p(path), mode=stat_mod.S_IFIFO | (mode & 0o7777),
                             umask=_umask()))

    def remove(self, path: PathLike) -> None:
        self._ask(m.Unlink(path=_p(path)))

    unlink = remove

    def rmdir(self, path: PathLike) -> None:
        self._ask(m.RemoveDir(path=_p(path)))

    def rename(self, src: PathLike, dst: PathLike, *, flags: int = 0) -> None:
        self._ask(m.Rename(src=_p(src), dst=_p(dst), flags=flags))

    replace = rename

    def link(self, src: PathLike, dst: PathLike) -> None:
        self._ask(m.Link(src=_p(src), dst=_p(dst)))

    def symlink(self, target: PathLike, path: PathLike) -> None:
        self._ask(m.Symlink(target=_p(target), path=_p(path)))

    def chmod(self, path: PathLike, mode: int, *, follow_symlinks: bool = True) -> None:
        self._ask(m.SetAttr(path=_p(path), mode=mode, follow=follow_symlinks))

    def chown(self, path: PathLike, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        self._ask(m.SetAttr(path=_p(path), uid=uid, gid=gid, follow=follow_symlinks))

    def truncate(self, path: PathLike, length: int) -> None:
        if length < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        self._ask(m.SetAttr(path=_p(path), size=length))

    def utime(self, path: PathLike, times: tuple[float, float] | None = None, *,
              ns: tuple[int, int] | None = None, follow_symlinks: bool = True) -> None:
        if times is not None and ns is not None:
            raise ValueError("utime: you may specify either 'times' or 'ns' but not both")
        if ns is None and times is None:
            self._ask(m.SetAttr(path=_p(path), atime="now", mtime="now",
                                follow=follow_symlinks))
            return
        if ns is None:
            assert times is not None
            ns = (int(times[0] * 1e9), int(times[1] * 1e9))
        at, mt = (divmod(v, 10**9) for v in ns)
        self._ask(m.SetAttr(path=_p(path), atime=at, mtime=mt, follow=follow_symlinks))

    def statvfs(self, path: PathLike = "/") -> os.statvfs_result:
        return self._ask(m.StatFs(path=_p(path))).to_statvfs_result()

    def getxattr(self, path: PathLike, attribute: PathLike, *,
                 follow_symlinks: bool = True) -> bytes:
        return self._ask(m.GetXattr(path=_p(path), name=_p(attribute), follow=follow_symlinks))

    def setxattr(self, path: PathLike, attribute: PathLike, value: bytes, flags: int = 0, *,
                 follow_symlinks: bool = True) -> None:
        self._ask(m.SetXattr(path=_p(path), name=_p(attribute), value=bytes(value), flags=flags,
                             follow=follow_symlinks))

    def listxattr(self, path: PathLike = "/", *, follow_symlinks: bool = True) -> list[str]:
        return [os.fsdecode(n) for n in
                self._ask(m.ListXattr(path=_p(path), follow=follow_symlinks))]

    def removexattr(self, path: PathLike, attribute: PathLike, *,
                    follow_symlinks: bool = True) -> None:
        self._ask(m.RemoveXattr(path=_p(path), name=_p(attribute), follow=follow_symlinks))

    # -- directories ---------------------------------------------------------------------------

    def scandir(self, path: PathLike = "/") -> ScandirIterator:
        """Entries of ``path`` (without . and ..), with their attributes from READDIRPLUS
        so ``is_dir()``/``stat()`` need no further round trip. Like ``os.scandir``: an
        iterator and a context manager that closes the directory."""
        handle = self._open_dir(m.OpenDir(path=_p(path)))
        return ScandirIterator(self, handle, path)

    def listdir(self, path: PathLike = "/") -> list[Any]:
        handle = self._open_dir(m.OpenDir(path=_p(path)))
        names: list[bytes] = []
        try:
            while batch := self._ask_handle(handle, m.ReadDir(plus=False)):
                names += [e.name for e in batch if e.name not in (b".", b"..")]
        finally:
            self._close_handle(handle)
        return names if isinstance(path, bytes) else [os.fsdecode(n) for n in names]

    def walk(self, top: PathLike = "/") -> Iterator[tuple[str, list[str], list[str]]]:
        dirs, files = [], []
        for entry in self.scandir(top):
            (dirs if entry.is_dir(follow_symlinks=False) else files).append(entry.name)
        yield os.fsdecode(top), dirs, files
        for d in dirs:
            yield from self.walk(os.path.join(os.fsdecode(top), d))

    # -- files -----------------------------------------------------------------------------------

    def open_raw(self, path: PathLike, flags: int, mode: int = 0o666) -> RawFile:
        """Open with ``os.open`` flags; returns an unbuffered :class:`RawFile`."""
        handle, flags = self._open_file(m.Open(path=_p(path), flags=flags, mode=mode,
                                               umask=_umask()))
        return RawFile(self, handle, os.fsdecode(path), flags)

    def open(self, path: PathLike, mode: str = "r", buffering: int = -1,
             encoding: str | None = None, errors: str | None = None,
             newline: str | None = None) -> Any:
        """Like the built-in ``open`` (modes r/w/a/x, +, b/t)."""
        flags, readable, writable = _mode_to_flags(mode)
        raw = self.open_raw(path, flags)
        try:
            raw.readable_ = readable
            raw.writable_ = writable
            if buffering == 0:
                if "b" not in mode:
                    raise ValueError("can't have unbuffered text I/O")
                return raw
            size = io.DEFAULT_BUFFER_SIZE if buffering in (-1, 1) else buffering
            size = max(size, 128 << 10) if buffering == -1 else size
            buffered: Any
            if readable and writable:
                buffered = io.BufferedRandom(raw, size)
            elif writable:
                buffered = io.BufferedWriter(raw, size)
            else:
                buffered = io.BufferedReader(raw, size)
            if "b" in mode:
                return buffered
            return io.TextIOWrapper(buffered, encoding or "utf-8", errors, newline,
                                    line_buffering=buffering == 1)
        except BaseException:
            raw.close()
            raise

    def read_bytes(self, path: PathLike) -> bytes:
        with self.open_raw(path, os.O_RDONLY) as f:
            return f.readall()

    def write_bytes(self, path: PathLike, data: bytes) -> int:
        with self.open_raw(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as f:
            return f.write(data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode_to_flags(mode: str) -> tuple[int, bool, bool]:
    if not mode or len(set(mode)) != len(mode) or set(mode) - set("rwaxbt+"):
        raise ValueError(f"invalid mode: {mode!r}")
    kinds = [c for c in mode if c in "rwax"]
    if len(kinds) != 1 or ("b" in mode and "t" in mode):
        raise ValueError(f"invalid mode: {mode!r}")
    plus = "+" in mode
    kind = kinds[0]
    rw = os.O_RDWR if plus else (os.O_RDONLY if kind == "r" else os.O_WRONLY)
    extra = {"r": 0, "w": os.O_CREAT | os.O_TRUNC, "a": os.O_CREAT | os.O_APPEND,
             "x": os.O_CREAT | os.O_EXCL}[kind]
    return rw | extra, kind == "r" or plus, kind != "r" or plus


class RawFile(io.RawIOBase):
    """An unbuffered file on a share, backed by a file actor (no OS file descriptor).

    As with built-in files, one that is garbage-collected unclosed is closed then (its
    handle released) with a ``ResourceWarning``."""

    _finalizing = False

    def __init__(self, fs: ShareFS, handle: Any, name: str, flags: int) -> None:
        super().__init__()
        self._fs = fs
        self._handle = handle
        self.name = name
        self.flags = flags
        acc = flags & os.O_ACCMODE
        self.readable_ = acc in (os.O_RDONLY, os.O_RDWR)
        self.writable_ = acc in (os.O_WRONLY, os.O_RDWR)

    def _ask(self, message: Any) -> Any:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        return self._fs._ask_handle(self._handle, message, self.name)

    def readable(self) -> bool:
        return self.readable_

    def writable(self) -> bool:
        return self.writable_

    def seekable(self) -> bool:
        return True

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a virtio-fs file has no OS file descriptor")

    def readinto(self, buffer: Any) -> int:
        if not self.readable_:
            raise io.UnsupportedOperation("not readable")
        return self._fs._readinto(self._handle, buffer, self.name)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if not self.readable_:
            raise io.UnsupportedOperation("not readable")
        return self._ask(m.Read(size=size))

    def readall(self) -> bytes:
        chunks = []
        while chunk := self.read(4 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def pread(self, size: int, offset: int) -> bytes:
        return self._ask(m.Read(size=size, offset=offset))

    def write(self, data: Any) -> int:
        if not self.writable_:
            raise io.UnsupportedOperation("not writable")
        return self._ask(m.Write(data=data))

    def pwrite(self, data: Any, offset: int) -> int:
        return self._ask(m.Write(data=data, offset=offset))

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._ask(m.Seek(offset=offset, whence=whence))

    def tell(self) -> int:
        return self.seek(0, os.SEEK_CUR)

    def truncate(self, size: int | None = None) -> int:
        if size is None:
            size = self.tell()
        self._ask(m.FTruncate(size=size))
        return size

    def stat(self) -> os.stat_result:
        return self._ask(m.FStat()).to_stat_result()

    def fsync(self, datasync: bool = False) -> None:
        self._ask(m.FSync(datasync=datasync))

    def close(self) -> None:
        if not self.closed:
            try:
                self._fs._close_handle(self._handle, wait=not self._finalizing)
            finally:
                super().close()

    def _dealloc_warn(self, source: Any) -> None:
        """A buffered wrapper is being finalized unclosed (it calls this as it does for
        FileIO): warn, and let its close() release without waiting."""
        if not self.closed:
            self._finalizing = True
            warnings.warn(f"unclosed file {source!r}", ResourceWarning, stacklevel=2,
                          source=source)

    def __del__(self) -> None:
        if getattr(self, "_fs", None) is None or self.closed:
            return
        if not self._finalizing:
            self._finalizing = True
            warnings.warn(f"unclosed file {self!r}", ResourceWarning, stacklevel=2,
                          source=self)
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"<pyvirtiofs.RawFile name={self.name!r}>"


class ScandirIterator:
    """What :meth:`ShareFS.scandir` returns (see ``os.scandir``): the directory is released
    when the entries run out, on :meth:`close`, at the end of a ``with`` block, or — with
    a ``ResourceWarning``, as ``os.scandir`` warns — when it is garbage-collected."""

    def __init__(self, fs: ShareFS, handle: Any, path: PathLike) -> None:
        self._fs = fs
        self._handle: Any = handle
        self._base = os.fsdecode(path)
        self._as_bytes = isinstance(path, bytes)
        self._batch: list[DirentPlus] = []
        self._next = 0

    def __iter__(self) -> ScandirIterator:
        return self

    def __next__(self) -> DirEntry:
        while True:
            if self._handle is None:
                raise StopIteration
            if self._next == len(self._batch):
                self._batch = self._fs._ask_handle(self._handle, m.ReadDir(plus=True))
                self._next = 0
                if not self._batch:
                    self.close()
                    raise StopIteration
            e = self._batch[self._next]
            self._next += 1
            if e.dirent.name not in (b".", b".."):
                return DirEntry(self._fs, self._base, e.dirent.name, e, self._as_bytes)

    def close(self, *, wait: bool = True) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            self._fs._close_handle(handle, wait=wait)

    def __enter__(self) -> ScandirIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_handle", None) is not None:
            warnings.warn(f"unclosed scandir iterator {self!r}", ResourceWarning,
                          stacklevel=2, source=self)
            with contextlib.suppress(Exception):
                self.close(wait=False)  # a finalizer never waits


class DirEntry:
    """Like ``os.DirEntry``; attributes come with the READDIRPLUS reply."""

    __slots__ = ("_attr", "_fs", "_lattr", "_raw", "name", "path")

    def __init__(self, fs: ShareFS, base: str, raw_name: bytes, plus: DirentPlus,
                 as_bytes: bool) -> None:
        self._fs = fs
        self._raw = plus
        name = raw_name if as_bytes else os.fsdecode(raw_name)
        self.name: Any = name
        self.path: Any = os.path.join(os.fsencode(base) if as_bytes else base, name)
        self._lattr = plus.entry.attr.to_stat_result() if plus.entry.nodeid else None
        self._attr: os.stat_result | None = None

    def inode(self) -> int:
        return self._raw.dirent.ino

    def _type(self) -> int:
        return self._raw.dirent.type

    def is_symlink(self) -> bool:
        return self._type() == _DT_LNK

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        if self._type() == _DT_LNK and follow_symlinks:
            try:
                return stat_mod.S_ISDIR(self.stat().st_mode)
            except FileNotFoundError:
                return False
        return self._type() == _DT_DIR

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        if self._type() == _DT_LNK and follow_symlinks:
            try:
                return stat_mod.S_ISREG(self.stat().st_mode)
            except FileNotFoundError:
                return False
        return self._type() == _DT_REG

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        if not follow_symlinks or self._type() != _DT_LNK:
            if self._lattr is None:
                self._lattr = self._fs.lstat(self.path)
            return self._lattr
        if self._attr is None:
            self._attr = self._fs.stat(self.path)
        return self._attr

    def __fspath__(self) -> Any:
        return self.path

    def __repr__(self) -> str:
        return f"<DirEntry {self.name!r}>"
