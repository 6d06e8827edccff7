"""Directory entries on a share: :class:`ScandirIterator` and :class:`DirEntry`, as
``os.scandir`` gives them."""

from __future__ import annotations

import contextlib
import os
import stat as stat_mod
import warnings
from typing import TYPE_CHECKING, Any

from pyvirtiofs.actors import messages as m
from pyvirtiofs.codec.fuse_types import DirentPlus

if TYPE_CHECKING:
    from pyvirtiofs.api.fs import PathLike, ShareFS

__all__ = ["DirEntry", "ScandirIterator"]

_DT_DIR = stat_mod.S_IFDIR >> 12
_DT_LNK = stat_mod.S_IFLNK >> 12
_DT_REG = stat_mod.S_IFREG >> 12


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
