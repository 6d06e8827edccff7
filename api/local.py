"""The in-process API: a virtio-fs share with the ``os`` module's names and conventions.

    from api import connect
    with connect("/srv/share") as fs:          # starts a private virtiofsd
        fs.mkdir("docs")
        with fs.open("docs/a.txt", "w") as f:
            f.write("hello")
        print(fs.listdir("docs"), fs.stat("docs/a.txt").st_size)

Every call becomes a message to the session actor (metadata) or to a file/directory actor
(data); errors are the ``OSError`` subclasses ``os`` raises, with ``errno`` and
``filename`` set.
"""

from __future__ import annotations

import copy
import errno
import io
import os
import stat as stat_mod
from collections.abc import Iterator
from typing import Any

import msgspec
import pykka

from actors.device import DeviceActor
from actors.session import SessionConfig, open_session
from codec import messages as m
from codec.fuse_types import Attr, DirentPlus
from hw.transport import VhostUserTransport, VirtioTransport, open_private_device

__all__ = ["DirEntry", "VirtioFS", "connect"]

_DT_DIR = stat_mod.S_IFDIR >> 12
_DT_LNK = stat_mod.S_IFLNK >> 12
_DT_REG = stat_mod.S_IFREG >> 12


def connect(shared_dir: str | os.PathLike[str] | None = None, *, socket: str | None = None,
            tag: str | None = None, virtiofsd: str | None = None, cache: str = "auto",
            busy_poll: bool = False, **transport_kwargs: Any) -> VirtioFS:
    """Open a share: ``connect(DIR)`` starts a private virtiofsd on DIR;
    ``connect(socket=PATH)`` attaches to a daemon already listening there."""
    if (shared_dir is None) == (socket is None):
        raise TypeError("connect() takes a directory or socket=..., not both")
    if shared_dir is not None:
        transport: VirtioTransport = open_private_device(shared_dir, binary=virtiofsd,
                                                         cache=cache, **transport_kwargs)
    else:
        assert socket is not None
        transport = VhostUserTransport.connect(socket, **transport_kwargs)
    return VirtioFS(transport, SessionConfig(tag=tag), busy_poll=busy_poll)


class VirtioFS:
    """A mounted share. Thread-safe: every call is a message to an actor."""

    def __init__(self, transport: VirtioTransport, config: SessionConfig | None = None, *,
                 busy_poll: bool = False) -> None:
        self.device = DeviceActor.start(transport, busy_poll=busy_poll)
        try:
            self.session = open_session(self.device, config)
        except BaseException:
            self.device.stop()
            raise
        self._closed = False
        self._owner = True
        self.ctx: m.Credentials | None = None

    # -- plumbing --------------------------------------------------------------------------

    def as_user(self, uid: int, gid: int, pid: int | None = None) -> VirtioFS:
        """A view of this share whose requests carry other credentials (the FUSE request
        context): the daemon checks permissions and assigns ownership as that user.
        Closing the view does not close the share."""
        view = copy.copy(self)
        view._owner = False
        view.ctx = (uid, gid, os.getpid() if pid is None else pid)
        return view

    def _ask(self, message: Any) -> Any:
        if self.ctx is not None:
            message = msgspec.structs.replace(message, ctx=self.ctx)
        try:
            return self.session.ask(message)
        except pykka.ActorDeadError:
            raise OSError(errno.ENOTCONN, "the share is closed") from None

    def close(self) -> None:
        """Release every handle, forget every node, stop the device and its daemon."""
        if self._closed or not self._owner:
            return
        self._closed = True
        self.session.stop()
        self.device.stop()

    def __enter__(self) -> VirtioFS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, Any]:
        """Counters of the session and the device (requests per opcode, nodes, …)."""
        return {"session": self._ask(m.SessionStats()),
                "device": self.device.ask(m.DeviceStats())}

    # -- metadata ----------------------------------------------------------------------------

    def stat(self, path: m.PathArg, *, follow_symlinks: bool = True) -> os.stat_result:
        attr: Attr = self._ask(m.Stat(path=path, follow=follow_symlinks))
        return attr.to_stat_result()

    def lstat(self, path: m.PathArg) -> os.stat_result:
        return self.stat(path, follow_symlinks=False)

    def exists(self, path: m.PathArg) -> bool:
        try:
            self.stat(path)
        except FileNotFoundError:
            return False
        return True

    def access(self, path: m.PathArg, mode: int) -> bool:
        try:
            self._ask(m.Access(path=path, mode=mode))
        except (PermissionError, FileNotFoundError):
            return False
        return True

    def readlink(self, path: m.PathArg) -> str | bytes:
        target: bytes = self._ask(m.ReadLink(path=path))
        return target if isinstance(path, bytes) else os.fsdecode(target)

    def mkdir(self, path: m.PathArg, mode: int = 0o777) -> None:
        self._ask(m.MakeDir(path=path, mode=mode, umask=_umask()))

    def makedirs(self, path: m.PathArg, mode: int = 0o777, exist_ok: bool = False) -> None:
        head, _tail = os.path.split(os.fsdecode(path).rstrip("/"))
        if head and not self.exists(head):
            self.makedirs(head, mode, exist_ok=True)
        try:
            self.mkdir(path, mode)
        except FileExistsError:
            if not exist_ok or not stat_mod.S_ISDIR(self.stat(path).st_mode):
                raise

    def mkfifo(self, path: m.PathArg, mode: int = 0o666) -> None:
        self._ask(m.MakeNode(path=path, mode=stat_mod.S_IFIFO | (mode & 0o7777), umask=_umask()))

    def remove(self, path: m.PathArg) -> None:
        self._ask(m.Unlink(path=path))

    unlink = remove

    def rmdir(self, path: m.PathArg) -> None:
        self._ask(m.RemoveDir(path=path))

    def rename(self, src: m.PathArg, dst: m.PathArg, *, flags: int = 0) -> None:
        self._ask(m.Rename(src=src, dst=dst, flags=flags))

    replace = rename

    def link(self, src: m.PathArg, dst: m.PathArg) -> None:
        self._ask(m.Link(src=src, dst=dst))

    def symlink(self, target: m.PathArg, path: m.PathArg) -> None:
        self._ask(m.Symlink(target=target, path=path))

    def chmod(self, path: m.PathArg, mode: int, *, follow_symlinks: bool = True) -> None:
        self._ask(m.SetAttr(path=path, mode=mode, follow=follow_symlinks))

    def chown(self, path: m.PathArg, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        self._ask(m.SetAttr(path=path, uid=uid, gid=gid, follow=follow_symlinks))

    def truncate(self, path: m.PathArg, length: int) -> None:
        if length < 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        self._ask(m.SetAttr(path=path, size=length))

    def utime(self, path: m.PathArg, times: tuple[float, float] | None = None, *,
              ns: tuple[int, int] | None = None, follow_symlinks: bool = True) -> None:
        if times is not None and ns is not None:
            raise ValueError("utime: you may specify either 'times' or 'ns' but not both")
        if ns is None and times is None:
            self._ask(m.SetAttr(path=path, atime="now", mtime="now", follow=follow_symlinks))
            return
        if ns is None:
            assert times is not None
            ns = (int(times[0] * 1e9), int(times[1] * 1e9))
        at, mt = (divmod(v, 10**9) for v in ns)
        self._ask(m.SetAttr(path=path, atime=at, mtime=mt, follow=follow_symlinks))

    def statvfs(self, path: m.PathArg = "/") -> os.statvfs_result:
        return self._ask(m.StatFs(path=path)).to_statvfs_result()

    def getxattr(self, path: m.PathArg, attribute: m.PathArg, *,
                 follow_symlinks: bool = True) -> bytes:
        return self._ask(m.GetXattr(path=path, name=attribute, follow=follow_symlinks))

    def setxattr(self, path: m.PathArg, attribute: m.PathArg, value: bytes, flags: int = 0, *,
                 follow_symlinks: bool = True) -> None:
        self._ask(m.SetXattr(path=path, name=attribute, value=bytes(value), flags=flags,
                             follow=follow_symlinks))

    def listxattr(self, path: m.PathArg = "/", *, follow_symlinks: bool = True) -> list[str]:
        return [os.fsdecode(n) for n in
                self._ask(m.ListXattr(path=path, follow=follow_symlinks))]

    def removexattr(self, path: m.PathArg, attribute: m.PathArg, *,
                    follow_symlinks: bool = True) -> None:
        self._ask(m.RemoveXattr(path=path, name=attribute, follow=follow_symlinks))

    # -- directories ---------------------------------------------------------------------------

    def scandir(self, path: m.PathArg = "/") -> Iterator[DirEntry]:
        """Entries of ``path`` (without . and ..), with their attributes from READDIRPLUS
        so ``is_dir()``/``stat()`` need no further round trip."""
        opened: m.OpenedDir = self._ask(m.OpenDir(path=path))
        ref = opened.actor
        base = os.fsdecode(path)
        try:
            while True:
                batch: list[DirentPlus] = ref.ask(m.ReadDir(plus=True))
                if not batch:
                    return
                for e in batch:
                    name = e.dirent.name
                    if name in (b".", b".."):
                        continue
                    yield DirEntry(self, base, name, e, isinstance(path, bytes))
        finally:
            ref.stop()

    def listdir(self, path: m.PathArg = "/") -> list[Any]:
        opened: m.OpenedDir = self._ask(m.OpenDir(path=path))
        ref = opened.actor
        names: list[bytes] = []
        try:
            while batch := ref.ask(m.ReadDir(plus=False)):
                names += [e.name for e in batch if e.name not in (b".", b"..")]
        finally:
            ref.stop()
        return names if isinstance(path, bytes) else [os.fsdecode(n) for n in names]

    def walk(self, top: m.PathArg = "/") -> Iterator[tuple[str, list[str], list[str]]]:
        dirs, files = [], []
        for entry in self.scandir(top):
            (dirs if entry.is_dir(follow_symlinks=False) else files).append(entry.name)
        yield os.fsdecode(top), dirs, files
        for d in dirs:
            yield from self.walk(os.path.join(os.fsdecode(top), d))

    # -- files -----------------------------------------------------------------------------------

    def open_raw(self, path: m.PathArg, flags: int, mode: int = 0o666) -> RawFile:
        """Open with ``os.open`` flags; returns an unbuffered :class:`RawFile`."""
        opened: m.OpenedFile = self._ask(m.Open(path=path, flags=flags, mode=mode,
                                                umask=_umask()))
        return RawFile(opened, os.fsdecode(path), self.ctx)

    def open(self, path: m.PathArg, mode: str = "r", buffering: int = -1,
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

    def read_bytes(self, path: m.PathArg) -> bytes:
        with self.open_raw(path, os.O_RDONLY) as f:
            return f.readall()

    def write_bytes(self, path: m.PathArg, data: bytes) -> int:
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
    """An unbuffered file on a share, backed by a file actor (no OS file descriptor)."""

    def __init__(self, opened: m.OpenedFile, name: str,
                 ctx: m.Credentials | None = None) -> None:
        super().__init__()
        self._ref = opened.actor
        self._ctx = ctx
        self.name = name
        self.flags = opened.flags
        acc = opened.flags & os.O_ACCMODE
        self.readable_ = acc in (os.O_RDONLY, os.O_RDWR)
        self.writable_ = acc in (os.O_WRONLY, os.O_RDWR)

    def _ask(self, message: Any) -> Any:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        if self._ctx is not None:
            message = msgspec.structs.replace(message, ctx=self._ctx)
        try:
            return self._ref.ask(message)
        except pykka.ActorDeadError:
            raise OSError(errno.EBADF, "file handle is gone", self.name) from None

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
        return self._ask(m.ReadInto(buffer=buffer))

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
                self._ref.ask(m.Close())
            except pykka.ActorDeadError:
                pass
            finally:
                super().close()


class DirEntry:
    """Like ``os.DirEntry``; attributes come with the READDIRPLUS reply."""

    __slots__ = ("_attr", "_fs", "_lattr", "_raw", "name", "path")

    def __init__(self, fs: VirtioFS, base: str, raw_name: bytes, plus: DirentPlus,
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
