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
import copy
import errno
import io
import os
import stat as stat_mod
from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from pyvirtiofs.actors import messages as m
from pyvirtiofs.api.copying import ShutilMixin
from pyvirtiofs.api.entries import DirEntry, ScandirIterator
from pyvirtiofs.api.files import RawFile, mode_to_flags
from pyvirtiofs.api.ospath import OsPathMixin
from pyvirtiofs.api.paths import path_class
from pyvirtiofs.codec.fuse_types import Attr

__all__ = ["DirEntry", "PathLike", "RawFile", "ShareFS"]

PathLike = str | bytes | os.PathLike[str] | os.PathLike[bytes]



def _p(path: PathLike) -> bytes:
    """Paths travel as bytes: names need not be UTF-8 (see pyvirtiofs.actors.messages)."""
    return os.fsencode(path)


class ShareFS(OsPathMixin, ShutilMixin, abc.ABC):
    """A mounted share with the ``os`` module's names, arguments and exceptions.

    Subclasses implement the five transport hooks below; everything else is shared.
    """

    ctx: m.Credentials | None = None
    groups: tuple[int, ...] = ()
    _owner = True  # closing a view made by as_user() does not close the share

    def as_user(self, uid: int, gid: int, pid: int | None = None,
                groups: tuple[int, ...] | list[int] = ()) -> Any:
        """A view of this share whose requests act as another user: the daemon creates
        files owned by ``uid``/``gid``, and permissions are checked for them (with
        ``groups`` as their supplementary groups), as the kernel checks them with
        ``default_permissions``. Closing the view does not close the share."""
        view = copy.copy(self)
        view._owner = False
        view.ctx = (uid, gid, os.getpid() if pid is None else pid)
        view.groups = tuple(groups)
        return view

    def _as_caller(self, message: Any) -> Any:
        """``message`` carrying this view's credentials (unchanged for the share's own)."""
        if self.ctx is None or not hasattr(message, "groups"):  # not an operation
            return message
        return msgspec.structs.replace(message, ctx=self.ctx, groups=self.groups)

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

    def access(self, path: PathLike, mode: int) -> bool:
        """As ``os.access``: True or False, never an error (a missing path, ``file/x`` …)."""
        try:
            self._ask(m.Access(path=_p(path), mode=mode))
        except OSError:
            return False
        return True

    def readlink(self, path: PathLike) -> str | bytes:
        target: bytes = self._ask(m.ReadLink(path=_p(path)))
        return target if isinstance(path, bytes) else os.fsdecode(target)

    def mkdir(self, path: PathLike, mode: int = 0o777) -> None:
        self._ask(m.MakeDir(path=_p(path), mode=mode, umask=current_umask()))

    def makedirs(self, path: PathLike, mode: int = 0o777, exist_ok: bool = False) -> None:
        """As ``os.makedirs`` (the same steps, so the same errors: a file or a dangling
        link in the way is FileExistsError)."""
        head, tail = os.path.split(path)
        if not tail:
            head, tail = os.path.split(head)
        if head and tail and not self.exists(head):
            with contextlib.suppress(FileExistsError):  # made meanwhile: fine
                self.makedirs(head, exist_ok=exist_ok)
            if tail == (b"." if isinstance(tail, bytes) else "."):
                return
        try:
            self.mkdir(path, mode)
        except OSError:
            if not exist_ok or not self.isdir(path):
                raise

    def mkfifo(self, path: PathLike, mode: int = 0o666) -> None:
        self._ask(m.MakeNode(path=_p(path), mode=stat_mod.S_IFIFO | (mode & 0o7777),
                             umask=current_umask()))

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

    def walk(self, top: PathLike = "/", topdown: bool = True,
             onerror: Callable[[OSError], Any] | None = None,
             followlinks: bool = False) -> Iterator[tuple[Any, list[Any], list[Any]]]:
        """As ``os.walk``: a link to a directory is listed with the directories and
        entered only with ``followlinks``; an unreadable directory (the top included) is
        reported to ``onerror`` and skipped; ``topdown=False`` yields children first;
        with ``topdown`` the caller may prune ``dirnames`` in place."""
        stack: list[Any] = [top]
        while stack:
            top = stack.pop()
            if isinstance(top, tuple):  # bottom-up: a directory whose children are done
                yield top
                continue
            dirs: list[Any] = []
            nondirs: list[Any] = []
            walk_into: list[Any] = []
            try:
                it = self.scandir(top)
            except OSError as error:
                if onerror is not None:
                    onerror(error)
                continue
            with it:
                while True:
                    try:
                        entry = next(it)
                    except StopIteration:
                        break
                    except OSError as error:
                        if onerror is not None:
                            onerror(error)
                        break
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    (dirs if is_dir else nondirs).append(entry.name)
                    if not topdown and is_dir:
                        walk_into.append(entry)
            if topdown:
                yield top, dirs, nondirs
                for name in reversed(dirs):
                    path = os.path.join(top, name)
                    if followlinks or not self.islink(path):
                        stack.append(path)
            else:
                stack.append((top, dirs, nondirs))
                for entry in reversed(walk_into):
                    if followlinks or not entry.is_symlink():
                        stack.append(entry.path)

    def path(self, *parts: PathLike) -> Any:
        """A ``pathlib``-style path bound to this share: ``fs.path("a") / "b.txt"``."""
        cls = self.__dict__.get("_path_class")
        if cls is None:
            cls = self.__dict__["_path_class"] = path_class(self)
        return cls("/", *[os.fsdecode(p) for p in parts])  # from the share's root

    # -- files -----------------------------------------------------------------------------------

    def open_raw(self, path: PathLike, flags: int, mode: int = 0o666) -> RawFile:
        """Open with ``os.open`` flags; returns an unbuffered :class:`RawFile`."""
        handle, flags = self._open_file(m.Open(path=_p(path), flags=flags, mode=mode,
                                               umask=current_umask()))
        return RawFile(self, handle, os.fsdecode(path), flags)

    def open(self, path: PathLike, mode: str = "r", buffering: int = -1,
             encoding: str | None = None, errors: str | None = None,
             newline: str | None = None) -> Any:
        """Like the built-in ``open`` (modes r/w/a/x, +, b/t)."""
        flags, readable, writable = mode_to_flags(mode)
        raw = self.open_raw(path, flags)
        try:
            raw.readable_ = readable
            raw.writable_ = writable
            if flags & os.O_APPEND:
                raw.seek(0, os.SEEK_END)  # as the built-in open() does in mode "a"
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


def current_umask() -> int:
    """This process's umask, read without changing it (``os.umask`` can only set it, and
    setting it even briefly would race with other threads creating files)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)  # no /proc: the old way
    os.umask(mask)
    return mask
