"""``shutil``'s file and tree operations inside a share, with ``shutil``'s semantics:
``copyfile``, ``copy``, ``copy2``, ``copystat``, ``copytree`` (symbolic links kept or
followed), ``rmtree`` (never through a symbolic link), ``move`` (a rename when it can)
and ``disk_usage``. Data moves in large reads and writes on the share; nothing goes
through the local disk."""

from __future__ import annotations

import errno
import os
import posixpath
import stat as stat_mod
from collections.abc import Callable, Iterable
from shutil import Error, SameFileError
from typing import Any, NamedTuple

__all__ = ["DiskUsage", "ShutilMixin"]

COPY_CHUNK = 1 << 20


class DiskUsage(NamedTuple):
    total: int
    used: int
    free: int


class ShutilMixin:
    """Mixed into :class:`~pyvirtiofs.api.fs.ShareFS`."""

    # what the mixin uses of ShareFS
    stat: Callable[..., os.stat_result]
    lstat: Callable[..., os.stat_result]
    open_raw: Callable[..., Any]
    readlink: Callable[..., Any]
    symlink: Callable[..., None]
    mkdir: Callable[..., None]
    makedirs: Callable[..., None]
    chmod: Callable[..., None]
    utime: Callable[..., None]
    unlink: Callable[..., None]
    rmdir: Callable[..., None]
    rename: Callable[..., None]
    scandir: Callable[..., Any]
    statvfs: Callable[..., os.statvfs_result]
    isdir: Callable[[Any], bool]
    islink: Callable[[Any], bool]
    exists: Callable[[Any], bool]
    samefile: Callable[[Any, Any], bool]

    def copyfile(self, src: Any, dst: Any, *, follow_symlinks: bool = True) -> Any:
        """Copy the data of ``src`` to ``dst`` (created or truncated); with
        ``follow_symlinks=False`` a symbolic link is copied as a link."""
        if self._same(src, dst):
            raise SameFileError(f"{src!r} and {dst!r} are the same file")
        if not follow_symlinks and self.islink(src):
            self.symlink(self.readlink(src), dst)
            return dst
        with self.open_raw(src, os.O_RDONLY) as fin:
            if stat_mod.S_ISDIR(fin.stat().st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), src)
            with self.open_raw(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as fout:
                buf = bytearray(COPY_CHUNK)
                view = memoryview(buf)
                while n := fin.readinto(view):
                    fout.write(view[:n])
        return dst

    def _same(self, src: Any, dst: Any) -> bool:
        try:
            return self.samefile(src, dst)
        except OSError:
            return False

    def _into(self, src: Any, dst: Any) -> Any:
        if self.isdir(dst):
            return posixpath.join(os.fsdecode(dst), posixpath.basename(
                os.fsdecode(src).rstrip("/")))
        return dst

    def copymode(self, src: Any, dst: Any, *, follow_symlinks: bool = True) -> None:
        self.chmod(dst, stat_mod.S_IMODE(self.stat(src, follow_symlinks=follow_symlinks)
                                         .st_mode))

    def copystat(self, src: Any, dst: Any, *, follow_symlinks: bool = True) -> None:
        """Permission bits and access/modification times (as ``shutil.copystat``; a
        symbolic link's own mode cannot be set on Linux, its times can)."""
        st = self.stat(src, follow_symlinks=follow_symlinks)
        link = not follow_symlinks and stat_mod.S_ISLNK(st.st_mode)
        self.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=not link)
        if not link:
            self.chmod(dst, stat_mod.S_IMODE(st.st_mode))

    def copy(self, src: Any, dst: Any, *, follow_symlinks: bool = True) -> Any:
        dst = self._into(src, dst)
        self.copyfile(src, dst, follow_symlinks=follow_symlinks)
        if follow_symlinks or not self.islink(dst):
            self.copymode(src, dst, follow_symlinks=follow_symlinks)
        return dst

    def copy2(self, src: Any, dst: Any, *, follow_symlinks: bool = True) -> Any:
        dst = self._into(src, dst)
        self.copyfile(src, dst, follow_symlinks=follow_symlinks)
        self.copystat(src, dst, follow_symlinks=follow_symlinks)
        return dst

    def copytree(self, src: Any, dst: Any, symlinks: bool = False,
                 ignore: Callable[[Any, list[str]], Iterable[str]] | None = None,
                 copy_function: Callable[..., Any] | None = None,
                 ignore_dangling_symlinks: bool = False, dirs_exist_ok: bool = False) -> Any:
        """As ``shutil.copytree``: errors are collected and raised together at the end
        (:class:`Error`, a list of (src, dst, reason)), so nothing stops half-way."""
        copy_fn = copy_function or self.copy2
        with self.scandir(src) as it:
            entries = list(it)
        names = [e.name for e in entries]
        ignored = set(ignore(src, names)) if ignore is not None else set()
        self.makedirs(dst, exist_ok=dirs_exist_ok)
        errors: list[tuple[Any, Any, str]] = []
        for entry in entries:
            if entry.name in ignored:
                continue
            s = posixpath.join(os.fsdecode(src), entry.name)
            d = posixpath.join(os.fsdecode(dst), entry.name)
            try:
                if entry.is_symlink():
                    target = self.readlink(s)
                    if symlinks:
                        self.symlink(target, d)
                        self.copystat(s, d, follow_symlinks=False)
                        continue
                    if not self.exists(s):
                        if ignore_dangling_symlinks:
                            continue
                    elif self.isdir(s):
                        self.copytree(s, d, symlinks, ignore, copy_function,
                                      ignore_dangling_symlinks, dirs_exist_ok)
                        continue
                    copy_fn(s, d)
                elif entry.is_dir(follow_symlinks=False):
                    self.copytree(s, d, symlinks, ignore, copy_function,
                                  ignore_dangling_symlinks, dirs_exist_ok)
                else:
                    copy_fn(s, d)
            except Error as err:
                errors.extend(err.args[0])
            except OSError as why:
                errors.append((s, d, str(why)))
        try:
            self.copystat(src, dst)
        except OSError as why:
            errors.append((src, dst, str(why)))
        if errors:
            raise Error(errors)
        return dst

    def rmtree(self, path: Any, ignore_errors: bool = False,
               onerror: Callable[[Any, Any, Any], None] | None = None) -> None:
        """As ``shutil.rmtree``: never follows a symbolic link (removing a link to a
        directory is an error, as it is there)."""
        def fail(fn: Any, p: Any, exc: BaseException) -> None:
            if ignore_errors:
                return
            if onerror is None:
                raise exc
            onerror(fn, p, (type(exc), exc, exc.__traceback__))

        try:
            if self.islink(path):
                raise OSError(errno.ENOTDIR, "Cannot call rmtree on a symbolic link", path)
            with self.scandir(path) as it:
                entries = list(it)
        except OSError as exc:
            fail(self.scandir, path, exc)
            return
        for entry in entries:
            p = posixpath.join(os.fsdecode(path), entry.name)
            if entry.is_dir(follow_symlinks=False):
                self.rmtree(p, ignore_errors, onerror)
            else:
                try:
                    self.unlink(p)
                except OSError as exc:
                    fail(self.unlink, p, exc)
        try:
            self.rmdir(path)
        except OSError as exc:
            fail(self.rmdir, path, exc)

    def move(self, src: Any, dst: Any) -> Any:
        """As ``shutil.move``: a rename inside the share (into ``dst`` when it is a
        directory); a copy then a removal only when the rename cannot be done."""
        real_dst = dst
        if self.isdir(dst):
            if self._same(src, dst):
                self.rename(src, dst)
                return dst
            real_dst = self._into(src, dst)
            if self.exists(real_dst):
                raise Error(f"Destination path '{os.fsdecode(real_dst)}' already exists")
        try:
            self.rename(src, real_dst)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EBUSY):
                raise
            if self.islink(src):
                self.symlink(self.readlink(src), real_dst)
                self.unlink(src)
            elif self.isdir(src):
                self.copytree(src, real_dst, symlinks=True)
                self.rmtree(src)
            else:
                self.copy2(src, real_dst)
                self.unlink(src)
        return real_dst

    def disk_usage(self, path: Any = "/") -> DiskUsage:
        st = self.statvfs(path)
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        return DiskUsage(total, (st.f_blocks - st.f_bfree) * st.f_frsize, free)

